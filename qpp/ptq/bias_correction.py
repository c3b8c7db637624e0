"""Bias correction (white paper §3.3, eq. 16-19; Nagel et al. 2019 §4.2).

Weight quantization biases a layer's output: ``E[ŷ] - E[y] = ΔW E[x]`` with ``ΔW = Ŵ - W``
(eq. 17). Subtracting that expected shift from the bias (eq. 18) makes the quantized layer
unbiased again.

- **Empirical** (eq. 19): the shift is measured on calibration data, per output channel, as
  ``E[ŷ] - E[y]``: the layer's mean output in the quantized model (its input ``x̂`` from the
  already-quantized layers before it) minus its mean output in the float model, over samples
  and positions (so zero padding, strides and upstream errors are all accounted for, as in
  AIMET). Layers are corrected one at a time in graph order, each measured after the
  corrections before it; a layer's measurement stops the forward pass right after it.
- **Analytic** (data-free, for conv-BN[-ReLU] inputs): ``E[x]`` follows from the folded batch
  norm, whose output is ``N(β, γ²)``; after a ReLU it is the clipped normal mean
  ``E[x] = γ N(-β/γ) + β [1 - Φ(-β/γ)]`` (N: standard normal pdf, Φ: cdf). A conv's shift is
  then ``Σ_taps ΔW E[x]`` (exact away from zero-padded borders). Layers whose input does not
  come straight from a batch-normed layer are left alone.

Layers without a bias, or whose weight quantizer is disabled or not yet calibrated, are
skipped (reported with the reason).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from qpp.errors import ConfigError
from qpp.graph.fold import FoldedBatchNorm
from qpp.graph.patterns import WeightLayer, batch_norm_inputs, get_attr, weight_layers
from qpp.ptq.activations import Batch, Recorder, channel_axis, reduce_channels
from qpp.report.progress import progress
from qpp.sim.model import QuantizedModel
from qpp.sim.quantizer import Quantizer

MODES = ("empirical", "analytic")


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """``mode``: ``empirical`` (needs calibration data) or ``analytic`` (BN statistics)."""

    mode: str = "empirical"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"unknown bias correction mode '{self.mode}'; use one of {', '.join(MODES)}"
            )


@dataclass
class BiasCorrectionReport:
    """``corrected``: layer -> mean |shift| removed from its bias; ``skipped``: layer -> why."""

    mode: str
    corrected: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@contextmanager
def float_model(qmodel: QuantizedModel) -> Iterator[None]:
    """Every quantizer off inside the block (the model computes in float); restored after."""
    states = {name: qmodel.quantizer(name).enabled for name in qmodel.names}
    qmodel.set_enabled(False)
    try:
        yield
    finally:
        for name, enabled in states.items():
            qmodel.quantizer(name).enabled = enabled


def weight_quantizers_by_target(qmodel: QuantizedModel) -> dict[str, Quantizer]:
    """Weight attribute path -> the weight quantizer that reads it."""
    found = {}
    for name in qmodel.names:
        quantizer = qmodel.quantizer(name)
        if quantizer.kind.value == "weight":
            found[qmodel.weight_target(name)] = quantizer
    return found


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[ReLU(z)]`` for ``z ~ N(β, γ²)``: ``γ N(-β/γ) + β [1 - Φ(-β/γ)]`` (white paper §3.3)."""
    std = std.double()
    mean = mean.double()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    ratio = -mean / safe
    pdf = torch.exp(-0.5 * ratio**2) / math.sqrt(2 * math.pi)
    value = safe * pdf + mean * (1 - torch.special.ndtr(ratio))
    return torch.where(std > 0, value, mean.clamp(min=0))


def expected_shift(
    layer: WeightLayer, delta: torch.Tensor, input_mean: torch.Tensor
) -> torch.Tensor:
    """``ΔW E[x]`` per output channel, summed over kernel taps (eq. 17)."""
    delta = delta.double()
    if layer.is_conv and layer.groups > 1:
        per_group = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(2)
        inputs = input_mean.reshape(layer.groups, -1)
        outputs_per_group = delta.shape[0] // layer.groups
        grouped = per_group.reshape(layer.groups, outputs_per_group, -1)
        return torch.einsum("goi,gi->go", grouped, inputs).reshape(-1)
    return delta.reshape(delta.shape[0], delta.shape[1], -1).sum(2) @ input_mean.double()


def _candidates(
    qmodel: QuantizedModel, report: BiasCorrectionReport
) -> list[tuple[WeightLayer, Quantizer]]:
    quantizers = weight_quantizers_by_target(qmodel)
    chosen = []
    for layer in weight_layers(qmodel.graph_module):
        quantizer = quantizers.get(layer.weight)
        if layer.bias is None:
            report.skipped[layer.name] = "no bias"
        elif quantizer is None or not quantizer.enabled or not quantizer.calibrated:
            report.skipped[layer.name] = "weight not quantized"
        else:
            chosen.append((layer, quantizer))
    return chosen


def _subtract(graph_module: GraphModule, layer: WeightLayer, shift: torch.Tensor) -> None:
    assert layer.bias is not None
    bias = get_attr(graph_module, layer.bias)
    with torch.no_grad():
        bias.copy_((bias.double() - shift).to(bias))


@torch.no_grad()
def bias_correction(
    qmodel: QuantizedModel,
    data: Sequence[Batch] | None,
    config: BiasCorrectionConfig | None = None,
    show_progress: bool = False,
) -> BiasCorrectionReport:
    """Correct every weight-quantized layer's bias in place (eq. 18); see the module doc."""
    config = config or BiasCorrectionConfig()
    report = BiasCorrectionReport(config.mode)
    layers = _candidates(qmodel, report)
    if config.mode == "empirical":
        if not data:
            raise ConfigError(
                "empirical bias correction needs calibration data; pass batches or use "
                "mode='analytic'"
            )
        shifts = _correct_empirically(qmodel, layers, data, show_progress)
    else:
        shifts = _analytic_shifts(qmodel, layers, report)
        for layer, _ in layers:
            if layer.name in shifts:
                _subtract(qmodel.graph_module, layer, shifts[layer.name])
    report.corrected = {name: float(shift.abs().mean()) for name, shift in shifts.items()}
    return report


def _output_means(
    graph_module: GraphModule, layers: list[WeightLayer], data: Sequence[Batch]
) -> dict[str, torch.Tensor]:
    """Mean output of each layer per output channel over ``data`` (float64)."""
    is_conv = {layer.name: layer.is_conv for layer in layers}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def watch(node: object, _args: tuple[object, ...], output: object) -> None:
        assert isinstance(output, torch.Tensor)
        name = node.name  # type: ignore[attr-defined]
        axis = channel_axis(output, is_conv[name])
        sums[name] = sums.get(name, 0) + reduce_channels(output, axis, "sum")
        counts[name] = counts.get(name, 0) + output.numel() // output.shape[axis]

    Recorder(graph_module, {name: watch for name in is_conv}).run_batches(data)
    return {name: sums[name] / counts[name] for name in sums}


def _correct_empirically(
    qmodel: QuantizedModel,
    layers: list[tuple[WeightLayer, Quantizer]],
    data: Sequence[Batch],
    show_progress: bool,
) -> dict[str, torch.Tensor]:
    """Subtract ``E[ŷ] - E[y]`` from each layer's bias (eq. 19), layer by layer in graph order,
    each measured after the corrections of the layers before it; returns the shifts."""
    chosen = [layer for layer, _ in layers]
    with float_model(qmodel):
        reference = _output_means(qmodel.graph_module, chosen, data)
    shifts: dict[str, torch.Tensor] = {}
    for layer in progress(chosen, "bias correction", show_progress):
        # The pass stops right after this layer, so it costs a partial forward.
        measured = _output_means(qmodel.graph_module, [layer], data)[layer.name]
        shifts[layer.name] = measured - reference[layer.name]
        _subtract(qmodel.graph_module, layer, shifts[layer.name])
    return shifts


def _analytic_shifts(
    qmodel: QuantizedModel,
    layers: list[tuple[WeightLayer, Quantizer]],
    report: BiasCorrectionReport,
) -> dict[str, torch.Tensor]:
    sources = {found.consumer.name: found for found in batch_norm_inputs(qmodel.graph_module)}
    shifts = {}
    for layer, quantizer in layers:
        found = sources.get(layer.name)
        if found is None:
            report.skipped[layer.name] = "input is not a batch-normed layer's output"
            continue
        input_mean = _input_mean(found.statistics, found.through_relu)
        weight = get_attr(qmodel.graph_module, layer.weight)
        with torch.no_grad():
            delta = quantizer(weight) - weight
        shifts[layer.name] = expected_shift(layer, delta, input_mean)
    return shifts


def _input_mean(statistics: FoldedBatchNorm, through_relu: bool) -> torch.Tensor:
    if through_relu:
        return clipped_normal_mean(statistics.mean, statistics.std)
    return statistics.mean.double()
