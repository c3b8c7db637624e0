"""Fit each predicted QP's log offset to the objective its scheme serves.

The predictor fits ``log q`` by least squares, but neither scheme is served by the log QP
itself:

- **Dense+Sparse** needs the achieved outlier density ``d(t) = mean(|x| > t)`` near the target
  ρ, and ``d`` is not smooth in ``t``: an activation with an atom (a saturated image
  background, a clipped ReLU6 or hard-swish, a constant padding) has a mass of values tied at
  one magnitude, and a threshold predicted a hair below it turns the whole mass into outliers
  (measured on ppocr-det at A4: the network input and one hard-swish input reached densities
  of 5 % and 12 % on average, ± 12 % over inputs, for ρ = 1 %). QPP's point is a steady
  density (methods.md §1.2: a small QP error changes the density "exponentially").
- **Uniform** ranges serve the quantization error, which is lopsided in the range: too small
  clips the tail (an error growing with the tail), too large coarsens every step a little.
  Noisy predictions of per-input ranges (MSE ranges are noisy functions of the input) regress
  to a mean range that clips too often.

So each predicted layer's intercept gets one more term, a log offset ``δ_l``, fitted on the
calibration samples ``i`` with the predictors running:

    Dense+Sparse:  δ_l = argmin_δ  Σ_i (d_i(t̂_i e^δ) - ρ)^2
    uniform:       δ_l = argmin_δ  Σ_i ||Q(x_i; [lo_i, hi_i] e^δ) - x_i||^2

searched on a grid of multiples of the layer's fit residual σ_l and added to the predictor's
intercepts (both ``lo`` and ``hi`` of a range), so the saved, loaded and exported predictor
carries it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qpp.predict.predictor import LinearQPPredictor
from qpp.predict.qps import QPMode, SampleQuantizer, Scheme, sample_rows, search_columns
from qpp.quant.affine import choose_qparams, fake_quantize
from qpp.report.progress import progress
from qpp.sim.model import QuantizedModel

Batch = Sequence[torch.Tensor]
#: Dense+Sparse candidate offsets, in units of the layer's residual σ (log space): from 2σ
#: down to 4σ up (ties sit above the fit more often than below: a threshold must clear them).
THRESHOLD_STEPS = torch.linspace(-2.0, 4.0, 31, dtype=torch.float64)
#: Uniform candidate offsets, in units of σ: 3σ either way.
RANGE_STEPS = torch.linspace(-3.0, 3.0, 25, dtype=torch.float64)
#: The smallest σ the grids are built on: an exact fit still gets offsets of ~0.1 % steps.
MIN_SIGMA = 1e-3


def densities_above(rows: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``[N, K]``: the fraction of each row's ``|x|`` above each of its ``K`` thresholds."""
    magnitudes = rows.abs().sort(dim=1).values.contiguous()
    limits = thresholds.to(magnitudes.dtype).contiguous()
    inside = torch.searchsorted(magnitudes, limits, right=True)
    return 1.0 - inside.double() / rows.shape[1]


def range_errors(
    rows: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    factors: torch.Tensor,
    quantizer: SampleQuantizer,
) -> torch.Tensor:
    """``[N, K]``: each row's squared quantization error on ``[lo, hi]`` scaled by each of
    ``factors`` (``[K]``), on the columns an MSE range search reads."""
    subset = rows[:, search_columns(rows.shape[1])]
    spec = quantizer.quantizer.spec
    columns = []
    for factor in factors.tolist():
        scale, zero_point = choose_qparams(
            lo * factor,
            hi * factor,
            spec.bits,
            spec.symmetric,
            spec.is_signed,  # type: ignore[arg-type]
        )
        quantized = fake_quantize(subset, scale, zero_point, spec.bits, spec.is_signed, axis=0)  # type: ignore[arg-type]
        columns.append((quantized - subset).double().square().sum(dim=1))
    return torch.stack(columns, dim=1)


def best_offset(losses: torch.Tensor, offsets: torch.Tensor) -> int:
    """The index of the offset with the least mean loss over samples (``[S, K]``); ties go to
    the smallest ``|offset|``."""
    mean = losses.mean(dim=0)
    scale = float(mean.abs().max()) or 1.0
    ranked = [
        (round(float(mean[k]) / scale, 9), abs(float(offsets[k])), k) for k in range(len(offsets))
    ]
    return min(ranked)[2]


def fit_offsets(
    model: QuantizedModel,
    samplers: dict[str, SampleQuantizer],
    predictors: Sequence[LinearQPPredictor],
    batches: Sequence[Batch],
    outlier_fraction: float,
    show_progress: bool = False,
) -> dict[str, float]:
    """Add ``δ_l`` (module docstring) to the intercepts of every predicted layer; returns the
    offsets by quantizer name. The predictors must be installed and the model in ``predicted``
    mode."""
    found: dict[str, tuple[LinearQPPredictor, list[int], list[float]]] = {}
    for predictor in predictors:
        for column, (name, _) in enumerate(predictor.targets):
            if samplers[name].mode is not QPMode.PREDICTED:
                continue
            entry = found.setdefault(name, (predictor, [], [MIN_SIGMA]))
            entry[1].append(column)
            if predictor.residual_std is not None:
                entry[2].append(float(predictor.residual_std[column]))
    layers = {
        name: (predictor, columns, _steps(samplers[name]) * max(sigmas))
        for name, (predictor, columns, sigmas) in found.items()
    }
    if not layers:
        return {}
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sampler = samplers[module.name]  # type: ignore[index]
        predicted = sampler.predicted
        if predicted is None:
            return
        rows = sample_rows(args[0], sampler.name)
        factors = layers[sampler.name][2].exp()
        if sampler.scheme is Scheme.DENSE_SPARSE:
            assert predicted.threshold is not None
            candidates = predicted.threshold.double()[:, None] * factors[None, :]
            loss = (densities_above(rows, candidates) - outlier_fraction).square()
        else:
            assert predicted.hi is not None
            lo = predicted.lo if predicted.lo is not None else torch.zeros_like(predicted.hi)
            loss = range_errors(rows, lo, predicted.hi, factors, sampler)
        losses[sampler.name].append(loss)

    # Registered after the predictors' hooks, so a quantizer that is its own predictor's source
    # has its QPs predicted before this hook reads them.
    hooks = [samplers[name].quantizer.register_forward_pre_hook(record) for name in layers]
    try:
        with torch.no_grad():
            for batch in progress(batches, "fit QP offsets", show_progress):
                model(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    offsets: dict[str, float] = {}
    for name, (predictor, columns, grid) in layers.items():
        if not losses[name]:
            continue
        offsets[name] = float(grid[best_offset(torch.cat(losses[name]), grid)])
        for column in columns:
            predictor.weight[0, column] += offsets[name]
    return offsets


def _steps(sampler: SampleQuantizer) -> torch.Tensor:
    return THRESHOLD_STEPS if sampler.scheme is Scheme.DENSE_SPARSE else RANGE_STEPS
