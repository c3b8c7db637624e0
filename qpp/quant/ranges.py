"""Range estimators: from collected statistics to a quantization range ``(q_min, q_max)``.

White paper §3.1 (range setting) and PWLQ §5. Each estimator is a pure function of statistics
and the quantizer spec; observers (``observers.py``) collect the statistics. Every function
works per channel: inputs carry a leading channel dimension and outputs are ``[C]`` tensors.

- ``minmax``: the observed extremes.
- ``percentile[:P]``: the P-th and (100-P)-th percentiles of the histogram (default 99.99).
- ``mse[:P]``: the grid minimising the expected Lp error (default p = 2), white paper eq. (33),
  computed exactly on the histogram under a uniform-within-bin density.
- ``entropy``: the threshold minimising KL(P || Q) between the histogram and its quantized
  version (the TensorRT / ONNX Runtime "Entropy" calibrator).
- ``topk-median``: PWLQ §5, the batch-averaged median of the top-10 values.
- ``cross-entropy``: for output logits, the grid minimising H(softmax(v), softmax(v̂)),
  white paper §3.1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qpp.errors import ConfigError
from qpp.quant.affine import choose_qparams, fake_quantize, grid_limits, integer_range
from qpp.quant.observers import (
    HistogramObserver,
    MinMaxObserver,
    SampleObserver,
    TopKObserver,
    cumulative_at,
)

Range = tuple[torch.Tensor, torch.Tensor]

#: Shrink factors searched by the grid estimators: 1 % to 100 % of the observed extreme.
SEARCH_STEPS = 100


@dataclass(frozen=True)
class Grid:
    """What an estimator needs to know about the quantizer's integer grid."""

    bits: int
    symmetric: bool
    signed: bool

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return choose_qparams(lo, hi, self.bits, self.symmetric, self.signed)


#: ``row_percentile_range`` selects the tails with ``topk`` while they hold at most this share
#: of a row; wider tails sort the row (``torch.quantile``).
TOPK_SHARE = 0.125


def row_percentile_range(rows: torch.Tensor, percentile: float) -> Range:
    """Per row of ``[N, M]``, the ``(100 - P)``-th and ``P``-th percentiles: as
    ``torch.quantile(rows, 1 - P/100, dim=1)`` and ``torch.quantile(rows, P/100, dim=1)``,
    linear interpolation between the order statistics around rank ``q (M - 1)``, with the
    rank in float64 (torch rounds it to the rows' dtype, off by up to 0.06 of a rank at
    M = 1.6M); NaN in a row gives NaN.

    A percentile near 100 needs only the few values of each tail, so ``topk`` selects them in
    one pass where ``torch.quantile`` sorts the row, twice for the two bounds: 5x faster on
    rows of 1.6M elements at P = 99.99 (per-input percentile ranges took 71 % of a per-layer
    sweep on ppocr-det, 2026-12-07)."""
    q = percentile / 100.0
    levels = torch.tensor([1.0 - q, q], dtype=torch.float64)
    columns = rows.shape[1]
    ranks = levels * (columns - 1)
    (low_below, high_below), (low_above, high_above) = (
        ranks.floor().long().tolist(),
        ranks.ceil().long().tolist(),
    )
    tails = (low_above + 1, columns - high_below)
    if not (rows.is_floating_point() and q >= 0.5 and max(tails) <= TOPK_SHARE * columns):
        both = torch.quantile(rows, levels.to(rows.dtype), dim=1)
        return both[0], both[1]
    weights = (ranks - ranks.floor()).to(rows.dtype)
    bottom = rows.topk(tails[0], dim=1, largest=False).values  # ascending: rank i at i
    top = rows.topk(tails[1], dim=1).values  # descending: rank i at columns - 1 - i
    lo = bottom[:, low_below].lerp(bottom[:, low_above], weights[0])
    hi = top[:, columns - 1 - high_below].lerp(top[:, columns - 1 - high_above], weights[1])
    nan = top[:, 0].isnan()  # topk ranks NaN above every value; torch.quantile gives NaN
    if bool(nan.any()):
        lo, hi = lo.masked_fill(nan, math.nan), hi.masked_fill(nan, math.nan)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Estimators on statistics


def minmax_range(minmax: MinMaxObserver) -> Range:
    assert minmax.min is not None and minmax.max is not None
    return minmax.min, minmax.max


def percentile_range(histogram: HistogramObserver, percentile: float = 99.99) -> Range:
    """The ``(100 - P)``-th and ``P``-th percentiles, interpolated within histogram bins."""
    assert histogram.counts is not None and histogram.lo is not None and histogram.hi is not None
    counts, lo, hi = histogram.counts, histogram.lo, histogram.hi
    edges = histogram.edges()
    cumulative = torch.nn.functional.pad(torch.cumsum(counts, dim=1), (1, 0))
    total = cumulative[:, -1:]

    def at_fraction(fraction: float) -> torch.Tensor:
        target = total * fraction
        index = torch.searchsorted(cumulative.contiguous(), target.contiguous()).clamp(
            1, counts.shape[1]
        )
        c_lo = torch.gather(cumulative, 1, index - 1)
        c_hi = torch.gather(cumulative, 1, index)
        e_lo = torch.gather(edges, 1, index - 1)
        e_hi = torch.gather(edges, 1, index)
        t = torch.where(c_hi > c_lo, (target - c_lo) / (c_hi - c_lo), torch.zeros_like(target))
        return (e_lo + t * (e_hi - e_lo))[:, 0]

    upper = at_fraction(percentile / 100.0).float()
    lower = at_fraction(1.0 - percentile / 100.0).float()
    return torch.maximum(lower, lo), torch.minimum(upper, hi)


def _error_primitive(
    x: torch.Tensor, q_lo: torch.Tensor, q_hi: torch.Tensor, scale: torch.Tensor, p: float
) -> torch.Tensor:
    """A primitive in x of ``|x - Q(x)|^p`` for the grid with step ``scale`` on ``[q_lo, q_hi]``.

    Inside the grid the error is periodic: in units of the step, with ``u = y - round(y)``,
    the integral over ``[-1/2, y]`` is ``k c + (sign(u) |u|^(p+1) + (1/2)^(p+1)) / (p + 1)``
    where ``k`` counts whole cells and ``c = 2 (1/2)^(p+1) / (p + 1)`` is one cell's integral.
    Outside, the clipping error integrates to ``|x - q|^(p+1) / (p + 1)``. The pieces join
    continuously, so differences of this function give exact per-bin errors.
    """
    half = 0.5 ** (p + 1)
    cell = 2 * half / (p + 1)
    y_inside = (torch.clamp(x, q_lo, q_hi) - q_lo) / scale
    k = torch.floor(y_inside + 0.5)
    u = y_inside - k
    inside = (k * cell + (torch.sign(u) * _power(u.abs(), p + 1) + half) / (p + 1)) * _power(
        scale, p + 1
    )
    below = _power(torch.clamp(q_lo - x, min=0), p + 1) / (p + 1)
    above = _power(torch.clamp(x - q_hi, min=0), p + 1) / (p + 1)
    return inside - below + above


def histogram_lp_error(
    histogram: HistogramObserver, lo: torch.Tensor, hi: torch.Tensor, grid: Grid, p: float = 2.0
) -> torch.Tensor:
    """Expected ``Σ |x - Q(x)|^p`` over the histogram for candidate ranges ``lo, hi`` ([K, C])."""
    assert histogram.counts is not None
    scale, zero_point = grid.qparams(lo, hi)
    q_lo, q_hi = grid_limits(scale, zero_point, grid.bits, grid.signed)
    edges = histogram.edges()[None]  # [1, C, B+1]
    primitive = _error_primitive(
        edges, q_lo.double()[..., None], q_hi.double()[..., None], scale.double()[..., None], p
    )
    width = (edges[..., 1:] - edges[..., :-1]).clamp(min=1e-30)
    density = histogram.counts[None] / width
    return (density * torch.diff(primitive, dim=-1)).sum(dim=-1)


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent`` for x >= 0, with a multiplication fast path for the cube (p = 2)."""
    return x * x * x if exponent == 3.0 else x**exponent


def grid_search_range(
    error_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lo: torch.Tensor,
    hi: torch.Tensor,
    symmetric: bool,
    smallest: float = 0.005,
    coarse: int = 24,
    fine: int = 7,
    refinements: int = 3,
) -> Range:
    """Per-channel ``argmin error_fn`` over shrunken copies of ``[lo, hi]``, coarse to fine.

    ``error_fn(candidate_lo, candidate_hi)`` takes ``[K, C]`` candidates and returns ``[K, C]``
    errors. The search scales the range by factors: first ``coarse`` geometric steps from
    ``smallest`` to 1, then ``refinements`` rounds of ``fine`` linear steps spanning one step
    of the previous grid on each side of the best factor. One-sided data and symmetric grids
    search one factor; two-sided asymmetric grids search both bounds jointly (on a grid of
    ``coarse/2`` and ``fine - 2`` steps per side, to keep the product small). Channels are
    searched together.
    """
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    two_sided = bool((lo < 0).any() and (hi > 0).any()) and not symmetric
    if two_sided:
        coarse, fine = max(4, coarse // 2), max(3, fine - 2)
    channels = lo.shape[0]
    steps = torch.logspace(math.log10(smallest), 0.0, coarse)
    ratio = (1.0 / smallest) ** (1.0 / (coarse - 1))

    def evaluate(lo_factor: torch.Tensor, hi_factor: torch.Tensor) -> Range:
        errors = _chunked(error_fn, (lo_factor * lo[None], hi_factor * hi[None]))
        best = errors.argmin(dim=0, keepdim=True)
        return torch.gather(lo_factor, 0, best)[0], torch.gather(hi_factor, 0, best)[0]

    def candidates(lo_axis: torch.Tensor, hi_axis: torch.Tensor) -> Range:
        """All (lo, hi) factor pairs for two-sided data, shared factors otherwise: [K, C]."""
        if not two_sided:
            return lo_axis, lo_axis
        k_lo, k_hi = lo_axis.shape[0], hi_axis.shape[0]
        pairs_lo = lo_axis[:, None, :].expand(-1, k_hi, -1).reshape(-1, channels)
        pairs_hi = hi_axis[None, :, :].expand(k_lo, -1, -1).reshape(-1, channels)
        return pairs_lo, pairs_hi

    axis = steps[:, None].expand(-1, channels)
    best_lo, best_hi = evaluate(*candidates(axis, axis))
    widths_lo = best_lo * (ratio - 1.0)
    widths_hi = best_hi * (ratio - 1.0)
    fine |= 1  # an odd count keeps the current best among the candidates
    offsets = torch.linspace(-1.0, 1.0, fine)[:, None]
    for _ in range(refinements):
        lo_axis = (best_lo[None] + offsets * widths_lo[None]).clamp(smallest / 2, 1.0)
        hi_axis = (best_hi[None] + offsets * widths_hi[None]).clamp(smallest / 2, 1.0)
        best_lo, best_hi = evaluate(*candidates(lo_axis, hi_axis))
        widths_lo, widths_hi = widths_lo * 2 / (fine - 1), widths_hi * 2 / (fine - 1)
    return best_lo * lo, best_hi * hi


#: Bins the MSE search evaluates on: the error integral is exact per bin, so merging the
#: observer's bins in groups costs little accuracy and makes the search several times faster.
SEARCH_BINS = 512


def coarsened(histogram: HistogramObserver, bins: int) -> HistogramObserver:
    """The same histogram with adjacent bins summed down to ``bins`` (a divisor of its count)."""
    assert histogram.counts is not None
    if histogram.bins <= bins or histogram.bins % bins:
        return histogram
    merged = HistogramObserver(histogram.axis, bins)
    merged.lo, merged.hi = histogram.lo, histogram.hi
    merged.counts = histogram.counts.reshape(histogram.counts.shape[0], bins, -1).sum(dim=2)
    return merged


def mse_range(histogram: HistogramObserver, grid: Grid, p: float = 2.0) -> Range:
    """``argmin_{q_min, q_max} E|V - V̂|^p`` by grid search (white paper §3.1, MSE range)."""
    assert histogram.lo is not None and histogram.hi is not None
    histogram = coarsened(histogram, SEARCH_BINS)
    return grid_search_range(
        lambda c_lo, c_hi: histogram_lp_error(histogram, c_lo, c_hi, grid, p),
        histogram.lo,
        histogram.hi,
        grid.symmetric,
    )


def _chunked(
    error_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], candidates: Range
) -> torch.Tensor:
    """Evaluate ``error_fn`` over candidate rows in chunks that keep temporaries small."""
    lo, hi = candidates
    chunk = max(1, 2**22 // (lo.shape[1] * 2049))
    return torch.cat(
        [error_fn(lo[i : i + chunk], hi[i : i + chunk]) for i in range(0, lo.shape[0], chunk)]
    )


def entropy_range(histogram: HistogramObserver, grid: Grid) -> Range:
    """The threshold minimising KL(P || Q), as the TensorRT entropy calibrator.

    One-sided data searches ``[0, t]`` with ``2^b`` levels; two-sided data folds the histogram
    to ``|x|`` and searches ``[-t, t]`` with ``2^(b-1)`` levels per side.
    """
    assert histogram.counts is not None and histogram.lo is not None and histogram.hi is not None
    if histogram.counts.shape[0] != 1:
        raise ConfigError(
            "the entropy estimator is per-tensor only; use mse for per-channel ranges"
        )
    lo, hi = histogram.lo, histogram.hi
    one_sided = bool(lo[0] >= 0)
    magnitude = hi if one_sided else torch.maximum(-lo, hi)
    bins = histogram.bins
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[None] * magnitude.double()[:, None]
    counts = torch.diff(cumulative_at(histogram.counts, lo, hi, edges), dim=1)
    if not one_sided:
        negative = cumulative_at(histogram.counts, lo, hi, -edges)
        counts = counts + (negative[:, :-1] - negative[:, 1:])
    levels = 2**grid.bits if one_sided else 2 ** (grid.bits - 1)
    threshold_bin = _kl_threshold_bin(counts[0], levels)
    threshold = magnitude * threshold_bin / bins
    if one_sided:
        return torch.zeros_like(threshold), threshold.float()
    return torch.maximum(lo, -threshold).float(), torch.minimum(hi, threshold).float()


def _kl_threshold_bin(counts: torch.Tensor, levels: int) -> int:
    """The bin count ``i`` whose clipped histogram has the least KL divergence when quantized."""
    bins = counts.shape[0]
    if bins <= levels:
        return bins
    stride = max(1, (bins - levels) // 128)
    best_bin, best_kl = bins, float("inf")
    for i in range(levels, bins + 1, stride):
        reference = counts[:i].clone()
        reference[-1] += counts[i:].sum()
        group = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        group_sum = torch.zeros(levels, dtype=counts.dtype).index_add_(0, group, counts[:i])
        nonzero = (counts[:i] > 0).double()
        group_nonzero = torch.zeros(levels, dtype=counts.dtype).index_add_(0, group, nonzero)
        expanded = torch.where(
            nonzero > 0,
            group_sum[group] / group_nonzero[group].clamp(min=1),
            torch.zeros_like(nonzero),
        )
        p = reference / reference.sum().clamp(min=1e-30)
        q = expanded / expanded.sum().clamp(min=1e-30)
        mask = p > 0
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())
        if kl < best_kl:
            best_bin, best_kl = i, kl
    return best_bin


def topk_median_range(topk: TopKObserver) -> Range:
    """PWLQ §5: the batch-averaged median of the k largest (and smallest) values."""
    return topk.bottom, topk.top


def cross_entropy_range(samples: SampleObserver, grid: Grid) -> Range:
    """``argmin H(softmax(v), softmax(v̂))`` over shrunken ranges (white paper §3.1, logits)."""
    logits = samples.samples()
    reference = torch.softmax(logits, dim=-1)

    def cross_entropy(c_lo: torch.Tensor, c_hi: torch.Tensor) -> torch.Tensor:
        scale, zero_point = grid.qparams(c_lo, c_hi)  # [K, 1]
        quantized = fake_quantize(
            logits[None], scale[:, :, None], zero_point[:, :, None], grid.bits, grid.signed
        )
        log_q = torch.log_softmax(quantized, dim=-1)
        return -(reference[None] * log_q).sum(dim=-1).mean(dim=-1, keepdim=True)

    return grid_search_range(
        cross_entropy, logits.amin()[None], logits.amax()[None], grid.symmetric
    )


# ---------------------------------------------------------------------------------------------
# Weight ranges: computed on the tensor itself, exactly, per channel.


def weight_range(weight: torch.Tensor, axis: int | None, estimator: str, grid: Grid) -> Range:
    """The range of a weight tensor per channel along ``axis`` (or per tensor)."""
    name, argument = parse_estimator(estimator)
    from qpp.quant.observers import channels_first

    rows = channels_first(weight, axis)
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    if name == "minmax":
        return lo, hi
    if name == "percentile":
        return row_percentile_range(rows, argument or 99.99)
    if name == "mse":
        return _weight_mse_range(rows, lo, hi, grid, argument or 2.0)
    raise ConfigError(
        f"estimator '{estimator}' does not apply to weights; use minmax, mse or percentile"
    )


def _weight_mse_range(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: Grid, p: float
) -> Range:
    # Weights rarely need clipping below 10 % of their extreme: a shorter search suffices.
    return rows_mse_range(rows, lo, hi, grid, p, smallest=0.1, coarse=12, fine=6)


def rows_mse_range(
    rows: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    grid: Grid,
    p: float = 2.0,
    smallest: float = 0.005,
    coarse: int = 24,
    fine: int = 7,
) -> Range:
    """Per row of ``rows`` (``[C, M]``), the shrunken copy of ``[lo, hi]`` with the least exact
    Lp quantization error on the row's values (white paper §3.1, MSE range setting)."""

    chunk = max(1, 2**22 // rows.numel())

    def error(c_lo: torch.Tensor, c_hi: torch.Tensor) -> torch.Tensor:
        scale, zero_point = grid.qparams(c_lo, c_hi)
        return torch.cat(
            [
                _row_lp_error(rows, scale[k : k + chunk], zero_point[k : k + chunk], grid, p)
                for k in range(0, scale.shape[0], chunk)
            ]
        )

    return grid_search_range(error, lo, hi, grid.symmetric, smallest, coarse, fine)


def _row_lp_error(
    rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid, p: float
) -> torch.Tensor:
    """Lp error of each row ``[C, M]`` under each of ``K`` candidate encodings ``[K, C]``."""
    qmin, qmax = integer_range(grid.bits, grid.signed)
    scale, zero_point = scale[..., None], zero_point[..., None]
    error = torch.round(rows / scale).add_(zero_point).clamp_(qmin, qmax).sub_(zero_point)
    error.mul_(scale).sub_(rows).abs_()
    return (error.square_() if p == 2.0 else error.pow_(p)).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class EstimatorInfo:
    """Which statistics an activation estimator needs, and how to compute its range."""

    statistics: tuple[str, ...]
    compute: Callable[[dict[str, object], Grid, float | None], Range]


ESTIMATORS: dict[str, EstimatorInfo] = {
    "minmax": EstimatorInfo(("minmax",), lambda s, g, a: minmax_range(s["minmax"])),  # type: ignore[arg-type]
    "percentile": EstimatorInfo(
        ("histogram",),
        lambda s, g, a: percentile_range(s["histogram"], a or 99.99),  # type: ignore[arg-type]
    ),
    "mse": EstimatorInfo(("histogram",), lambda s, g, a: mse_range(s["histogram"], g, a or 2.0)),  # type: ignore[arg-type]
    "entropy": EstimatorInfo(("histogram",), lambda s, g, a: entropy_range(s["histogram"], g)),  # type: ignore[arg-type]
    "topk-median": EstimatorInfo(("topk",), lambda s, g, a: topk_median_range(s["topk"])),  # type: ignore[arg-type]
    "cross-entropy": EstimatorInfo(
        ("samples",),
        lambda s, g, a: cross_entropy_range(s["samples"], g),  # type: ignore[arg-type]
    ),
}


def parse_estimator(estimator: str) -> tuple[str, float | None]:
    """``"percentile:99.9"`` -> ``("percentile", 99.9)``; ``"mse"`` -> ``("mse", None)``."""
    if not isinstance(estimator, str):
        raise ConfigError(
            f"range estimator {estimator!r} is not a name; use one of {', '.join(ESTIMATORS)}"
        )
    name, _, argument = estimator.partition(":")
    if name not in ESTIMATORS:
        raise ConfigError(
            f"unknown range estimator '{estimator}'; use one of {', '.join(ESTIMATORS)} "
            "(percentile and mse take an optional argument, e.g. percentile:99.9, mse:2.4)"
        )
    if not argument:
        return name, None
    try:
        value = float(argument)
    except ValueError:
        raise ConfigError(
            f"estimator argument '{argument}' in '{estimator}' is not a number; "
            f"write e.g. '{name}:{'99.9' if name == 'percentile' else '2.4'}'"
        ) from None
    if name not in ("percentile", "mse"):
        raise ConfigError(f"estimator '{name}' takes no argument; write just '{name}'")
    if name == "percentile" and not 50.0 < value <= 100.0:
        raise ConfigError(
            f"percentile must be in (50, 100], got {value}; write e.g. 'percentile:99.99'"
        )
    if name == "mse" and not 0 < value < math.inf:
        raise ConfigError(
            f"the Lp norm of mse must be positive and finite, got {value}; write e.g. 'mse:2'"
        )
    return name, value


def check_estimator_name(estimator: str) -> None:
    parse_estimator(estimator)


def make_observers(estimator: str, axis: int | None) -> dict[str, object]:
    """Fresh observers for the statistics ``estimator`` needs."""
    name, _ = parse_estimator(estimator)
    factories: dict[str, Callable[[], object]] = {
        "minmax": lambda: MinMaxObserver(axis),
        "histogram": lambda: HistogramObserver(axis),
        "topk": lambda: TopKObserver(axis),
        "samples": lambda: SampleObserver(),
    }
    return {key: factories[key]() for key in ESTIMATORS[name].statistics}


def activation_range(statistics: dict[str, object], estimator: str, grid: Grid) -> Range:
    """The range ``estimator`` picks from collected ``statistics``."""
    name, argument = parse_estimator(estimator)
    return ESTIMATORS[name].compute(statistics, grid, argument)


__all__ = [
    "ESTIMATORS",
    "Grid",
    "activation_range",
    "cross_entropy_range",
    "entropy_range",
    "histogram_lp_error",
    "integer_range",
    "make_observers",
    "minmax_range",
    "mse_range",
    "parse_estimator",
    "percentile_range",
    "row_percentile_range",
    "topk_median_range",
    "weight_range",
]
