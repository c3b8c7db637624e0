"""Batch-norm folding (white paper §2.3.1, eq. 9-10).

``Ŵ_k = W_k γ_k / sqrt(σ²_k + ε)`` and ``b̂_k = β_k + (b_k - μ_k) γ_k / sqrt(σ²_k + ε)``: the
batch norm that follows a conv or linear layer disappears into that layer's weight and bias, so
no quantizer ever sits on the batch-norm output.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qpp.graph.ops import OpKind, op_kind

#: ``graph_module.meta`` key: layer node name -> ``FoldedBatchNorm`` (kept for analytic bias
#: correction and data-free range setting, which need the statistics that folding removes).
FOLDED_STATISTICS = "qpp.folded_batch_norms"


@dataclass(frozen=True)
class FoldedBatchNorm:
    """The distribution a folded batch norm predicts for its layer's output: ``N(β, γ²)``."""

    mean: torch.Tensor
    std: torch.Tensor


def folded_statistics(graph_module: GraphModule) -> dict[str, FoldedBatchNorm]:
    """Layer node name -> the batch-norm statistics folded into that layer."""
    return graph_module.meta.get(FOLDED_STATISTICS, {})


def fold_batch_norms(graph_module: GraphModule) -> list[str]:
    """Fold every eval-mode batch norm whose input is a conv/linear used only by it.

    Returns the names of the folded batch-norm nodes. Batch norms with any other producer stay
    in the graph (computed in float).
    """
    folded: list[str] = []
    for node in list(graph_module.graph.nodes):
        if op_kind(node) is not OpKind.BATCH_NORM:
            continue
        producer = node.args[0]
        if not isinstance(producer, Node) or len(producer.users) != 1:
            continue
        if op_kind(producer) not in (OpKind.CONV, OpKind.LINEAR):
            continue
        if producer.target in (torch.ops.aten.addmm.default, torch.addmm):
            continue
        if _fold_pair(graph_module, producer, node):
            folded.append(node.name)
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    return folded


def _tensor_of(graph_module: GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, Node) and node.op == "get_attr":
        return _get_attr(graph_module, str(node.target))
    return None


def _get_attr(root: torch.nn.Module, target: str) -> torch.Tensor:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part)
    assert isinstance(value, torch.Tensor)
    return value


def _fold_pair(graph_module: GraphModule, layer: Node, batch_norm: Node) -> bool:
    args = batch_norm.args
    gamma, beta = _tensor_of(graph_module, args[1]), _tensor_of(graph_module, args[2])
    mean, var = _tensor_of(graph_module, args[3]), _tensor_of(graph_module, args[4])
    if mean is None or var is None:
        return False
    training = args[5] if batch_norm.target is torch.ops.aten.batch_norm.default else False
    if training:
        return False
    eps = float(args[-2] if batch_norm.target is torch.ops.aten.batch_norm.default else args[-1])
    weight_node = layer.args[1]
    weight = _tensor_of(graph_module, weight_node)
    if weight is None or len([u for u in weight_node.users]) != 1:  # type: ignore[union-attr]
        return False
    bias_node = layer.args[2] if len(layer.args) > 2 else None
    bias = _tensor_of(graph_module, bias_node)
    inv_std = torch.rsqrt(var.double() + eps)
    gamma64 = gamma.double() if gamma is not None else torch.ones_like(inv_std)
    beta64 = beta.double() if beta is not None else torch.zeros_like(inv_std)
    factor = gamma64 * inv_std
    shape = [-1] + [1] * (weight.ndim - 1)
    folded_weight = (weight.double() * factor.reshape(shape)).to(weight.dtype)
    old_bias = bias.double() if bias is not None else torch.zeros_like(factor)
    folded_bias = (beta64 + (old_bias - mean.double()) * factor).to(weight.dtype)

    weight_target = str(weight_node.target)  # type: ignore[union-attr]
    with torch.no_grad():
        _get_attr(graph_module, weight_target).copy_(folded_weight)
    if bias is not None and len(bias_node.users) == 1:  # type: ignore[union-attr]
        with torch.no_grad():
            bias.copy_(folded_bias)
    else:
        _attach_bias(graph_module, layer, folded_bias)
    graph_module.meta.setdefault(FOLDED_STATISTICS, {})[layer.name] = FoldedBatchNorm(
        mean=beta64.detach().float(), std=gamma64.detach().abs().float()
    )
    replacement = layer
    if batch_norm.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
        for user in list(batch_norm.users):
            if user.target is operator.getitem and user.args[1] == 0:
                user.replace_all_uses_with(replacement)
                graph_module.graph.erase_node(user)
    batch_norm.replace_all_uses_with(replacement)
    graph_module.graph.erase_node(batch_norm)
    return True


def _attach_bias(graph_module: GraphModule, layer: Node, bias: torch.Tensor) -> None:
    """Give ``layer`` (whose bias argument is absent or shared) its own bias parameter, beside
    its weight."""
    weight_target = str(layer.args[1].target)  # type: ignore[union-attr]
    owner_path, _, leaf = weight_target.rpartition(".")
    owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
    bias_name = _free_attribute(owner, leaf.replace("weight", "bias") or "bias")
    owner.register_parameter(bias_name, torch.nn.Parameter(bias, requires_grad=False))
    with graph_module.graph.inserting_before(layer):
        bias_node = graph_module.graph.get_attr(f"{owner_path}.{bias_name}".lstrip("."))
    padded = list(layer.args) + [None] * max(0, 3 - len(layer.args))
    layer.args = (*padded[:2], bias_node, *padded[3:])


def _free_attribute(owner: torch.nn.Module, name: str) -> str:
    candidate, index = name, 0
    while hasattr(owner, candidate) and getattr(owner, candidate) is not None:
        index += 1
        candidate = f"{name}_{index}"
    return candidate


def fold_bias_adds(graph_module: GraphModule) -> list[str]:
    """Fold ``conv(x, W) + c`` (a bias-less conv/linear followed by an add of a constant with one
    value per output channel) into the layer's bias: ``conv(x, W, c)``.

    Exporters (PaddlePaddle's, for PP-OCR's squeeze-excite convs) write the bias as a separate
    Add; left alone, the layer's output quantizer would sit between the conv and its bias, and
    an integer runtime could not add the bias in its int32 accumulator (white paper eq. 11).
    Returns the names of the folded add nodes.
    """
    folded: list[str] = []
    for node in list(graph_module.graph.nodes):
        if (
            op_kind(node) is not OpKind.ADD
            or len(node.args) != 2
            or node.kwargs.get("alpha", 1) != 1
        ):
            continue
        for layer, constant in (node.args, reversed(node.args)):
            if _fold_bias_add(graph_module, node, layer, constant):
                folded.append(node.name)
                break
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    return folded


def _fold_bias_add(graph_module: GraphModule, add: Node, layer: object, constant: object) -> bool:
    if not (isinstance(layer, Node) and len(layer.users) == 1):
        return False
    if op_kind(layer) not in (OpKind.CONV, OpKind.LINEAR) or layer.target in (
        torch.ops.aten.addmm.default,
        torch.addmm,
    ):
        return False
    if (len(layer.args) > 2 and layer.args[2] is not None) or "bias" in layer.kwargs:
        return False
    weight, value = _tensor_of(graph_module, layer.args[1]), _tensor_of(graph_module, constant)
    output = layer.meta.get("val")
    if weight is None or value is None or not isinstance(output, torch.Tensor):
        return False
    channels = weight.shape[0]
    channel_axis = 1 if op_kind(layer) is OpKind.CONV else output.ndim - 1
    expected = [1] * output.ndim
    expected[channel_axis] = channels
    shape = [1] * (output.ndim - value.ndim) + list(value.shape)
    if value.numel() != channels or shape != expected:
        return False
    _attach_bias(graph_module, layer, value.detach().reshape(channels).to(weight.dtype).clone())
    layer.meta = {**layer.meta, "val": add.meta.get("val", output)}
    add.replace_all_uses_with(layer)
    graph_module.graph.erase_node(add)
    return True


@dataclass(frozen=True)
class _ScalarAffine:
    """A chain ``y -> a*y + b`` of multiplies and adds by scalar constants (PP-LCNetV3's
    learnable affine blocks): ``nodes`` in order, the last one holds the result."""

    nodes: tuple[Node, ...]
    scale: float
    shift: float

    @property
    def last(self) -> Node:
        return self.nodes[-1]

    def source(self, graph_module: GraphModule) -> Node:
        """``y``, read from the graph now (an earlier fold may have rewired it)."""
        step = _affine_step(graph_module, self.nodes[0])
        assert step is not None
        return step[0]


def _scalar_constant(graph_module: GraphModule, node: object) -> float | None:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    value = _tensor_of(graph_module, node)
    if value is None or value.numel() != 1 or not value.is_floating_point():
        return None
    return float(value.reshape(()).item())


def _affine_step(graph_module: GraphModule, node: Node) -> tuple[Node, float, float] | None:
    """``(y, a, b)`` when ``node`` computes ``a*y + b`` with ``a`` or ``b`` a scalar constant."""
    kind = op_kind(node)
    if kind not in (OpKind.ADD, OpKind.MUL) or len(node.args) != 2:
        return None
    if kind is OpKind.ADD and node.kwargs.get("alpha", 1) != 1:
        return None
    for operand, constant in (node.args, tuple(reversed(node.args))):
        value = _scalar_constant(graph_module, constant)
        if isinstance(operand, Node) and value is not None:
            return (operand, value, 0.0) if kind is OpKind.MUL else (operand, 1.0, value)
    return None


def _scalar_affines(graph_module: GraphModule) -> list[_ScalarAffine]:
    """Maximal chains of scalar multiplies/adds, each intermediate used only by the next."""
    chains: list[_ScalarAffine] = []
    claimed: set[Node] = set()
    for node in graph_module.graph.nodes:
        step = None if node in claimed else _affine_step(graph_module, node)
        if step is None:
            continue
        _, scale, shift = step
        nodes = [node]
        while len(nodes[-1].users) == 1:
            (user,) = nodes[-1].users
            next_step = _affine_step(graph_module, user)
            if next_step is None or next_step[0] is not nodes[-1]:
                break
            _, a, b = next_step
            scale, shift = a * scale, a * shift + b
            nodes.append(user)
        claimed.update(nodes)
        chains.append(_ScalarAffine(tuple(nodes), scale, shift))
    return chains


def fold_scalar_affines(graph_module: GraphModule) -> list[str]:
    """Fold scalar affine maps ``z = a*y + b`` into the conv/linear next to them.

    PP-LCNetV3 (PP-OCRv4's backbone) follows each conv and each activation with a learnable
    affine block. Left in the graph, each is a float multiply and add between two quantizers,
    which an integer runtime runs as dequantize-compute-quantize. Both folds keep the FP32
    function exactly (up to float rounding):

    - into the producing layer ``y = W x + c`` (its only user): ``W' = a W``, ``c' = a c + b``;
      a folded batch norm's output statistics become ``N(a β + b, (a γ)²)``;
    - into the consuming layer ``u = W z + c`` (the affine's only user, no zero padding, which
      would be padded after the shift instead of before): ``W' = a W``,
      ``c'_k = c_k + b Σ_{i,kernel} W_{k,i,kernel}``.

    Returns the names of the folded nodes.
    """
    folded: list[str] = []
    for affine in _scalar_affines(graph_module):
        if _fold_into_producer(graph_module, affine) or _fold_into_consumer(graph_module, affine):
            folded.extend(node.name for node in affine.nodes)
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    return folded


def _foldable_layer(graph_module: GraphModule, layer: object) -> torch.Tensor | None:
    """The weight of a conv/linear ``layer`` that is safe to rewrite in place, else None."""
    if not isinstance(layer, Node) or op_kind(layer) not in (OpKind.CONV, OpKind.LINEAR):
        return None
    if layer.target in (torch.ops.aten.addmm.default, torch.addmm) or layer.kwargs:
        return None
    weight_node = layer.args[1]
    weight = _tensor_of(graph_module, weight_node)
    if weight is None or len(weight_node.users) != 1:  # type: ignore[union-attr]
        return None
    bias_node = layer.args[2] if len(layer.args) > 2 else None
    if bias_node is not None and (
        _tensor_of(graph_module, bias_node) is None or len(bias_node.users) != 1  # type: ignore[union-attr]
    ):
        return None
    return weight


def _set_layer_bias(graph_module: GraphModule, layer: Node, bias: torch.Tensor) -> None:
    bias_node = layer.args[2] if len(layer.args) > 2 else None
    if bias_node is None:
        _attach_bias(graph_module, layer, bias)
        return
    with torch.no_grad():
        _get_attr(graph_module, str(bias_node.target)).copy_(bias)  # type: ignore[union-attr]


def _layer_bias(graph_module: GraphModule, layer: Node, weight: torch.Tensor) -> torch.Tensor:
    bias = _tensor_of(graph_module, layer.args[2] if len(layer.args) > 2 else None)
    return bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)


def _fold_into_producer(graph_module: GraphModule, affine: _ScalarAffine) -> bool:
    layer = affine.source(graph_module)
    weight = _foldable_layer(graph_module, layer)
    if weight is None or len(layer.users) != 1:
        return False
    a, b = affine.scale, affine.shift
    new_bias = (a * _layer_bias(graph_module, layer, weight) + b).to(weight.dtype)
    with torch.no_grad():
        weight.mul_(a)
    _set_layer_bias(graph_module, layer, new_bias)
    statistics = folded_statistics(graph_module)
    if layer.name in statistics:
        old = statistics[layer.name]
        statistics[layer.name] = FoldedBatchNorm(mean=a * old.mean + b, std=abs(a) * old.std)
    layer.meta = {**layer.meta, "val": affine.last.meta.get("val", layer.meta.get("val"))}
    affine.last.replace_all_uses_with(layer)
    for node in reversed(affine.nodes):
        graph_module.graph.erase_node(node)
    return True


def _unpadded(layer: Node) -> bool:
    if op_kind(layer) is OpKind.LINEAR:
        return True
    target = layer.target
    if target is torch.ops.aten.convolution.default:
        padding, transposed = layer.args[4], layer.args[6]
        return not transposed and all(int(p) == 0 for p in padding)  # type: ignore[union-attr]
    if getattr(target, "overloadpacket", None) in (
        torch.ops.aten.conv1d,
        torch.ops.aten.conv2d,
        torch.ops.aten.conv3d,
    ):
        padding = layer.args[4] if len(layer.args) > 4 else 0
        if isinstance(padding, str):
            return padding == "valid"
        values = padding if isinstance(padding, (list, tuple)) else [padding]
        return all(int(p) == 0 for p in values)
    return False


def _fold_into_consumer(graph_module: GraphModule, affine: _ScalarAffine) -> bool:
    if len(affine.last.users) != 1:
        return False
    (layer,) = affine.last.users
    weight = _foldable_layer(graph_module, layer)
    if weight is None or layer.args[0] is not affine.last or not _unpadded(layer):
        return False
    a, b = affine.scale, affine.shift
    input_sum = weight.double().reshape(weight.shape[0], -1).sum(dim=1)
    new_bias = (_layer_bias(graph_module, layer, weight) + b * input_sum).to(weight.dtype)
    with torch.no_grad():
        weight.mul_(a)
    _set_layer_bias(graph_module, layer, new_bias)
    layer.args = (affine.source(graph_module), *layer.args[1:])
    for node in reversed(affine.nodes):
        graph_module.graph.erase_node(node)
    return True
