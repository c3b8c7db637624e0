"""QPP's predictors inside the exported ONNX graph (Kryzhanovskiy et al. 2021, §3).

A run with ``--activation-ranges predicted --scheme uniform`` fake-quantizes each predicted
activation with per-input QPs: a ``LinearQPPredictor`` reads statistics of an earlier tensor
(its source), maps them to ``log q̂`` and ``qpp.quant.affine.choose_qparams`` turns
``[-q̂_lo, q̂_hi]`` into a scale and zero point (white paper eq. 5-7). Here that computation
becomes part of the graph, so the deployed model needs no range reduction at run time:

- ``PredictorModule``: one per predictor, at its source. It reads the predictor's fixed
  subset of the source (one Gather), its features in float64 (ReduceMean for ``mean``; one
  TopK of |x| gives ``max`` and every quantile ``qP``, one TopK of ``Relu(x)`` / ``Relu(-x)``
  the signed ``pos_`` / ``neg_`` ones, the k-th smallest being the
  ``(M - k + 1)``-th largest), the ridge map folded with the standardization into one
  ``MatMul + Add``, ``exp``, and every target quantizer's scale and zero point at once;
- ``PredictedQDQ``: one per predicted activation quantizer, ``QuantizeLinear ->
  DequantizeLinear`` whose scale and zero point are that module's outputs (``qpp`` exports
  ``quantized_decomposed.*.tensor`` with ``TRANSLATIONS``);
- ``integer_kernels_with_input_scales``: ONNX Runtime fuses QDQ into QLinearConv / QGemm only
  for constant scales, so a conv or linear whose quantized input has a predicted scale is
  rewritten as ``ConvInteger`` / ``MatMulInteger -> Cast -> Mul(s_x s_w) [-> Add(bias)]``:
  integer products scaled by the predicted ``s_x``, which ORT runs with integer kernels
  (it fuses the MatMul form into ``MatMulIntegerToFloat``).

Batch 1 only: each input gets its own QPs, and ONNX's per-tensor QuantizeLinear takes one
scale. The predictor computes in float64, as the simulation does, so both round to the same
float32 QPs. Dense+Sparse (a float side tensor of outliers) and dynamic QPs (a reduction per
tensor, what QPP avoids) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qpp.errors import ConfigError
from qpp.export.piecewise import _drop_unused
from qpp.predict.activation_qps import ActivationQPs
from qpp.predict.predictor import (
    SIDES,
    LinearQPPredictor,
    is_ranked,
    quantile_rank,
    round_log_ranges,
    split_feature,
)
from qpp.predict.qps import QPMode, Scheme, column_subset
from qpp.quant.affine import MIN_SCALE
from qpp.sim.quantizer import Quantizer

#: The batch size of an exported graph with predicted QPs.
PREDICTED_BATCH = 1
PREDICTED_NOTE = (
    "{predictors} predictors in the graph compute the QPs of {activations} activations per "
    "input (QPP; their float64 linear maps are {predictors} small MatMuls ORT runs in float); "
    "the graph takes batch {batch}, so run larger batches one input at a time"
)


def check_predicted_export(model_config: object, activation_qps: ActivationQPs | None) -> None:
    """Refuse per-input QPs that an ONNX graph cannot hold: Dense+Sparse, dynamic, or
    predicted without the fitted predictors."""
    mode = getattr(model_config, "activation_ranges", "static")
    scheme = getattr(model_config, "activation_scheme", "uniform")
    if scheme != "uniform":
        raise ConfigError(
            f"Dense+Sparse activations ({mode}, {scheme}) keep outliers in a float side "
            "tensor, which ONNX QDQ cannot express; quantize with --scheme uniform to export"
        )
    if mode == "dynamic":
        raise ConfigError(
            "dynamic activation ranges need a reduction over every tensor at run time, which "
            "this export does not write; quantize with --activation-ranges predicted (or "
            "static) to export"
        )
    if mode == "predicted" and activation_qps is None:
        raise ConfigError(
            "this run predicts its activation QPs, but no fitted predictors were passed to the "
            "export; export the run folder with `qpp export`, or pass activation_qps"
        )


def check_predicted_batch(batch_size: int) -> None:
    """Refuse a batch larger than ``PREDICTED_BATCH`` for a graph with predicted QPs."""
    if batch_size != PREDICTED_BATCH:
        raise ConfigError(
            f"a graph with predicted activation QPs takes batch {PREDICTED_BATCH}, got "
            f"{batch_size}: each input gets its own scales; feed one input at a time"
        )


def predicted_quantizers(activation_qps: ActivationQPs) -> set[str]:
    """Names of the activation quantizers whose QPs a predictor writes."""
    return {
        name
        for name, sampler in activation_qps.samplers.items()
        if sampler.mode is QPMode.PREDICTED and sampler.scheme is Scheme.UNIFORM
    }


class PredictorModule(torch.nn.Module):
    """One predictor as graph ops: source tensor -> (scales, zero points, grid lows, grid
    highs) of its ``K`` target quantizers, ``[K]`` each.

    ``log q̂ = c + Σ_f a_f (φ_f - μ_f) / σ_f`` (``LinearQPPredictor``) is folded into
    ``log q̂ = (c - Σ_f a_f μ_f / σ_f) + φ @ (a / σ)``: the same map in float64, with the
    features in the order the graph computes them (``mean``, ``std``, then those read from
    one TopK per part of x: ``max`` and the quantiles of |x|, then of ``max(x, 0)``
    (``pos_``), then of ``max(-x, 0)`` (``neg_``)). Zero points come out in the 8-bit container type
    when every target shares it (float otherwise), so each QDQ reads them without a Cast.
    """

    def __init__(
        self,
        predictor: LinearQPPredictor,
        quantizers: list[Quantizer],
        nonnegative: dict[str, bool],
        source_elements: int,
    ) -> None:
        super().__init__()
        read = source_elements
        if predictor.max_elements is not None and source_elements > predictor.max_elements:
            read = predictor.max_elements
            self.register_buffer(
                "columns", column_subset(source_elements, predictor.max_elements).clone()
            )
        else:
            self.columns = None
        names = predictor.feature_names
        self.mean = "mean" in names
        self.std = "std" in names
        # One descending TopK per part of x that ranked features read (|x|, max(x, 0),
        # max(-x, 0)): position 0 for max, M - k for the k-th smallest.
        order = [names.index(n) for n in ("mean", "std") if n in names]
        self.sides: list[str] = []
        self.tops: list[int] = []
        for side in ("", *SIDES):
            ranked = [
                n for n in names if split_feature(n)[0] == side and is_ranked(split_feature(n)[1])
            ]
            if not ranked:
                continue
            positions = [read - quantile_rank(split_feature(n)[1], read) for n in ranked]
            self.register_buffer(
                f"positions_{len(self.sides)}", torch.tensor(positions, dtype=torch.int64)
            )
            self.sides.append(side)
            self.tops.append(1 + max(positions))
            order += [names.index(n) for n in ranked]
        weight = predictor.weight.double()
        mean, std = predictor.feature_mean.double(), predictor.feature_std.double()
        slopes = weight[1:] / std[:, None]
        self.register_buffer("slopes", slopes[order].contiguous())
        self.register_buffer("intercepts", weight[0] - (mean / std) @ weight[1:])
        column = {target: i for i, target in enumerate(predictor.targets)}
        zero_slot = len(predictor.targets)
        signs = [-1.0 if kind == "lo" else 1.0 for _, kind in predictor.targets]
        self.register_buffer("signs", torch.tensor(signs, dtype=torch.float32))
        lo_index, hi_index, qmin, qmax, symmetric, signed = [], [], [], [], [], []
        for quantizer in quantizers:
            name = quantizer.name
            if not nonnegative[name] and (name, "lo") not in column:
                raise ConfigError(f"predictor of '{predictor.source}' lacks the range of '{name}'")
            lo_index.append(zero_slot if nonnegative[name] else column[(name, "lo")])
            hi_index.append(column[(name, "hi")])
            low, high = quantizer.integer_range
            qmin.append(float(low))
            qmax.append(float(high))
            symmetric.append(quantizer.spec.symmetric)
            signed.append(bool(quantizer.spec.is_signed))
        self.register_buffer("lo_index", torch.tensor(lo_index, dtype=torch.int64))
        self.register_buffer("hi_index", torch.tensor(hi_index, dtype=torch.int64))
        self.register_buffer("qmin", torch.tensor(qmin, dtype=torch.float32))
        self.register_buffer("qmax", torch.tensor(qmax, dtype=torch.float32))
        self.any_symmetric = any(symmetric)
        self.register_buffer("symmetric", torch.tensor(symmetric))
        self.register_buffer("signed", torch.tensor(signed))
        self.zero_dtype = (
            (torch.int8 if signed[0] else torch.uint8) if len(set(signed)) == 1 else torch.float32
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, F]`` features of the (batch 1) source, as ``qpp.predict.predictor`` computes
        them, in the module's order."""
        rows = x.reshape(1, -1)
        if self.columns is not None:
            rows = rows.index_select(1, self.columns)
        rows = rows.double()
        columns = []
        if self.mean:
            columns.append(rows.mean(dim=1, keepdim=True))
        logs = []
        if self.std:
            logs.append(rows.std(dim=1, correction=0, keepdim=True))
        for index, (side, top) in enumerate(zip(self.sides, self.tops, strict=True)):
            part = rows.abs() if side == "" else (rows if side == "pos_" else -rows).relu()
            values = torch.topk(part, top, dim=1, largest=True, sorted=True).values
            logs.append(values.index_select(1, getattr(self, f"positions_{index}")))
        if logs:
            ranked = logs[0] if len(logs) == 1 else torch.cat(logs, dim=1)
            columns.append(torch.log(ranked.clamp(min=1e-12)))
        return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        log_qps = round_log_ranges(self.intercepts + self.features(x) @ self.slopes)
        qps = torch.exp(log_qps).float().reshape(-1) * self.signs
        padded = torch.cat([qps, torch.zeros(1, dtype=qps.dtype)])
        lo, hi = padded.index_select(0, self.lo_index), padded.index_select(0, self.hi_index)
        # qpp.quant.affine.choose_qparams, one entry per target quantizer.
        scale = torch.clamp((hi - lo) / (self.qmax - self.qmin), min=MIN_SCALE)
        zero_point = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        if self.any_symmetric:
            magnitude = torch.where(self.signed, torch.maximum(-lo, hi), hi)
            symmetric_scale = torch.clamp(magnitude / self.qmax, min=MIN_SCALE)
            scale = torch.where(self.symmetric, symmetric_scale, scale)
            zero_point = torch.where(self.symmetric, torch.zeros_like(zero_point), zero_point)
        low, high = scale * (self.qmin - zero_point), scale * (self.qmax - zero_point)
        return scale, zero_point.to(self.zero_dtype), low, high


class PredictedQDQ(torch.nn.Module):
    """``QuantizeLinear -> DequantizeLinear`` of one activation on the ``index``-th QPs of a
    ``PredictorModule``; a grid narrower than the 8-bit container is clipped first (exact)."""

    def __init__(self, quantizer: Quantizer, index: int) -> None:
        super().__init__()
        self.index = index
        self.qmin, self.qmax = quantizer.integer_range
        self.dtype = torch.int8 if quantizer.spec.is_signed else torch.uint8
        container = torch.iinfo(self.dtype)
        self.clip = (self.qmin, self.qmax) != (container.min, container.max)

    def forward(self, x: torch.Tensor, qps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        import torch.ao.quantization.fx._decomposed

        ops = torch.ops.quantized_decomposed
        scale, zero_point = qps[0][self.index], qps[1][self.index]
        if self.clip:
            x = torch.clamp(x, qps[2][self.index], qps[3][self.index])
        bounds = (self.qmin, self.qmax, self.dtype)
        quantized = ops.quantize_per_tensor.tensor(x, scale, zero_point, *bounds)
        return ops.dequantize_per_tensor.tensor(quantized, scale, zero_point, *bounds)


# --- ONNX translation of the tensor-QP ops -----------------------------------------------------


def _quantize_tensor(input, scale, zero_point, quant_min, quant_max, dtype):  # type: ignore[no-untyped-def]
    from onnxscript import ir
    from onnxscript import opset18 as op

    if zero_point.dtype != ir.DataType(dtype):
        zero_point = op.Cast(zero_point, to=dtype)
    return op.QuantizeLinear(input, scale, zero_point)


def _dequantize_tensor(input, scale, zero_point, quant_min, quant_max, dtype, out_dtype=-1):  # type: ignore[no-untyped-def]
    from onnxscript import ir
    from onnxscript import opset18 as op

    if zero_point.dtype != ir.DataType(dtype):
        zero_point = op.Cast(zero_point, to=dtype)
    return op.DequantizeLinear(input, scale, zero_point)


def translations() -> dict[object, object]:
    """``torch.onnx.export``'s ``custom_translation_table`` entries for QPs held in tensors
    (torch's own translation of these ops takes them as constants)."""
    import torch.ao.quantization.fx._decomposed

    ops = torch.ops.quantized_decomposed
    return {
        ops.quantize_per_tensor.tensor: _quantize_tensor,
        ops.dequantize_per_tensor.tensor: _dequantize_tensor,
    }


# --- ONNX: integer kernels on predicted input scales -------------------------------------------


#: Ops that give the same result on integers as on their dequantized values.
COMMUTING_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})


@dataclass
class _ConstantDQ:
    """A DequantizeLinear of constants (a quantized weight): integers, scale, zero point."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


class _Graph:
    """Look-ups over an ONNX graph: initializers, constants, producers."""

    def __init__(self, graph: object) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}  # type: ignore[attr-defined]
        self.producers = {out: n for n in graph.node for out in n.output}  # type: ignore[attr-defined]
        self.names: set[str] = {out for n in graph.node for out in n.output}  # type: ignore[attr-defined]

    def constant(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        source = self.producers.get(name)
        if source is not None and source.op_type == "Constant":
            return numpy_helper.to_array(source.attribute[0].t)
        return None

    def constant_dq(self, name: str) -> _ConstantDQ | None:
        node = self.producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return None
        values, scale, zero = (self.constant(n) for n in node.input[:3])
        if values is None or scale is None or zero is None or values.dtype == np.int32:
            return None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        return _ConstantDQ(values, scale, zero, axis % max(values.ndim, 1))

    def predicted_dq(self, name: str) -> tuple[object, list[object]] | None:
        """The DequantizeLinear with a computed (predicted) scale that ``name`` comes from,
        through up to four ops that commute with quantization (max pooling, reshapes), and
        those ops."""
        pools: list[object] = []
        node = self.producers.get(name)
        while node is not None and node.op_type in COMMUTING_OPS and len(pools) < 4:
            pools.append(node)
            node = self.producers.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return None
        if self.constant(node.input[1]) is not None:
            return None  # a static scale: ORT's own QDQ fusions serve it
        return node, pools

    def fresh(self, stem: str) -> str:
        name, index = stem, 0
        while name in self.names or name in self.initializers:
            index += 1
            name = f"{stem}_{index}"
        self.names.add(name)
        return name


def _shifted_weight(weight: _ConstantDQ) -> tuple[np.ndarray, int] | None:
    """The weight's integers as uint8 and its one zero point (int8 shifted by 128: ORT's u8u8
    kernels are exact on every x86 CPU), or None for per-channel zero points."""
    zero = np.unique(weight.zero_point.astype(np.int64))
    if zero.size != 1:
        return None
    values = weight.values.astype(np.int16)
    point = int(zero[0])
    if weight.values.dtype == np.int8:
        values, point = values + 128, point + 128
    return values.astype(np.uint8), point


def integer_kernels_with_input_scales(proto: object) -> int:
    """Rewrite each ``Conv`` / ``MatMul`` / ``Gemm`` whose input is ``DequantizeLinear`` with a
    predicted scale: ``Conv(DQ(x_q, s_x, z_x), DQ(w_q, s_w, z_w)) [+ b]`` becomes
    ``ConvInteger(x_q, w_q, z_x, z_w) -> Cast -> Mul(s_x s_w) [-> Add(b)]`` (eq. 11's integer
    accumulator, scaled), and likewise ``MatMulInteger`` for a constant weight or a second
    predicted activation. ORT fuses the MatMul form into ``MatMulIntegerToFloat``.
    Returns the number of layers rewritten."""
    from onnx import helper, numpy_helper

    graph = proto.graph  # type: ignore[attr-defined]
    look = _Graph(graph)
    nodes: list[object] = []
    integer_pools: dict[str, str] = {}
    rewritten = 0

    def integer_input(dq: object, pools: list[object], out: list[object]) -> str:
        name = dq.input[0]  # type: ignore[attr-defined]
        for pool in reversed(pools):
            key = pool.output[0]  # type: ignore[attr-defined]
            if key not in integer_pools:
                integer_pools[key] = look.fresh(f"{key}_int")
                copy = type(pool)()
                copy.CopyFrom(pool)  # type: ignore[attr-defined]
                copy.input[0], copy.output[0] = name, integer_pools[key]
                del copy.output[1:]
                out.append(copy)
            name = integer_pools[key]
        return name

    def initializer(array: np.ndarray, stem: str) -> str:
        name = look.fresh(stem)
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            nodes.append(node)
            continue
        found = look.predicted_dq(node.input[0])
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (
            attributes.get("transA", 0)
            or attributes.get("alpha", 1.0) != 1.0
            or attributes.get("beta", 1.0) != 1.0
        ):
            found = None
        if found is None:
            nodes.append(node)
            continue
        dq, pools = found
        stem = node.output[0]
        added: list[object] = []
        x_int = integer_input(dq, pools, added)
        other_scale = None  # a second predicted activation's scale (a MatMul of two)
        weight, transposed = look.constant_dq(node.input[1]), False
        producer = look.producers.get(node.input[1])
        if weight is None and producer is not None and producer.op_type == "Transpose":
            # A linear on 3-D tokens: MatMul(x, Transpose(DQ(W))).
            perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0])
            weight, transposed = look.constant_dq(producer.input[0]), perm == [1, 0]
            if weight is not None and not transposed:
                weight = None
        if weight is not None:
            shifted = _shifted_weight(weight)
            if shifted is None:
                nodes.append(node)
                continue
            values, point = shifted
            scale = weight.scale.astype(np.float32)
            if node.op_type == "Conv":
                shape = [1, -1] + [1] * (values.ndim - 2)
            else:
                if transposed or (node.op_type == "Gemm" and attributes.get("transB", 0)):
                    values, axis = values.T, 1 - weight.axis
                else:
                    axis = weight.axis
                if scale.size > 1 and axis != values.ndim - 1:
                    nodes.append(node)  # per-row scales of a MatMul's B cannot leave the sum
                    continue
                shape = [-1]
            w_int = initializer(np.ascontiguousarray(values), f"{stem}_weight")
            w_zero = initializer(np.array(point, np.uint8), f"{stem}_weight_zero")
            w_scale = initializer(scale.reshape(shape), f"{stem}_weight_scale")
        elif node.op_type == "MatMul" and look.predicted_dq(node.input[1]) is not None:
            other, other_pools = look.predicted_dq(node.input[1])  # type: ignore[misc]
            w_int = integer_input(other, other_pools, added)
            w_zero, other_scale = other.input[2], other.input[1]  # type: ignore[attr-defined]
            w_scale = other_scale
        else:
            nodes.append(node)
            continue
        kernel = "ConvInteger" if node.op_type == "Conv" else "MatMulInteger"
        kernel_attributes = attributes if node.op_type == "Conv" else {}
        accumulator, as_float = look.fresh(f"{stem}_acc"), look.fresh(f"{stem}_float")
        scale_name, scaled = look.fresh(f"{stem}_scale"), look.fresh(f"{stem}_scaled")
        added += [
            helper.make_node(
                kernel,
                [x_int, w_int, dq.input[2], w_zero],  # type: ignore[attr-defined]
                [accumulator],
                **kernel_attributes,
            ),
            helper.make_node("Cast", [accumulator], [as_float], to=1),
            helper.make_node("Mul", [dq.input[1], w_scale], [scale_name]),  # type: ignore[attr-defined]
        ]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            constant_bias = look.constant(bias)
            if node.op_type == "Conv" and constant_bias is not None:
                bias = initializer(
                    constant_bias.astype(np.float32).reshape([1, -1] + [1] * (values.ndim - 2)),
                    f"{stem}_bias",
                )
            added += [
                helper.make_node("Mul", [as_float, scale_name], [scaled]),
                helper.make_node("Add", [scaled, bias], [node.output[0]]),
            ]
        else:
            added.append(helper.make_node("Mul", [as_float, scale_name], [node.output[0]]))
        nodes += added
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return rewritten
