"""Cross-layer equalization and high-bias absorption (white paper §3.2, Nagel et al. 2019).

For a pair ``W1 -> f -> W2`` with ``f`` positively homogeneous (``f(x/s) = f(x)/s``, s > 0:
ReLU, per-channel scales, per-channel offsets that are scaled too), the re-parameterisation

    Ŵ1 = S⁻¹ W1,  b̂1 = S⁻¹ b1,  Ŵ2 = W2 S,  S = diag(s)               (white paper eq. 11-12)

keeps the function. ``s_i = √(r1_i / r2_i)`` (eq. 13), with ``r1_i`` the range (max |w|) of
output channel ``i`` of W1 and ``r2_i`` that of input channel ``i`` of W2, gives both the range
``√(r1_i r2_i)``: per-tensor weight quantization then wastes no grid on small channels.
Depthwise convs take part on either side; chains of pairs (conv -> depthwise -> conv) are
swept repeatedly until the scales stop changing.

ReLU6 and hardswish are not positively homogeneous (the clip point at 6 does not scale), so qpp
does not equalize through them: Nagel et al. replace ReLU6 by ReLU first, which changes the
FP32 model; qpp keeps FP32 outputs unchanged instead. In the PP-OCR models CLE therefore acts on
the depthwise -> (per-channel affine) -> pointwise pairs; in MiniLM there is nothing to equalize
(its Linear -> GELU -> Linear is not positively homogeneous).

High-bias absorption (§3.2, eq. 14-15): with ``c_i = max(0, min_x (W1 x + b1)_i)``,
``ReLU(W1 x + b1 - c) = ReLU(W1 x + b1) - c`` wherever the pre-activation stays above ``c``, so

    b̂1 = b1 - c,   b̂2 = b2 + W2 c

moves the always-on part of the activation into the next layer's bias. ``c`` comes from the
calibration data (exact on that data) or, data-free, from the folded batch norm:
``c = max(0, β - 3γ)``. For a conv consumer with zero padding, ``W2 c`` is exact away from the
borders only (as in AIMET).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from qpp.graph.fold import folded_statistics
from qpp.graph.patterns import EqualizationPair, WeightLayer, equalization_pairs, get_attr
from qpp.ptq.activations import Batch, Recorder, channel_axis, reduce_channels
from qpp.sim.model import QuantizedModel


@dataclass(frozen=True)
class CLEConfig:
    """``max_sweeps`` passes over all pairs at most; stop when every ``|log s_i| < tolerance``.

    ``absorb_high_bias``: also absorb high biases into the next layer (pairs through one ReLU);
    ``absorption_sigmas``: the data-free rule's ``c = max(0, β - k γ)`` with k = 3.
    """

    max_sweeps: int = 100
    tolerance: float = 1e-6
    absorb_high_bias: bool = True
    absorption_sigmas: float = 3.0


@dataclass
class CLEReport:
    """Which pairs were equalized, how many sweeps it took, and the effect on weight ranges.

    ``range_spread`` is the mean over equalized layers of ``max_i r_i / mean_i r_i`` (r_i: the
    range of output channel i): 1 means every channel uses the whole per-tensor grid.
    """

    pairs: list[str] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = True
    range_spread_before: float = float("nan")
    range_spread_after: float = float("nan")
    absorbed: dict[str, float] = field(default_factory=dict)
    absorption_source: str = "none"


def output_channel_ranges(weight: torch.Tensor) -> torch.Tensor:
    """``r_i = max |W_i|`` over everything but the output channel (dim 0)."""
    return weight.detach().abs().reshape(weight.shape[0], -1).amax(1)


def input_channel_ranges(weight: torch.Tensor, layer: WeightLayer) -> torch.Tensor:
    """Range of each input channel of ``layer``: ``W[:, i]``, or ``W[i]`` for a depthwise conv."""
    if layer.is_conv and layer.groups > 1:
        return output_channel_ranges(weight)
    return weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1)


def range_spread(weight: torch.Tensor) -> float:
    ranges = output_channel_ranges(weight)
    return float(ranges.max() / ranges.mean().clamp(min=1e-12))


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s_i = √(r1_i / r2_i)`` (white paper eq. 13; Nagel et al. 2019 eq. 9); 1 where a range
    is zero (a dead channel has nothing to equalize)."""
    valid = (r1 > 0) & (r2 > 0)
    scales = torch.sqrt(r1.double() / torch.where(valid, r2.double(), 1.0))
    return torch.where(valid, scales, torch.ones_like(scales))


def _scale_along(tensor: torch.Tensor, scales: torch.Tensor, axis: int, divide: bool) -> None:
    shape = [1] * tensor.ndim
    shape[axis] = -1
    factor = scales.reshape(shape)
    with torch.no_grad():
        tensor.copy_((tensor.double() / factor if divide else tensor.double() * factor).to(tensor))


def equalize_pair(graph_module: GraphModule, pair: EqualizationPair) -> torch.Tensor:
    """Rescale one pair in place (eq. 11-13); returns the scales ``s`` used."""
    w1 = get_attr(graph_module, pair.producer.weight)
    w2 = get_attr(graph_module, pair.consumer.weight)
    scales = equalization_scales(output_channel_ranges(w1), input_channel_ranges(w2, pair.consumer))
    _scale_along(w1, scales, 0, divide=True)
    if pair.producer.bias is not None:
        _scale_along(get_attr(graph_module, pair.producer.bias), scales, 0, divide=True)
    for path in pair.offsets:
        offset = get_attr(graph_module, path)
        with torch.no_grad():
            offset.copy_((offset.double() / scales.reshape(offset.shape)).to(offset))
    depthwise = pair.consumer.is_conv and pair.consumer.groups > 1
    _scale_along(w2, scales, 0 if depthwise else 1, divide=False)
    return scales


def absorbable_offsets(
    graph_module: GraphModule,
    pairs: list[EqualizationPair],
    data: Sequence[Batch] | None,
    sigmas: float,
) -> tuple[dict[str, torch.Tensor], str]:
    """``c`` per producer (eq. 14): from the data's per-channel pre-activation minimum, else
    from the folded batch norm (``max(0, β - kγ)``). Keyed by producer node name."""
    candidates = [
        p for p in pairs if p.only_relu and p.producer.bias is not None and p.consumer.bias
    ]
    if not candidates:
        return {}, "none"
    if data:
        minima: dict[str, torch.Tensor] = {}

        def watch(node: object, _args: tuple[object, ...], output: object) -> None:
            assert isinstance(output, torch.Tensor)
            name = node.name  # type: ignore[attr-defined]
            low = reduce_channels(output, channel_axis(output, _is_conv[name]), "min")
            minima[name] = low if name not in minima else torch.minimum(minima[name], low)

        _is_conv = {p.producer.name: p.producer.is_conv for p in candidates}
        Recorder(graph_module, {p.producer.name: watch for p in candidates}).run_batches(data)
        return {k: v.clamp(min=0) for k, v in minima.items()}, "calibration data"
    statistics = folded_statistics(graph_module)
    offsets = {
        p.producer.name: (
            statistics[p.producer.name].mean - sigmas * statistics[p.producer.name].std
        ).clamp(min=0)
        for p in candidates
        if p.producer.name in statistics
    }
    return offsets, "batch-norm statistics" if offsets else "none"


def absorb_high_bias(graph_module: GraphModule, pair: EqualizationPair, c: torch.Tensor) -> None:
    """``b̂1 = b1 - c``, ``b̂2 = b2 + W2 c`` (white paper eq. 14-15)."""
    assert pair.producer.bias is not None and pair.consumer.bias is not None
    b1 = get_attr(graph_module, pair.producer.bias)
    b2 = get_attr(graph_module, pair.consumer.bias)
    w2 = get_attr(graph_module, pair.consumer.weight).double()
    c = c.double()
    if pair.consumer.is_conv and pair.consumer.groups > 1:
        shift = w2.reshape(w2.shape[0], -1).sum(1) * c
    else:
        # Σ over kernel positions: each output sees c_i at every tap (away from zero padding).
        shift = w2.reshape(w2.shape[0], w2.shape[1], -1).sum(2) @ c
    with torch.no_grad():
        b1.copy_((b1.double() - c).to(b1))
        b2.copy_((b2.double() + shift).to(b2))


@torch.no_grad()
def cross_layer_equalization(
    qmodel: QuantizedModel,
    data: Sequence[Batch] | None = None,
    config: CLEConfig | None = None,
) -> CLEReport:
    """Equalize every CLE pair of ``qmodel`` in place, then absorb high biases.

    Run it before calibration: the weight encodings of changed layers are recomputed if they
    were set, but activation encodings are not.
    """
    config = config or CLEConfig()
    graph_module = qmodel.graph_module
    pairs = equalization_pairs(graph_module)
    report = CLEReport(pairs=[f"{p.producer.name} -> {p.consumer.name}" for p in pairs])
    if not pairs:
        return report
    layers = {p.producer.weight for p in pairs} | {p.consumer.weight for p in pairs}
    report.range_spread_before = _mean_spread(graph_module, layers)
    report.converged = False
    for sweep in range(config.max_sweeps):
        largest = 0.0
        for pair in pairs:
            scales = equalize_pair(graph_module, pair)
            largest = max(largest, float(scales.log().abs().max()))
        report.sweeps = sweep + 1
        if largest < config.tolerance:
            report.converged = True
            break
    if config.absorb_high_bias:
        offsets, report.absorption_source = absorbable_offsets(
            graph_module, pairs, data, config.absorption_sigmas
        )
        for pair in pairs:
            c = offsets.get(pair.producer.name)
            if c is not None and bool((c > 0).any()):
                absorb_high_bias(graph_module, pair, c)
                report.absorbed[pair.producer.name] = float(c.mean())
    report.range_spread_after = _mean_spread(graph_module, layers)
    _refresh_weight_encodings(qmodel, layers)
    return report


def _mean_spread(graph_module: GraphModule, weights: set[str]) -> float:
    spreads = [range_spread(get_attr(graph_module, w)) for w in sorted(weights)]
    return sum(spreads) / len(spreads)


def _refresh_weight_encodings(qmodel: QuantizedModel, weights: set[str]) -> None:
    for name in qmodel.names:
        quantizer = qmodel.quantizer(name)
        if quantizer.kind.value != "weight" or not quantizer.calibrated:
            continue
        if qmodel.weight_target(name) in weights:
            quantizer.compute_weight_encoding(qmodel.weight(name))
