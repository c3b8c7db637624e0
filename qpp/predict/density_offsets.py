"""Fit each Dense+Sparse layer's predicted threshold to the outlier density it should give.

The predictor fits ``log t`` by least squares, but what Dense+Sparse needs is the achieved
outlier density ``d(t) = mean(|x| > t)`` near the target ρ, and ``d`` is not smooth in ``t``:
an activation with an atom (a saturated image background, a clipped ReLU6 or hard-swish, a
constant padding) has a mass of values tied at one magnitude, and a threshold predicted a hair
below it turns the whole mass into outliers (measured on ppocr-det at A4: the network input
and one hard-swish input reached densities of 5 % and 12 % on average, ± 12 % over inputs,
for ρ = 1 %). QPP's point is a steady density (methods.md §1.2: a small QP error changes the
density "exponentially"), so each layer's intercept gets one more term, a log offset ``δ_l``:

    δ_l = argmin_δ  Σ_i (d_i(t̂_i e^δ) - ρ)^2        over calibration samples i,

searched on a grid of multiples of the layer's fit residual σ_l (``OFFSET_STEPS``), and added
to the predictor's intercept, so the saved, loaded and exported predictor carries it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qpp.predict.predictor import LinearQPPredictor
from qpp.predict.qps import QPMode, SampleQuantizer, Scheme, sample_rows
from qpp.report.progress import progress
from qpp.sim.model import QuantizedModel

Batch = Sequence[torch.Tensor]
#: Candidate offsets, in units of the layer's residual σ (log space): from 2σ down to 4σ up
#: (ties sit above the fit more often than below: a threshold must clear the atom).
OFFSET_STEPS = torch.linspace(-2.0, 4.0, 31, dtype=torch.float64)
#: The smallest σ the grid is built on: an exact fit still gets offsets of ~0.1 % steps.
MIN_SIGMA = 1e-3


def densities_above(rows: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``[N, K]``: the fraction of each row's ``|x|`` above each of its ``K`` thresholds."""
    magnitudes = rows.abs().sort(dim=1).values.contiguous()
    limits = thresholds.to(magnitudes.dtype).contiguous()
    inside = torch.searchsorted(magnitudes, limits, right=True)
    return 1.0 - inside.double() / rows.shape[1]


def best_offset(densities: torch.Tensor, offsets: torch.Tensor, target: float) -> int:
    """The index of the offset whose densities ``[S, K]`` are closest to ``target`` in mean
    square; ties go to the smallest ``|offset|``."""
    error = (densities - target).square().mean(dim=0)
    ranked = [(round(float(error[k]), 12), abs(float(offsets[k])), k) for k in range(len(offsets))]
    return min(ranked)[2]


def fit_density_offsets(
    model: QuantizedModel,
    samplers: dict[str, SampleQuantizer],
    predictors: Sequence[LinearQPPredictor],
    batches: Sequence[Batch],
    outlier_fraction: float,
    show_progress: bool = False,
) -> dict[str, float]:
    """Add ``δ_l`` (module docstring) to the intercept of every predicted Dense+Sparse
    threshold; returns the offsets by quantizer name. The predictors must be installed and the
    model in ``predicted`` mode."""
    columns: dict[str, tuple[LinearQPPredictor, int, torch.Tensor]] = {}
    for predictor in predictors:
        for column, (name, kind) in enumerate(predictor.targets):
            sampler = samplers[name]
            if kind != "threshold" or sampler.mode is not QPMode.PREDICTED:
                continue
            sigma = 0.0 if predictor.residual_std is None else float(predictor.residual_std[column])
            columns[name] = (predictor, column, OFFSET_STEPS * max(sigma, MIN_SIGMA))
    if not columns:
        return {}
    trials: dict[str, list[torch.Tensor]] = {name: [] for name in columns}

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sampler = samplers[module.name]  # type: ignore[index]
        if sampler.scheme is not Scheme.DENSE_SPARSE or sampler.predicted is None:
            return
        threshold = sampler.predicted.threshold
        assert threshold is not None
        factors = columns[sampler.name][2].exp()
        candidates = threshold.double()[:, None] * factors[None, :]
        trials[sampler.name].append(densities_above(sample_rows(args[0], sampler.name), candidates))

    # Registered after the predictors' hooks, so a quantizer that is its own predictor's source
    # has its threshold predicted before this hook reads it.
    hooks = [samplers[name].quantizer.register_forward_pre_hook(record) for name in columns]
    try:
        with torch.no_grad():
            for batch in progress(batches, "fit density offsets", show_progress):
                model(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    offsets: dict[str, float] = {}
    for name, (predictor, column, grid) in columns.items():
        if not trials[name]:
            continue
        index = best_offset(torch.cat(trials[name]), grid, outlier_fraction)
        offsets[name] = float(grid[index])
        predictor.weight[0, column] += offsets[name]
    return offsets
