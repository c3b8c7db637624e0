"""Graph patterns the PTQ algorithms act on, found on the captured (ATen-level) FX graph.

- ``weight_layers``: the conv/linear ops whose weight is a graph parameter, with their bias.
- ``equalization_pairs``: ``layer -> [ReLU | per-channel scale | per-channel offset]* -> layer``
  chains where every op in between is positively homogeneous, so scaling the first layer's
  output channels by ``1/s`` and the second layer's input channels by ``s`` keeps the function
  (cross-layer equalization, Nagel et al. 2019). Depthwise convs take part on either side.
- ``activation_after``: the ReLU a layer's output passes through, if any (AdaRound's ``f_a``).
- ``batch_norm_inputs``: layers whose input is ``[ReLU](BN(layer))``, with the folded batch
  norm's statistics (analytic bias correction).
- ``lookup_sums``: lookups (embedding tables) whose outputs are added together, as BERT adds
  its word, token-type and position embeddings before the first layer norm.

Quantizer modules inserted by ``qpp.sim`` are transparent: patterns are the same before and
after insertion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qpp.graph.fold import FoldedBatchNorm, folded_statistics

aten = torch.ops.aten
#: Module path prefix of the quantizers ``qpp.sim`` inserts (``sim.model.QUANTIZER_ROOT``).
QUANTIZER_PREFIX = "qpp_quantizers."

_CONVS = (aten.conv1d.default, aten.conv2d.default)
_LINEARS = (aten.linear.default,)
_RELUS = (aten.relu.default, aten.relu_.default)
_ADDS = (aten.add.Tensor, aten.add_.Tensor)
_SHAPE_OPS = (aten.sym_size.int, aten.sym_size.default)


@dataclass(frozen=True)
class WeightLayer:
    """A conv or linear op with a parameter weight: ``y = W * x + b``.

    ``weight`` and ``bias`` are attribute paths in the graph module (``bias`` is ``None`` when
    the op has none). Convolutions keep ``stride``, ``padding``, ``dilation`` and ``groups``.
    """

    node: Node
    weight: str
    bias: str | None
    is_conv: bool
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    groups: int = 1

    @property
    def name(self) -> str:
        return self.node.name

    def input_node(self) -> Node:
        return self.node.args[0]  # type: ignore[return-value]


@dataclass(frozen=True)
class EqualizationPair:
    """``producer -> through... -> consumer`` where CLE may rescale the channels in between.

    ``offsets`` are constants added to the producer's output on the way (they scale with it);
    ``ops`` names the ops in between in order (``relu``, ``mul``, ``add``).
    """

    producer: WeightLayer
    consumer: WeightLayer
    offsets: tuple[str, ...]
    ops: tuple[str, ...]

    @property
    def only_relu(self) -> bool:
        """``producer -> ReLU -> consumer``: the case high-bias absorption handles."""
        return self.ops == ("relu",)


def is_quantizer(node: Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(QUANTIZER_PREFIX)


def skip_quantizers(node: Node) -> Node:
    """The value a chain of quantizer calls starts from."""
    while is_quantizer(node):
        node = node.args[0]  # type: ignore[assignment]
    return node


def sole_user(node: Node) -> Node | None:
    """The only user of ``node`` after stepping over quantizers (``None`` if not exactly one)."""
    while True:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if not is_quantizer(user):
            return user
        node = user


def get_attr(root: torch.nn.Module, target: str) -> torch.Tensor:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part)
    assert isinstance(value, torch.Tensor)
    return value


def _param(node: object) -> str | None:
    if not isinstance(node, Node):
        return None
    node = skip_quantizers(node)
    return str(node.target) if node.op == "get_attr" else None


def _as_tuple(value: object, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,)
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def as_weight_layer(node: Node) -> WeightLayer | None:
    """``node`` as a ``WeightLayer`` when it is a conv1d/conv2d/linear with a parameter weight."""
    if node.op != "call_function" or node.target not in (*_CONVS, *_LINEARS):
        return None
    if len(node.args) < 2:
        return None
    weight = _param(node.args[1])
    if weight is None:
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    bias = _param(args[2] if args[2] is not None else node.kwargs.get("bias"))
    if node.target in _LINEARS:
        return WeightLayer(node, weight, bias, is_conv=False)
    return WeightLayer(
        node,
        weight,
        bias,
        is_conv=True,
        stride=_as_tuple(args[3], 1),
        padding=_as_tuple(args[4], 0),
        dilation=_as_tuple(args[5], 1),
        groups=int(args[6]) if args[6] is not None else 1,
    )


def weight_layers(graph_module: GraphModule) -> list[WeightLayer]:
    """Every conv1d/conv2d/linear op with a parameter weight, in graph (execution) order."""
    found = [as_weight_layer(node) for node in graph_module.graph.nodes]
    return [layer for layer in found if layer is not None]


def _channel_constant(
    graph_module: GraphModule, node: Node, value: Node, channels: int, is_conv: bool
) -> str | None:
    """The attribute path of the per-channel (or scalar) constant that ``node`` combines with
    ``value``, or ``None`` when the other operand is not such a constant."""
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    other = node.args[1] if node.args[0] is value else node.args[0]
    path = _param(other)
    if path is None:
        return None
    constant = get_attr(graph_module, path)
    if constant.numel() == 1:
        return path
    # Per-channel: C along the channel axis (dim -3 of a 2-D conv output, -2 of 1-D, -1 linear).
    value_ndim = value.meta["val"].ndim if "val" in value.meta else None
    axis = -(value_ndim - 1) if is_conv and value_ndim else -1
    if constant.numel() == channels and constant.ndim >= -axis and constant.shape[axis] == channels:
        return path
    return None


def _channels(graph_module: GraphModule, layer: WeightLayer) -> int:
    return int(get_attr(graph_module, layer.weight).shape[0])


def _accepts_scaled_inputs(graph_module: GraphModule, layer: WeightLayer, channels: int) -> bool:
    """True when the consumer's input channel ``i`` maps onto slice ``i`` of its weight:
    linear and ungrouped convs (``W[:, i]``) and depthwise convs (``W[i]``)."""
    weight = get_attr(graph_module, layer.weight)
    if not layer.is_conv:
        return weight.shape[1] == channels
    if layer.groups == 1:
        return weight.shape[1] == channels
    return layer.groups == channels and weight.shape[0] == channels and weight.shape[1] == 1


def _used_once(graph_module: GraphModule, path: str | None) -> bool:
    """True when the tensor at ``path`` feeds exactly one op (rescaling it changes nothing else;
    tied weights and constants shared by several ops are left alone)."""
    if path is None:
        return True
    uses = sum(
        len(node.users)
        for node in graph_module.graph.nodes
        if node.op == "get_attr" and node.target == path
    )
    return uses == 1


def equalization_pairs(graph_module: GraphModule) -> list[EqualizationPair]:
    """Chains ``producer -> [ReLU | x*c | x+c]* -> consumer`` with no other user in between.

    Any other user of an intermediate value (a residual add, a second branch) breaks the chain,
    which is how CLE stays inside residual blocks. ReLU6 / hardtanh / hardswish / GELU are not
    positively homogeneous (their clip points do not scale), so they end a chain too.
    """
    pairs: list[EqualizationPair] = []
    for producer in weight_layers(graph_module):
        if not (
            _used_once(graph_module, producer.weight) and _used_once(graph_module, producer.bias)
        ):
            continue
        channels = _channels(graph_module, producer)
        offsets: list[str] = []
        ops: list[str] = []
        current = producer.node
        while (user := sole_user(current)) is not None:
            consumer = as_weight_layer(user)
            if consumer is not None:
                if (
                    skip_quantizers(consumer.input_node()) is current
                    and _used_once(graph_module, consumer.weight)
                    and _accepts_scaled_inputs(graph_module, consumer, channels)
                ):
                    pairs.append(EqualizationPair(producer, consumer, tuple(offsets), tuple(ops)))
                break
            if user.target in _RELUS:
                ops.append("relu")
            elif user.target is aten.mul.Tensor and _channel_constant(
                graph_module, user, _value_arg(user, current), channels, producer.is_conv
            ):
                ops.append("mul")
            elif user.target is aten.add.Tensor:
                path = _channel_constant(
                    graph_module, user, _value_arg(user, current), channels, producer.is_conv
                )
                # A scalar offset cannot be scaled per channel without changing its shape.
                if path is None or get_attr(graph_module, path).numel() != channels:
                    break
                if not _used_once(graph_module, path):
                    break
                offsets.append(path)
                ops.append("add")
            else:
                break
            current = user
    return pairs


def _value_arg(node: Node, value: Node) -> Node:
    """The argument of ``node`` that is (a quantized copy of) ``value``."""
    for arg in node.args:
        if isinstance(arg, Node) and skip_quantizers(arg) is value:
            return arg
    return value


def activation_after(layer: WeightLayer) -> str | None:
    """``"relu"`` when the layer's output goes only through a ReLU, else ``None``."""
    user = sole_user(layer.node)
    return "relu" if user is not None and user.target in _RELUS else None


@dataclass(frozen=True)
class BatchNormInput:
    """``consumer`` reads ``[ReLU](producer)`` and ``producer`` had a batch norm folded in."""

    consumer: WeightLayer
    statistics: FoldedBatchNorm
    through_relu: bool


def batch_norm_inputs(graph_module: GraphModule) -> list[BatchNormInput]:
    """Consumers fed by a BN-folded layer directly or through one ReLU (conv-BN-ReLU-conv)."""
    statistics = folded_statistics(graph_module)
    found: list[BatchNormInput] = []
    for consumer in weight_layers(graph_module):
        value = skip_quantizers(consumer.input_node())
        through_relu = value.target in _RELUS
        if through_relu:
            value = skip_quantizers(value.args[0])  # type: ignore[arg-type]
        if value.name in statistics:
            found.append(BatchNormInput(consumer, statistics[value.name], through_relu))
    return found


@dataclass(frozen=True)
class Lookup:
    """``table[indices]`` (``aten.embedding``) with a parameter table at attribute ``table``.

    ``input_dependent`` is true when the indices depend on the values of a graph input (token
    ids); false when they come from constants and at most the inputs' shapes (BERT's
    ``token_type_ids`` and ``position_ids`` buffers)."""

    node: Node
    table: str
    indices: Node
    input_dependent: bool

    @property
    def name(self) -> str:
        return self.node.name


@dataclass(frozen=True)
class LookupSum:
    """Lookups whose outputs are summed by a tree of adds ending at ``output``; ``pairs`` are
    the lookups added to each other directly (``add(a, b)``), by node name."""

    lookups: tuple[Lookup, ...]
    output: Node
    pairs: tuple[tuple[str, str], ...]


def _depends_on_input_values(node: Node, memo: dict[str, bool]) -> bool:
    """True when ``node``'s value depends on a placeholder's values (not only its shape)."""
    if node.name not in memo:
        if node.op == "placeholder":
            memo[node.name] = True
        elif node.target in _SHAPE_OPS:
            memo[node.name] = False
        else:
            memo[node.name] = any(_depends_on_input_values(n, memo) for n in node.all_input_nodes)
    return memo[node.name]


def as_lookup(node: Node, memo: dict[str, bool] | None = None) -> Lookup | None:
    """``node`` as a ``Lookup`` when it is ``aten.embedding`` of a parameter table."""
    if node.op != "call_function" or node.target is not aten.embedding.default:
        return None
    table, indices = _param(node.args[0]), node.args[1]
    if table is None or not isinstance(indices, Node):
        return None
    return Lookup(
        node, table, indices, _depends_on_input_values(indices, {} if memo is None else memo)
    )


def lookups(graph_module: GraphModule) -> list[Lookup]:
    """Every lookup of a parameter table, in graph order."""
    memo: dict[str, bool] = {}
    found = [as_lookup(node, memo) for node in graph_module.graph.nodes]
    return [lookup for lookup in found if lookup is not None]


def lookup_sums(graph_module: GraphModule) -> list[LookupSum]:
    """Every add tree (adds feeding only adds, up to the last one) with two or more lookups
    among its operands; other operands are allowed and ignored."""
    memo: dict[str, bool] = {}
    order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    found: list[LookupSum] = []

    def is_inner_add(node: Node) -> bool:
        user = sole_user(node)
        return user is not None and user.target in _ADDS

    for node in graph_module.graph.nodes:
        if node.target not in _ADDS or is_inner_add(node):
            continue
        lookups: list[Lookup] = []
        pairs: list[tuple[str, str]] = []
        stack = [node]
        while stack:
            add = stack.pop()
            operands = [skip_quantizers(a) for a in add.args[:2] if isinstance(a, Node)]
            direct = []
            for operand in operands:
                if operand.target in _ADDS and sole_user(operand) is add:
                    stack.append(operand)
                    continue
                lookup = as_lookup(operand, memo)
                if lookup is not None:
                    lookups.append(lookup)
                    direct.append(lookup.name)
            if len(direct) == 2:
                pairs.append((direct[0], direct[1]))
        if len(lookups) >= 2:
            ordered = sorted(lookups, key=lambda lookup: order[lookup.node])
            found.append(LookupSum(tuple(ordered), node, tuple(pairs)))
    return found


def used_once(graph_module: GraphModule, path: str) -> bool:
    """True when the parameter at ``path`` feeds exactly one op (not tied or shared)."""
    return _used_once(graph_module, path)
