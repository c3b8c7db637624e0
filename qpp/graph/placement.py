"""Placement policies: where quantizers go. A policy only annotates; ``sim`` inserts.

``runtime`` (the default) puts quantizers where an integer runtime such as ONNX Runtime computes
(white paper §2.3):

- the weights of conv, linear, matmul-with-a-parameter and embedding ops (per-channel axis =
  output channels);
- the activation inputs of those ops, on the edges into them, so float consumers of the same
  tensor (a residual add, a layer norm) keep full precision;
- the outputs of convs, after a fused ReLU/ReLU6/clamp (no quantizer between a conv and its
  activation: the kernel requantizes after it; ONNX Runtime's QLinearConv always emits int8);
- the outputs of linear/matmul ops only where an integer op consumes them (QK^T, the Q/K/V
  projections); elsewhere (a residual add, GELU, softmax) the int32 accumulator is dequantized
  straight to float, as ONNX Runtime's MatMulIntegerToFloat and QGemm do;
- concat inputs that are all quantized share one quantizer, since the runtime needs one scale.

``runtime-int8-eltwise`` is ``runtime`` plus integer element-wise ops, as ONNX Runtime's own
``quantize_static`` places them: an Add, Mul or Softmax whose result an integer op reads (a
conv, linear or matmul, or another such element-wise op) gets its output and its inputs
quantized, so ORT runs QLinearAdd / QLinearMul / QLinearSoftmax on uint8 instead of float ops
between a DequantizeLinear and a QuantizeLinear. Left in float: ops with a constant vector
operand (the export writes scalar constants exactly on a one-value grid, vectors it cannot),
ops on values no conv/linear/embedding computed (attention masks), a Softmax whose input is not
quantized already (masked attention scores), and everything that only feeds float math (an Add
into a LayerNorm, a hardswish's ``x * clip(x + 3, 0, 6) / 6``).

``full`` quantizes every float activation (and the weights), for simulating accelerators that
keep every tensor in integers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from qpp.errors import ConfigError
from qpp.graph.ops import COMPUTE_KINDS, OpKind, op_kind, operand_roles

POLICIES = ("runtime", "runtime-int8-eltwise", "full")
#: Element-wise ops ``runtime-int8-eltwise`` runs on integers (ORT: QLinearAdd, QLinearMul,
#: QLinearSoftmax).
ELEMENTWISE_KINDS = (OpKind.ADD, OpKind.MUL, OpKind.SOFTMAX)


@dataclass(frozen=True)
class WeightSite:
    """A weight quantizer on the ``get_attr`` node ``weight_node``, used by op ``consumer``."""

    name: str
    weight_node: str
    consumer: str
    axis: int


@dataclass(frozen=True)
class ActivationSite:
    """An activation quantizer on the output of node ``value``.

    ``consumers=None`` quantizes the value for all its users; otherwise only the edges into the
    named users see the quantized tensor. Sites with the same ``name`` share one quantizer.
    """

    name: str
    value: str
    consumers: tuple[str, ...] | None
    role: str


@dataclass
class Placement:
    weights: list[WeightSite] = field(default_factory=list)
    activations: list[ActivationSite] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for site in [*self.weights, *self.activations]:
            seen.setdefault(site.name)
        return list(seen)


def place_quantizers(graph_module: GraphModule, policy: str = "runtime") -> Placement:
    """Annotate ``graph_module`` with quantizer sites according to ``policy``."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown placement policy '{policy}'; use one of {', '.join(POLICIES)}")
    namer = SiteNamer(graph_module)
    placement = Placement(weights=_weight_sites(graph_module, namer))
    if policy == "runtime":
        placement.activations = _runtime_activation_sites(graph_module, namer)
    elif policy == "runtime-int8-eltwise":
        placement.activations = _elementwise_activation_sites(
            graph_module, namer, _runtime_activation_sites(graph_module, namer)
        )
    else:
        placement.activations = _full_activation_sites(graph_module, namer)
    return placement


# ---------------------------------------------------------------------------------------------


def _is_float_tensor(node: Node) -> bool:
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    if value is None:
        return node.op in ("placeholder", "call_function", "call_method", "call_module")
    dtype = getattr(value, "dtype", None)
    return dtype is not None and dtype.is_floating_point


def _weight_arg(node: Node, kind: OpKind) -> tuple[Node, int] | None:
    """The ``get_attr`` weight of a compute/embedding op and its output-channel axis."""
    roles = operand_roles(node, kind)
    if roles.weight is None or roles.weight >= len(node.args):
        return None
    weight = node.args[roles.weight]
    if not isinstance(weight, Node) or weight.op != "get_attr":
        return None
    value = weight.meta.get("val")
    ndim = value.ndim if value is not None else 2
    assert roles.weight_axis is not None
    return weight, roles.weight_axis % ndim


def _compute_nodes(graph_module: GraphModule) -> list[tuple[Node, OpKind]]:
    modules = dict(graph_module.named_modules())
    found = []
    for node in graph_module.graph.nodes:
        kind = op_kind(node, modules)
        if kind in COMPUTE_KINDS or kind is OpKind.EMBEDDING:
            found.append((node, kind))
    return found


def _weight_sites(graph_module: GraphModule, namer: SiteNamer) -> list[WeightSite]:
    sites = []
    for node, kind in _compute_nodes(graph_module):
        found = _weight_arg(node, kind)
        if found is None:
            continue
        weight, axis = found
        sites.append(WeightSite(str(weight.target), weight.name, node.name, axis))
    return sites


def _anchor(node: Node, modules: dict[str, torch.nn.Module]) -> Node:
    """Walk back through value-preserving layout ops to the tensor they rearrange."""
    while op_kind(node, modules) is OpKind.LAYOUT and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _fused_output(node: Node, modules: dict[str, torch.nn.Module]) -> Node:
    """The node an integer kernel requantizes after: the op, or its sole fused activation."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if op_kind(user, modules) is not OpKind.FUSABLE_ACTIVATION:
            break
        node = user
    return node


def _feeds_integer_op(node: Node, modules: dict[str, torch.nn.Module]) -> bool:
    """True when a conv/linear/matmul consumes ``node`` (through layout ops) as an activation."""
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            kind = op_kind(user, modules)
            if kind is OpKind.LAYOUT and user.args and user.args[0] is current:
                frontier.append(user)
            elif kind in COMPUTE_KINDS:
                roles = operand_roles(user, kind)
                weight = _weight_arg(user, kind)
                positions = [i for i in roles.activations if weight is None or i != roles.weight]
                if any(i < len(user.args) and user.args[i] is current for i in positions):
                    return True
    return False


def _first_hop(anchor: Node, consumer: Node, argument: Node) -> Node:
    """The user of ``anchor`` on the layout chain that leads to ``consumer`` via ``argument``."""
    hop = consumer
    node = argument
    while node is not anchor:
        hop = node
        node = node.args[0]  # type: ignore[assignment]
    return hop


def _runtime_activation_sites(graph_module: GraphModule, namer: SiteNamer) -> list[ActivationSite]:
    modules = dict(graph_module.named_modules())
    compute = _compute_nodes(graph_module)
    quantized_values: dict[str, str] = {}  # node name -> site name, value-centric outputs
    sites: list[ActivationSite] = []
    for node, kind in compute:
        if kind is OpKind.EMBEDDING:
            continue
        output = _fused_output(node, modules)
        requantized = kind in (OpKind.CONV, OpKind.CONV_TRANSPOSE) or _feeds_integer_op(
            output, modules
        )
        if not requantized:
            continue
        if _is_float_tensor(output) and output.name not in quantized_values:
            name = namer.name(node, "output")
            quantized_values[output.name] = name
            sites.append(ActivationSite(name, output.name, None, "output"))

    # A concat of quantized tensors is on one grid when its inputs share a quantizer.
    concat_groups: list[tuple[Node, list[str]]] = []
    for node in graph_module.graph.nodes:
        if op_kind(node, modules) is OpKind.CONCAT and isinstance(node.args[0], list | tuple):
            parts = [_anchor(p, modules) for p in node.args[0] if isinstance(p, Node)]
            if parts and all(p.name in quantized_values for p in parts):
                concat_groups.append((node, [quantized_values[p.name] for p in parts]))
    tied_concats = {concat.name for concat, _ in concat_groups}

    edges: dict[str, dict[str, None]] = defaultdict(dict)
    edge_names: dict[str, str] = {}
    for node, kind in compute:
        roles = operand_roles(node, kind)
        weight = _weight_arg(node, kind)
        activation_args = [
            i for i in roles.activations if weight is None or i != operand_roles(node, kind).weight
        ]
        for position, index in enumerate(activation_args):
            if index >= len(node.args) or not isinstance(node.args[index], Node):
                continue
            argument: Node = node.args[index]  # type: ignore[assignment]
            if argument.op == "get_attr" or not _is_float_tensor(argument):
                continue
            anchor = _anchor(argument, modules)
            if anchor.name in quantized_values:
                continue
            if anchor.name in tied_concats:
                continue
            suffix = "input" if len(activation_args) == 1 else f"input{position}"
            edge_names.setdefault(anchor.name, namer.name(node, suffix))
            edges[anchor.name][_first_hop(anchor, node, argument).name] = None
    sites += [
        ActivationSite(edge_names[value], value, tuple(users), "input")
        for value, users in edges.items()
    ]
    return _tie_concat_inputs(sites, concat_groups, namer)


def _computed_values(graph_module: GraphModule) -> set[str]:
    """Nodes downstream of a conv, linear, matmul or embedding (not masks or shapes)."""
    modules = dict(graph_module.named_modules())
    computed: set[str] = set()
    for node in graph_module.graph.nodes:
        kind = op_kind(node, modules)
        if kind in (*COMPUTE_KINDS, OpKind.EMBEDDING) or any(
            isinstance(a, Node) and a.name in computed for a in node.all_input_nodes
        ):
            computed.add(node.name)
    return computed


def _elementwise_operands(node: Node, computed: set[str]) -> list[Node] | None:
    """The tensor operands of an Add/Mul an integer kernel can take, or ``None`` when it cannot:
    operands must be computed float tensors or scalar constants, and ``alpha`` 1."""
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    operands = []
    for argument in node.args:
        if isinstance(argument, int | float) and not isinstance(argument, bool):
            continue
        if not isinstance(argument, Node) or not _is_float_tensor(argument):
            return None
        if argument.op == "get_attr":
            value = argument.meta.get("val")
            if value is None or value.numel() != 1:
                return None  # a vector constant stays float: no exact one-value grid for it
            continue
        if argument.name not in computed:
            return None
        operands.append(argument)
    return operands or None


def _elementwise_activation_sites(
    graph_module: GraphModule, namer: SiteNamer, sites: list[ActivationSite]
) -> list[ActivationSite]:
    """``runtime`` sites plus the outputs and operands of the Add/Mul/Softmax ops whose results
    integer ops read (to a fixed point: a chain of them runs in integers to the next conv)."""
    modules = dict(graph_module.named_modules())
    computed = _computed_values(graph_module)
    quantized = {s.value for s in sites if s.consumers is None}
    candidates: dict[str, tuple[Node, Node, list[Node]]] = {}  # name -> (op, output, operands)
    for node in graph_module.graph.nodes:
        kind = op_kind(node, modules)
        if kind not in ELEMENTWISE_KINDS or not _is_float_tensor(node):
            continue
        if kind is OpKind.SOFTMAX:
            source = node.args[0] if node.args else None
            operands = [source] if isinstance(source, Node) else None
        else:
            operands = _elementwise_operands(node, computed)
        if operands:
            candidates[node.name] = (node, _fused_output(node, modules), operands)

    selected: dict[str, None] = {}
    changed = True
    while changed:
        changed = False
        outputs = {candidates[name][1].name for name in selected}
        for name, (node, output, operands) in candidates.items():
            if name in selected:
                continue
            if op_kind(node, modules) is OpKind.SOFTMAX:
                source = _anchor(operands[0], modules).name
                if source not in quantized and source not in outputs:
                    continue  # masked attention scores: their range is the mask's
            if _feeds_integer_op(output, modules) or _feeds(output, selected, modules):
                selected[name] = None
                changed = True

    values: dict[str, None] = {}
    for name in selected:
        _, output, operands = candidates[name]
        values.setdefault(output.name)
        for operand in operands:
            values.setdefault(_anchor(operand, modules).name)
    result = []
    for site in sites:
        if site.value in values and site.consumers is not None:
            site = ActivationSite(site.name, site.value, None, "activation")
        result.append(site)
    covered = {s.value for s in result}
    nodes = {node.name: node for node in graph_module.graph.nodes}
    for value in values:
        if value not in covered:
            name = namer.name(nodes[value], "output")
            result.append(ActivationSite(name, value, None, "activation"))
    return result


def _feeds(node: Node, targets: dict[str, None], modules: dict[str, torch.nn.Module]) -> bool:
    """True when one of the ``targets`` nodes reads ``node`` (through layout ops)."""
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user.name in targets:
                return True
            if op_kind(user, modules) is OpKind.LAYOUT and user.args and user.args[0] is current:
                frontier.append(user)
    return False


def _tie_concat_inputs(
    sites: list[ActivationSite], groups: list[tuple[Node, list[str]]], namer: SiteNamer
) -> list[ActivationSite]:
    """Give the quantized inputs of each concat one shared quantizer (one scale for the op)."""
    rename: dict[str, str] = {}
    for concat, names in groups:
        shared = namer.name(concat, "output")
        for name in names:
            rename[rename.get(name, name)] = shared
    return [ActivationSite(rename.get(s.name, s.name), s.value, s.consumers, s.role) for s in sites]


def _full_activation_sites(graph_module: GraphModule, namer: SiteNamer) -> list[ActivationSite]:
    modules = dict(graph_module.named_modules())
    sites = []
    for node in graph_module.graph.nodes:
        if node.op not in ("placeholder", "call_function", "call_method", "call_module"):
            continue
        if (
            node.op == "call_function"
            and node.target.__name__ == "getitem"
            and not _is_float_tensor(node)
        ):
            continue
        if op_kind(node, modules) is OpKind.LAYOUT or not _is_float_tensor(node):
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        sites.append(ActivationSite(namer.name(node, "output"), node.name, None, "activation"))
    return sites


class SiteNamer:
    """Readable, stable quantizer names from the module hierarchy.

    A compute op that is the only one in its module is named after the module
    (``encoder.layer.0.attention.self.query.output``); other ops add their node name
    (``encoder.layer.0.attention.self.matmul_1.output``).
    """

    def __init__(self, graph_module: GraphModule) -> None:
        self.scope_counts: dict[str, int] = defaultdict(int)
        modules = dict(graph_module.named_modules())
        for node in graph_module.graph.nodes:
            if op_kind(node, modules) in (*COMPUTE_KINDS, OpKind.EMBEDDING):
                self.scope_counts[self.scope(node)] += 1
        self.used: set[str] = set()
        self.assigned: dict[tuple[str, str], str] = {}

    @staticmethod
    def scope(node: Node) -> str:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return str(path)

    def name(self, node: Node, suffix: str) -> str:
        key = (node.name, suffix)
        if key in self.assigned:
            return self.assigned[key]
        scope = self.scope(node)
        if scope and self.scope_counts.get(scope) == 1 and node.op != "placeholder":
            base = f"{scope}.{suffix}"
        elif scope:
            base = f"{scope}.{node.name}.{suffix}"
        else:
            base = f"{node.name}.{suffix}"
        name, index = base, 1
        while name in self.used:
            index += 1
            name = f"{base}_{index}"
        self.used.add(name)
        self.assigned[key] = name
        return name
