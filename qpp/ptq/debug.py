"""The white paper's quantization debugging flow (§3.7, Fig. 9), as measurements.

On a calibrated ``QuantizedModel`` and a few samples:

1. FP32 sanity check: every quantizer off must reproduce the float model;
2. weights-only and activations-only quantization against full quantization (which side
   loses the accuracy);
3. per-quantizer sensitivity, twice: each quantizer alone (all others off), and all but that
   one (the gain from keeping it in float);
4. per-quantizer SQNR of the quantized tensor against its input, and a sample of the values
   each quantizer sees, with its grid limits (for range histograms).

Sensitivity is the SQNR (dB) of the model's output against the float model's output on the
same samples: continuous, so a handful of samples suffices, and it applies to any model
(softmax outputs compare as log-probabilities, ``qpp.graph.outputs``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from qpp.graph.outputs import compared_leaves
from qpp.ptq.activations import Batch
from qpp.quant.affine import grid_limits
from qpp.report.progress import progress
from qpp.sim.model import QuantizedModel
from qpp.sim.quantizer import Quantizer


@dataclass(frozen=True)
class AnalysisConfig:
    """``per_quantizer``: run the one-at-a-time and all-but-one sweeps (2 passes each);
    ``histogram_values``: values kept per quantizer for its histogram."""

    per_quantizer: bool = True
    histogram_values: int = 4096
    seed: int = 0


@dataclass
class QuantizerAnalysis:
    name: str
    kind: str
    bits: int
    #: SQNR (dB) of this quantizer's output against its input.
    sqnr_db: float
    #: Output SQNR (dB) of the model with only this quantizer on / with all but this one.
    only_this_db: float = float("nan")
    all_but_this_db: float = float("nan")
    grid_min: float = float("nan")
    grid_max: float = float("nan")
    observed_min: float = float("nan")
    observed_max: float = float("nan")
    #: Output SQNR gained by keeping this quantizer in float: all-but-this minus all (dB).
    gain_db: float = float("nan")


@dataclass
class AnalysisReport:
    """Output SQNR (dB) per mode, and per-quantizer results, most sensitive first."""

    modes: dict[str, float] = field(default_factory=dict)
    quantizers: list[QuantizerAnalysis] = field(default_factory=list)
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)

    def most_sensitive(self, count: int) -> list[QuantizerAnalysis]:
        return self.quantizers[:count]


def sqnr_db(signal: torch.Tensor, quantized: torch.Tensor) -> float:
    """``10 log10(Σ x² / Σ (x - x̂)²)``; ``inf`` when equal."""
    noise = float((signal.double() - quantized.double()).pow(2).sum())
    power = float(signal.double().pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(power, 1e-30) / noise)


def model_outputs(qmodel: QuantizedModel, data: Sequence[Batch]) -> torch.Tensor:
    """Every output value of ``qmodel`` on ``data``, flat, softmax probabilities as their log
    (``qpp.graph.outputs``: a saturated probability hides the margin errors of its input)."""
    with torch.no_grad():
        return torch.cat(
            [
                leaf.reshape(-1)
                for batch in data
                for leaf in compared_leaves(qmodel.graph_module, qmodel(*batch))
            ]
        )


@contextmanager
def enabled_only(qmodel: QuantizedModel, chosen: set[str]) -> Iterator[None]:
    """Only the quantizers named in ``chosen`` (and enabled before) are on inside the block."""
    states = {name: qmodel.quantizer(name).enabled for name in qmodel.names}
    try:
        for name, enabled in states.items():
            qmodel.quantizer(name).enabled = enabled and name in chosen
        yield
    finally:
        for name, enabled in states.items():
            qmodel.quantizer(name).enabled = enabled


def _observe(
    qmodel: QuantizedModel, data: Sequence[Batch], config: AnalysisConfig
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per-quantizer SQNR of output vs input, and a sample of its input values."""
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    samples: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(config.seed)

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        name = module.name  # type: ignore[attr-defined]
        x = inputs[0].detach()
        signal[name] = signal.get(name, 0.0) + float(x.double().pow(2).sum())
        noise[name] = noise.get(name, 0.0) + float((x.double() - output.double()).pow(2).sum())
        flat = x.reshape(-1)
        index = torch.randint(flat.numel(), (config.histogram_values,), generator=generator)
        kept = torch.cat([samples.get(name, torch.empty(0)), flat[index]])
        samples[name] = kept[torch.randperm(kept.numel(), generator=generator)][
            : config.histogram_values
        ]

    quantizers = [qmodel.quantizer(n) for n in qmodel.names if qmodel.quantizer(n).enabled]
    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        model_outputs(qmodel, data)
    finally:
        for handle in handles:
            handle.remove()
    ratios = {
        name: (10 * math.log10(max(signal[name], 1e-30) / noise[name]) if noise[name] else math.inf)
        for name in signal
    }
    return ratios, samples


def _grid(quantizer: Quantizer) -> tuple[float, float]:
    low, high = grid_limits(
        quantizer.scale, quantizer.zero_point, quantizer.spec.bits, quantizer.spec.is_signed
    )
    return float(low.min()), float(high.max())


def mode_quantizers(qmodel: QuantizedModel) -> dict[str, set[str]]:
    """The quantizers that are on in each mode of the debugging flow."""
    names = {n for n in qmodel.names if qmodel.quantizer(n).enabled}
    weights = {n for n in names if qmodel.quantizer(n).kind.value == "weight"}
    return {
        "fp32 (all quantizers off)": set(),
        "weights only": weights,
        "activations only": names - weights,
        "weights and activations": names,
    }


def analyze(
    qmodel: QuantizedModel,
    data: Sequence[Batch],
    config: AnalysisConfig | None = None,
    show_progress: bool = False,
) -> AnalysisReport:
    """Run the debugging flow of white paper Fig. 9 on a calibrated ``qmodel``."""
    config = config or AnalysisConfig()
    names = [n for n in qmodel.names if qmodel.quantizer(n).enabled]
    with enabled_only(qmodel, set()):
        reference = model_outputs(qmodel, data)
    report = AnalysisReport()
    for mode, chosen in mode_quantizers(qmodel).items():
        with enabled_only(qmodel, chosen):
            report.modes[mode] = sqnr_db(reference, model_outputs(qmodel, data))
    full = report.modes["weights and activations"]
    ratios, samples = _observe(qmodel, data, config)
    for name in names:
        quantizer = qmodel.quantizer(name)
        grid_min, grid_max = _grid(quantizer)
        values = samples.get(name, torch.zeros(1))
        report.quantizers.append(
            QuantizerAnalysis(
                name,
                quantizer.kind.value,
                quantizer.spec.bits,
                ratios.get(name, math.nan),
                grid_min=grid_min,
                grid_max=grid_max,
                observed_min=float(values.min()),
                observed_max=float(values.max()),
            )
        )
    report.histograms = samples
    if config.per_quantizer:
        for entry in progress(report.quantizers, "sensitivity", show_progress):
            with enabled_only(qmodel, {entry.name}):
                entry.only_this_db = sqnr_db(reference, model_outputs(qmodel, data))
            with enabled_only(qmodel, set(names) - {entry.name}):
                entry.all_but_this_db = sqnr_db(reference, model_outputs(qmodel, data))
            entry.gain_db = entry.all_but_this_db - full
        # Most sensitive first: the largest gain from keeping the quantizer in float, then the
        # lowest SQNR when it alone is on.
        report.quantizers.sort(key=lambda q: (-q.gain_db, q.only_this_db))
    else:
        report.quantizers.sort(key=lambda q: q.sqnr_db)
    return report
