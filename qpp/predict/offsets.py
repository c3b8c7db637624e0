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

A predictor with its offset approximates the exact ranges times ``e^δ_l``, not the exact
ranges, so ``dynamic`` mode may run that counterpart (``fit_dynamic_offsets``, and the choice
in ``qpp.predict.activation_qps``): the same uniform objective, fitted on the exact ranges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    predicted = [name for name, sampler in samplers.items() if sampler.mode is QPMode.PREDICTED]
    layers = _layer_columns(predictors, predicted)
    grids = {name: _steps(samplers[name]) * sigma for name, (_, _, sigma) in layers.items()}
    losses = _offset_losses(
        model, samplers, grids, batches, outlier_fraction, False, show_progress, "fit QP offsets"
    )
    offsets: dict[str, float] = {}
    for name, (predictor, columns, _) in layers.items():
        if name not in losses:
            continue
        offsets[name] = float(grids[name][best_offset(losses[name], grids[name])])
        for column in columns:
            predictor.weight[0, column] += offsets[name]
    return offsets


def fit_dynamic_offsets(
    model: QuantizedModel,
    samplers: dict[str, SampleQuantizer],
    predictors: Sequence[LinearQPPredictor],
    estimators: Mapping[str, str],
    batches: Sequence[Batch],
    show_progress: bool = False,
) -> dict[str, float]:
    """The uniform ``δ_l`` of the module docstring for the *exact* per-input ranges of the
    uniform layers of ``estimators`` with those estimators, searched on the same grid as their
    predictors' offsets: the per-layer range factor that makes ``dynamic`` mode the exact
    counterpart of a predictor with its offset. Runs the model in ``dynamic`` mode with every
    ``range_offset`` at 0 and leaves the modes, estimators and offsets as it found them;
    returns the offsets by quantizer name (set none)."""
    uniform = [name for name in estimators if samplers[name].scheme is Scheme.UNIFORM]
    layers = _layer_columns(predictors, uniform)
    grids = {name: RANGE_STEPS * sigma for name, (_, _, sigma) in layers.items()}
    saved = {name: (s.mode, s.estimator, s.range_offset) for name, s in samplers.items()}
    try:
        for name, sampler in samplers.items():
            sampler.mode, sampler.range_offset = QPMode.DYNAMIC, 0.0
            sampler.estimator = estimators.get(name, sampler.estimator)
        losses = _offset_losses(
            model, samplers, grids, batches, 0.0, True, show_progress, "fit dynamic offsets"
        )
    finally:
        for name, (mode, estimator, offset) in saved.items():
            sampler = samplers[name]
            sampler.mode, sampler.estimator, sampler.range_offset = mode, estimator, offset
    return {
        name: float(grid[best_offset(losses[name], grid)])
        for name, grid in grids.items()
        if name in losses
    }


def _layer_columns(
    predictors: Sequence[LinearQPPredictor], names: Sequence[str]
) -> dict[str, tuple[LinearQPPredictor, list[int], float]]:
    """Each of ``names`` that a predictor serves: that predictor, the layer's columns in it,
    and the largest residual σ of those columns (``MIN_SIGMA`` at least)."""
    wanted = set(names)
    found: dict[str, tuple[LinearQPPredictor, list[int], list[float]]] = {}
    for predictor in predictors:
        for column, (name, _) in enumerate(predictor.targets):
            if name not in wanted:
                continue
            entry = found.setdefault(name, (predictor, [], [MIN_SIGMA]))
            entry[1].append(column)
            if predictor.residual_std is not None:
                entry[2].append(float(predictor.residual_std[column]))
    return {name: (p, columns, max(sigmas)) for name, (p, columns, sigmas) in found.items()}


def _offset_losses(
    model: QuantizedModel,
    samplers: dict[str, SampleQuantizer],
    grids: dict[str, torch.Tensor],
    batches: Sequence[Batch],
    outlier_fraction: float,
    exact: bool,
    show_progress: bool,
    label: str,
) -> dict[str, torch.Tensor]:
    """``[S, K]`` per layer of ``grids``: each calibration sample's loss (module docstring)
    with its QPs scaled by each of the layer's ``K`` factors ``e^grid``. The QPs are the
    predicted ones, or with ``exact`` the sampler's exact per-input QPs."""
    if not grids:
        return {}
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in grids}

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sampler = samplers[module.name]  # type: ignore[index]
        rows = sample_rows(args[0], sampler.name)
        qps = sampler.exact_qps(rows) if exact else sampler.predicted
        if qps is None:
            return
        factors = grids[sampler.name].exp()
        if sampler.scheme is Scheme.DENSE_SPARSE:
            assert qps.threshold is not None
            candidates = qps.threshold.double()[:, None] * factors[None, :]
            loss = (densities_above(rows, candidates) - outlier_fraction).square()
        else:
            assert qps.hi is not None
            lo = qps.lo if qps.lo is not None else torch.zeros_like(qps.hi)
            loss = range_errors(rows, lo, qps.hi, factors, sampler)
        losses[sampler.name].append(loss)

    # Registered after the predictors' hooks, so a quantizer that is its own predictor's source
    # has its QPs predicted before this hook reads them.
    hooks = [samplers[name].quantizer.register_forward_pre_hook(record) for name in grids]
    try:
        with torch.no_grad():
            for batch in progress(batches, label, show_progress):
                model(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(found) for name, found in losses.items() if found}


def _steps(sampler: SampleQuantizer) -> torch.Tensor:
    return THRESHOLD_STEPS if sampler.scheme is Scheme.DENSE_SPARSE else RANGE_STEPS
