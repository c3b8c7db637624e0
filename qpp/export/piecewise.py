"""ONNX export of PWLQ weight quantizers (``qpp.sim.piecewise``), in one of two forms.

- ``branches`` (the default): PWLQ eq. 3 written as a sum of uniform grids. Each channel's
  quantized weight is ``ŵ = Σ_i s_i q_i`` with integer tensors ``q_i`` on per-channel scales
  ``s_i`` (``PiecewiseQuantizer.branches``: one per piece, and the offset ``±p`` of each tail);
  the conv or linear that reads the weight becomes ``y = Σ_i op(x, DQ(q_i))``, each term on
  one int8 weight (the paper's §4 accumulators: P1 products, P2 products, sum of x meeting
  tails). With one breakpoint and the official code's form, the offset ``p = (2^b - 1)/2`` centre
  steps, so it joins the centre branch on half its step: two branches, centre and tail. The bias
  goes on one branch (conv) or after the sum (linear). ONNX Runtime fuses a branch
  ``DQ -> MatMul/Gemm`` with a float output into MatMulIntegerToFloat/QGemm, but not a
  ``DQ -> Conv``: QLinearConv must requantize its own output, which would round each branch
  before the sum. So each conv branch is written as ``ConvInteger -> Cast -> Mul`` (the integer
  products of the quantized input and the branch, times ``s_x s_i``), as ORT's own dynamic
  quantization does. Stored: one int8 per weight per branch.
- ``dequantized``: the PWLQ weight ``ŵ`` as a float initializer (4 bytes per weight); ORT runs
  those layers in float. Exact, and the fallback for weights whose branches do not fit.

Integers of a branch stay within ``±EXACT_BRANCH_LIMIT``, where ORT's u8s8 kernels are exact on
CPUs without VNNI (pairs of ``u8 · s8`` summed in int16); wider PWLQ grids (b > 6) export
dequantized. Nothing here changes the quantizer; ``qpp.export.onnx`` calls the two hooks
``lower_piecewise_weight`` (FX graph) and ``integer_branch_convs`` (ONNX graph).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qpp.errors import ConfigError
from qpp.graph.ops import OpKind, op_kind
from qpp.sim.piecewise import PiecewiseQuantizer

PIECEWISE_EXPORTS = ("branches", "dequantized")
#: Initializer names of branch weights carry this, so the ONNX pass finds their convs.
BRANCH_MARK = "qpp_pwlq_branch"
#: Largest |integer| whose ``u8 · s8`` pair sums stay below 2^15 (255 · 64 · 2 = 32640).
EXACT_BRANCH_LIMIT = 64
#: A merged offset must be this close to a whole number of (half) centre steps.
MERGE_TOLERANCE = 1e-4


def check_piecewise_export(form: str) -> None:
    """Refuse an unknown export form (``--pwlq-export``)."""
    if form not in PIECEWISE_EXPORTS:
        raise ConfigError(
            f"unknown PWLQ export form '{form}'; use one of {', '.join(PIECEWISE_EXPORTS)}"
        )


@dataclass(frozen=True)
class WeightBranch:
    """One uniform term of a PWLQ weight: int8 ``values`` on per-channel ``scale``."""

    values: torch.Tensor
    scale: torch.Tensor


def weight_branches(quantizer: PiecewiseQuantizer, weight: torch.Tensor) -> list[WeightBranch]:
    """``quantizer``'s output on ``weight`` as uniform terms whose dequantized sum it is.

    Each offset term (``±1`` on scale ``p_l``) joins the first term when ``p_l`` is a whole
    number of its steps or half-steps (the centre of the code's form: ``p = 7.5`` steps at
    4 bits), which then keeps twice its integers on half its step. Returns ``[]`` when a term's
    integers exceed ``EXACT_BRANCH_LIMIT``. Scales are per channel along ``branch_axis`` (a
    per-tensor quantizer's repeated).
    """
    axis = branch_axis(quantizer, weight)
    terms = [
        (branch.values.to(torch.int64), branch.scale.double())
        for branch in quantizer.branches(weight)
    ]
    channels = [1] * weight.ndim
    channels[axis] = -1
    first_values, first_scale = terms[0]
    rest = []
    for values, scale in terms[1:]:
        merged = False
        if bool((values.abs() <= 1).all()):  # an offset term
            for factor in (1, 2):
                steps = factor * scale / first_scale
                whole = steps.round()
                exact = bool(((steps - whole).abs() <= MERGE_TOLERANCE).all() and whole.min() >= 1)
                joined = factor * first_values + whole.to(torch.int64).reshape(channels) * values
                if exact and int(joined.abs().max()) <= EXACT_BRANCH_LIMIT:
                    first_values, first_scale = joined, first_scale / factor
                    merged = True
                    break
        if not merged:
            rest.append((values, scale))
    branches = [(first_values, first_scale), *rest]
    if any(int(values.abs().max()) > EXACT_BRANCH_LIMIT for values, _ in branches):
        return []
    count = weight.shape[axis]
    return [
        WeightBranch(values.to(torch.int8), scale.float().reshape(-1).expand(count).contiguous())
        for values, scale in branches
    ]


def branch_axis(quantizer: PiecewiseQuantizer, weight: torch.Tensor) -> int:
    """The axis of the branches' scales: the quantizer's channel axis, or 0 if per tensor."""
    return 0 if quantizer.axis is None else quantizer.axis % weight.ndim


def _buffer(graph_module: GraphModule, stem: str, tensor: torch.Tensor) -> Node:
    name = "qpp_export_" + re.sub(r"\W", "_", stem)
    while hasattr(graph_module, name):
        name += "_"
    graph_module.register_buffer(name, tensor.detach().clone())
    return graph_module.graph.get_attr(name)


def _branch_consumers(node: Node) -> list[Node] | None:
    """The convs and linears reading ``node`` as their weight; ``None`` if anything else
    reads it (a transpose before a matmul, say), which the dequantized form then serves."""
    users = list(node.users)
    for user in users:
        kind = op_kind(user)
        if kind not in (OpKind.CONV, OpKind.LINEAR) or len(user.args) < 2:
            return None
        if user.args[1] is not node or user.args[0] is node:
            return None
    return users


def lower_piecewise_weight(
    graph_module: GraphModule,
    node: Node,
    quantizer: PiecewiseQuantizer,
    weight: torch.Tensor,
    form: str,
) -> tuple[Node, int]:
    """Lower the PWLQ weight quantizer ``node`` (FX) in ``form``; returns the node that replaces
    it (the dequantized weight, for readers the branches do not cover) and the number of
    branches written (0: dequantized)."""
    graph = graph_module.graph
    with graph.inserting_before(node):
        dequantized = _buffer(graph_module, quantizer.name, quantizer(weight).detach().float())
    consumers = _branch_consumers(node) if form == "branches" else None
    branches = weight_branches(quantizer, weight) if consumers else []
    if not consumers or not branches:
        return dequantized, 0
    import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed

    ops = torch.ops.quantized_decomposed
    axis = branch_axis(quantizer, weight)
    for consumer in consumers:
        bias = consumer.args[2] if len(consumer.args) > 2 else consumer.kwargs.get("bias")
        conv = op_kind(consumer) is OpKind.CONV
        with graph.inserting_before(consumer):
            terms = []
            for index, branch in enumerate(branches):
                stem = f"{quantizer.name}.{BRANCH_MARK}{index}"
                stored = _buffer(graph_module, stem, branch.values)
                scales = _buffer(graph_module, f"{stem}.scale", branch.scale)
                zeros = _buffer(graph_module, f"{stem}.zero", torch.zeros_like(branch.scale).long())
                term_weight = graph.call_function(
                    ops.dequantize_per_channel.default,
                    (stored, scales, zeros, axis, -128, 127, torch.int8),
                )
                # Bias on the first conv branch (ConvInteger's pass adds it after the scale);
                # a linear's goes after the sum, where ORT's QGemm/MatMulIntegerToFloat fuse.
                term_bias = bias if conv and index == 0 else None
                args = list(consumer.args)
                args[1] = term_weight
                kwargs = dict(consumer.kwargs)
                if len(args) > 2:
                    args[2] = term_bias
                elif "bias" in kwargs:
                    kwargs["bias"] = term_bias
                terms.append(graph.call_function(consumer.target, tuple(args), kwargs))
            total = terms[0]
            for term in terms[1:]:
                total = graph.call_function(torch.ops.aten.add.Tensor, (total, term))
            if not conv and bias is not None:
                total = graph.call_function(torch.ops.aten.add.Tensor, (total, bias))
        total.meta = dict(consumer.meta)
        consumer.replace_all_uses_with(total)
        graph.erase_node(consumer)
    return dequantized, len(branches)


# --- ONNX: ConvInteger for conv branches --------------------------------------------------------


def integer_branch_convs(proto: object) -> int:
    """Rewrite each branch ``Conv(DQ(x_q), DQ(q_i), [bias])`` of ``proto`` as
    ``ConvInteger(x_q, q_i) -> Cast -> Mul(s_x s_i) [-> Add(bias)]``: the same sum with
    integer products, which ORT runs as it is (it has no QDQ fusion for a float-output conv).
    Convs whose input is not quantized, or whose scales are not constants, stay as they are.
    Returns the number of convs rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph  # type: ignore[attr-defined]
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1

    def constant(name: str) -> np.ndarray | None:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        source = producers.get(name)
        if source is not None and source.op_type == "Constant":
            return numpy_helper.to_array(source.attribute[0].t)
        return None

    rewritten = 0
    nodes = []
    integer_pools: dict[str, str] = {}  # a MaxPool's float output -> the same pool on integers
    for node in graph.node:
        weight_dq = producers.get(node.input[1]) if node.op_type == "Conv" else None
        # Max pooling commutes with quantization: a quantized input may come through pools.
        pools = []
        input_dq = producers.get(node.input[0]) if weight_dq is not None else None
        while input_dq is not None and input_dq.op_type == "MaxPool" and len(pools) < 4:
            pools.append(input_dq)
            input_dq = producers.get(input_dq.input[0])
        if (
            weight_dq is None
            or input_dq is None
            or weight_dq.op_type != "DequantizeLinear"
            or input_dq.op_type != "DequantizeLinear"
            or BRANCH_MARK not in weight_dq.input[0]
            or weight_dq.input[0] not in initializers
            or len(input_dq.input) < 3
        ):
            nodes.append(node)
            continue
        input_scale, input_zero = constant(input_dq.input[1]), constant(input_dq.input[2])
        weight_scale = constant(weight_dq.input[1])
        bias = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if input_scale is None or input_zero is None or input_scale.size != 1:
            nodes.append(node)
            continue
        if weight_scale is None or (has_bias and bias is None):
            nodes.append(node)
            continue
        stem = f"{node.output[0]}_int"
        channels = weight_scale.size
        rank = len(numpy_helper.to_array(initializers[weight_dq.input[0]]).shape)
        shape = [1, channels] + [1] * (rank - 2)
        scale = input_scale.astype(np.float64).reshape(()) * weight_scale.astype(np.float64)
        # uint8 shifted by 128: ORT's u8u8 ConvInteger measured 2-3x faster than u8s8, exact.
        shifted = numpy_helper.to_array(initializers[weight_dq.input[0]]).astype(np.int16) + 128
        new_initializers = [
            numpy_helper.from_array(shifted.astype(np.uint8), f"{stem}_weight"),
            numpy_helper.from_array(np.full((), 128, np.uint8), f"{stem}_weight_zero"),
            numpy_helper.from_array(scale.astype(np.float32).reshape(shape), f"{stem}_scale"),
        ]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        integer_input = input_dq.input[0]
        rewritten_nodes = []
        for pool in reversed(pools):
            if pool.output[0] not in integer_pools:
                integer_pools[pool.output[0]] = f"{pool.output[0]}_int"
                pool_attributes = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
                rewritten_nodes.append(
                    helper.make_node(
                        "MaxPool", [integer_input], [f"{pool.output[0]}_int"], **pool_attributes
                    )
                )
            integer_input = integer_pools[pool.output[0]]
        rewritten_nodes += [
            helper.make_node(
                "ConvInteger",
                [integer_input, f"{stem}_weight", input_dq.input[2], f"{stem}_weight_zero"],
                [f"{stem}_acc"],
                **attributes,
            ),
            helper.make_node("Cast", [f"{stem}_acc"], [f"{stem}_float"], to=1),
        ]
        if bias is None:
            rewritten_nodes.append(
                helper.make_node("Mul", [f"{stem}_float", f"{stem}_scale"], [node.output[0]])
            )
        else:
            new_initializers.append(
                numpy_helper.from_array(bias.astype(np.float32).reshape(shape), f"{stem}_bias")
            )
            rewritten_nodes += [
                helper.make_node("Mul", [f"{stem}_float", f"{stem}_scale"], [f"{stem}_scaled"]),
                helper.make_node("Add", [f"{stem}_scaled", f"{stem}_bias"], [node.output[0]]),
            ]
        graph.initializer.extend(new_initializers)
        nodes += rewritten_nodes
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return rewritten


def _drop_unused(graph: object) -> None:
    """Remove nodes and initializers nothing reads any more (the branch weights' DQs)."""
    outputs = {o.name for o in graph.output}  # type: ignore[attr-defined]
    while True:
        read = {name for n in graph.node for name in n.input} | outputs  # type: ignore[attr-defined]
        dead = [n for n in graph.node if not any(o in read for o in n.output)]  # type: ignore[attr-defined]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)  # type: ignore[attr-defined]
    read = {name for n in graph.node for name in n.input}  # type: ignore[attr-defined]
    unused = [t for t in graph.initializer if t.name not in read]  # type: ignore[attr-defined]
    for tensor in unused:
        graph.initializer.remove(tensor)  # type: ignore[attr-defined]


def piecewise_note(branches: dict[str, int]) -> list[str]:
    """The export report's line on PWLQ weights (none without them)."""
    if not branches:
        return []
    split = [count for count in branches.values() if count]
    dequantized = len(branches) - len(split)
    parts = []
    if split:
        parts.append(
            f"{len(split)} PWLQ weights as {min(split)}-{max(split)} int8 branches each, "
            "summed by ORT (ConvInteger, QGemm, MatMulIntegerToFloat)"
        )
    if dequantized:
        parts.append(
            f"{dequantized} PWLQ weights dequantized to float (ORT's WeightBiasQuantization "
            "re-quantizes those between QDQ activations unless disabled)"
        )
    return ["; ".join(parts)]
