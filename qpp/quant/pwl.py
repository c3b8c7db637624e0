"""Piecewise linear quantization (PWLQ), Fang et al., ECCV 2020: the math, no graphs.

A range ``[-m, m]`` is cut at breakpoints ``0 < p_1 < ... < p_K < m`` (K = 1 in the paper's
main text, 2-3 in supplement eq. 1) into pieces on the magnitude ``|x|``; each piece has its own
uniform grid. Three forms:

- ``paper`` (eq. 3): sign plus a ``(b-1)``-bit uniform grid on each piece ``[p_l, p_(l+1)]`` of
  ``|x|``, offset ``p_l``.
- ``non-overlapping`` (the official code's ``pw_opt=2``): a ``b``-bit signed symmetric grid on
  ``[-p_1, p_1]`` and the paper's ``(b-1)``-bit tails.
- ``overlapping`` (``pw_opt=1``): a ``b``-bit signed symmetric grid on ``[-p_(l+1), p_(l+1)]``
  for the values of piece ``l``.

One-sided (unsigned, post-ReLU) data has no sign bit to spend, so every piece gets ``b`` bits
on ``[0, m]``; or on ``[f, m]`` with a floor ``f < 0`` (after hardswish or GELU, whose least
value is a small negative number: ``floored_histogram_search``), zero kept on the centre grid.
Values with ``|x| = p_l`` go to the outer piece (the code's strict comparisons).
Everything works on rows ``[C, N]`` (one per channel) with per-channel ``m`` and breakpoints,
vectorized over channels.

Breakpoints minimise the expected error ``Σ_l s_l²/12 · (G(p_(l+1)) - G(p_l))`` where ``s_l``
is piece ``l``'s step and ``G(p) = P(|x| <= p)``; for the paper form with one breakpoint that is
eq. 4, for several it is supplement eq. 1. ``G`` is a fitted Gaussian or Laplacian or the
empirical distribution (``MagnitudeDistribution``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from qpp.quant.affine import MIN_SCALE, IntegerTensor

FORMS = ("non-overlapping", "paper", "overlapping")
SEARCHES = ("auto", "approx", "bisection", "grid")
DISTRIBUTIONS = ("gaussian", "laplacian", "empirical")
#: What the weight breakpoint searches minimise (``PiecewiseSpec.objective``).
OBJECTIVES = ("weight", "output")
MAX_BREAKPOINTS = 3
#: Rows shorter than this get the grid search: a fitted distribution needs some values.
MIN_FIT_VALUES = 16

# Supplement §1.1 (code ``find_optimal_breakpoint``): p̃* fitted for m̃ in [3, 10].
GAUSSIAN_COEFFICIENT, GAUSSIAN_INTERCEPT = 0.86143114, 0.607901097496529
LAPLACIAN_COEFFICIENT, LAPLACIAN_INTERCEPT = 0.80304483, -0.3166785508381478


def uniform_error_constant(bits: int) -> float:
    """``C(b) = 1 / (12 (2^b - 1)²)``: uniform b-bit error per squared range (paper eq. 2)."""
    return 1.0 / (12.0 * (2**bits - 1) ** 2)


def uniform_reference(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """The official code's b-bit uniform baseline: a signed symmetric grid with step
    ``2m / (2^b - 1)`` over ``[-m, m]``, ``m = max |x|`` per row (paper eq. 1-2)."""
    range_max = rows.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_SCALE)
    step = 2 * range_max / (2**bits - 1)
    clipped = torch.maximum(torch.minimum(rows, range_max), -range_max)
    return torch.clamp(torch.round(clipped / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step


# ---------------------------------------------------------------------------------------------
# The quantizer


@dataclass(frozen=True)
class PieceTables:
    """Per channel and piece: the piece's lower edge on ``|x|``, the grid's offset and step, and
    the largest integer for positive and negative values (``[..., C, K+1]``)."""

    edges: torch.Tensor
    offsets: torch.Tensor
    steps: torch.Tensor
    largest_positive: torch.Tensor
    largest_negative: torch.Tensor


@dataclass(frozen=True)
class PiecewiseGrid:
    """A piecewise linear grid per channel: ``range_max`` ``[..., C]`` (m) and ``breakpoints``
    ``[..., C, K]`` (p_1 < ... < p_K), ``bits`` b, a form from ``FORMS``, signed or one-sided.
    Leading batch dimensions let a search evaluate many candidate grids at once."""

    range_max: torch.Tensor
    breakpoints: torch.Tensor
    bits: int
    form: str = "non-overlapping"
    signed: bool = True
    #: One-sided grids only: the low end ``f <= 0`` per channel ``[..., C]`` (None: 0), where
    #: the centre piece ``[f, p_1]`` starts; values below it clamp to it.
    floor: torch.Tensor | None = None

    @property
    def pieces(self) -> int:
        return self.breakpoints.shape[-1] + 1

    def lowest(self) -> torch.Tensor:
        """The grid's low end per channel ``[..., C, 1]``: ``-m``, or the floor (0 by default)."""
        range_max = self.range_max.clamp(min=MIN_SCALE)[..., None]
        if self.signed:
            return -range_max
        if self.floor is None:
            return torch.zeros_like(range_max)
        return self.floor.to(range_max.dtype).clamp(max=0)[..., None]

    def tables(self) -> PieceTables:
        """Offsets, steps and integer limits of every piece (eq. 3 and the code's forms)."""
        range_max = self.range_max.clamp(min=MIN_SCALE)[..., None]
        zero = torch.zeros_like(range_max)
        low = zero if self.signed else self.lowest()
        breakpoints = torch.minimum(torch.maximum(self.breakpoints, low), range_max)
        edges = torch.cat([low, breakpoints, range_max], dim=-1)
        lower, upper = edges[..., :-1], edges[..., 1:]
        b = self.bits
        pieces = self.pieces
        if not self.signed:
            levels = 2**b - 1
            if self.form == "overlapping":
                offsets, steps = low.expand_as(lower), (upper - low) / levels
            else:
                offsets, steps = lower, (upper - lower) / levels
            largest = torch.full((pieces,), levels)
            return PieceTables(lower, offsets, steps.clamp(min=MIN_SCALE), largest, largest.clone())
        half = 2 ** (b - 1)
        # Symmetric b-bit grids (step 2t / (2^b - 1) on [-t, t]) reach -2^(b-1) below zero.
        symmetric_steps = 2 * upper / (2**b - 1)
        tail_steps = (upper - lower) / (half - 1)
        positive = torch.full((pieces,), half - 1)
        negative = positive.clone()
        if self.form == "paper":
            offsets, steps = lower, tail_steps
        elif self.form == "overlapping":
            offsets, steps = torch.zeros_like(lower), symmetric_steps
            negative[:] = half
        else:
            offsets = torch.cat([zero, lower[..., 1:]], dim=-1)
            steps = torch.cat([symmetric_steps[..., :1], tail_steps[..., 1:]], dim=-1)
            negative[0] = half
        return PieceTables(lower, offsets, steps.clamp(min=MIN_SCALE), positive, negative)

    def regions(self, magnitude: torch.Tensor) -> torch.Tensor:
        """The piece of each value of ``magnitude`` (``[..., C, N]``): how many breakpoints it
        reaches (``|x| = p`` belongs to the outer piece, as the code's strict comparisons)."""
        region = torch.zeros(magnitude.shape, dtype=torch.uint8)
        for index in range(self.breakpoints.shape[-1]):  # K <= 3 breakpoints
            region += magnitude >= self.breakpoints[..., index : index + 1]
        return region

    def _integers(
        self, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per value: sign, piece, integer on that piece's grid, and the piece's offset, step."""
        tables = self.tables()
        magnitude = rows.abs() if self.signed else torch.maximum(rows, self.lowest())
        region = self.regions(magnitude)
        # A chain of selections per piece (K + 1 <= 4) is cheaper than gathers per element.
        offset = tables.offsets[..., :1].to(rows.dtype)
        step = tables.steps[..., :1].to(rows.dtype)
        for piece in range(1, self.pieces):
            outer = region >= piece
            offset = torch.where(
                outer, tables.offsets[..., piece : piece + 1].to(rows.dtype), offset
            )
            step = torch.where(outer, tables.steps[..., piece : piece + 1].to(rows.dtype), step)
        integer = torch.round((magnitude - offset) / step).clamp_(min=0)
        positive, negative = tables.largest_positive, tables.largest_negative
        if torch.equal(positive, negative) and bool((positive == positive[0]).all()):
            integer = integer.clamp_(max=int(positive[0]))
        else:
            largest = torch.where(rows < 0, negative[region.long()], positive[region.long()])
            integer = torch.minimum(integer, largest.to(rows.dtype))
        if self.signed:
            sign = torch.where(rows < 0, -1.0, 1.0).to(rows.dtype)
        else:
            sign = torch.ones_like(rows)
        return sign, region, integer, offset, step

    def quantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``pw(x; b, m, p)`` of eq. 3 (or the code's forms) on rows ``[..., C, N]``, with the
        straight-through gradient: 1 inside the range, 0 outside."""
        sign, region, integer, offset, step = self._integers(rows.detach())
        quantized = sign * (offset + integer * step)
        if not self.signed and self.floor is not None:
            # The floored centre piece as (q - z)·s with its integer zero point z = -f/s, so
            # that zero comes out exactly 0, not f + z·s in floating point.
            zero_point = torch.round(-offset / step)
            centre = (integer - zero_point) * step
            quantized = torch.where(region == 0, centre, quantized)
        range_max = self.range_max.clamp(min=MIN_SCALE)[..., None]
        inside = (rows.detach() >= self.lowest()) & (rows.detach() <= range_max)
        return quantized + (rows - rows.detach()) * inside

    def fake_quantize(self, x: torch.Tensor, axis: int | None) -> torch.Tensor:
        """``x`` on this grid, one row of parameters per slice along ``axis`` (all for None)."""
        rows, restore = _as_rows(x, axis)
        return restore(self.quantize_rows(rows))

    def branches(self, x: torch.Tensor, axis: int | None) -> list[IntegerTensor]:
        """``x`` on this grid as integer tensors whose dequantized sum is ``fake_quantize(x)``.

        One branch per piece (its integers where ``x`` falls in the piece, 0 elsewhere, on the
        piece's step) plus, for pieces with an offset, a ternary branch ``sign · 1`` on scale
        ``p_l``: the paper's hardware (§4) accumulates the products of each piece and the sum of
        activations meeting offset pieces. All branches are symmetric (zero point 0), per
        channel along ``axis``.
        """
        if not self.signed and self.floor is not None and bool((self.floor < 0).any()):
            raise ValueError("a floored PWLQ grid (activations) has no symmetric branches")
        rows, restore = _as_rows(x.detach(), axis)
        tables = self.tables()
        sign, region, integer, _, _ = self._integers(rows)
        bits = self.bits if self.signed else self.bits + 1
        result = []
        for piece in range(self.pieces):
            inside = region == piece
            values = torch.where(inside, sign * integer, torch.zeros_like(integer))
            scale = tables.steps[..., piece]
            result.append(_branch(restore(values), scale, bits, axis))
            offset = tables.offsets[..., piece]
            if bool((offset > 0).any()):
                ternary = torch.where(inside, sign, torch.zeros_like(sign))
                result.append(_branch(restore(ternary), offset.clamp(min=MIN_SCALE), 2, axis))
        return result


def _branch(
    values: torch.Tensor, scale: torch.Tensor, bits: int, axis: int | None
) -> IntegerTensor:
    scale = scale.reshape(()) if axis is None else scale
    return IntegerTensor(values.to(torch.int32), scale, torch.zeros_like(scale), bits, True, axis)


def _as_rows(x: torch.Tensor, axis: int | None):  # type: ignore[no-untyped-def]
    """``x`` as ``[C, N]`` rows, and the function that puts rows back into ``x``'s shape."""
    if axis is None:
        return x.reshape(1, -1), lambda rows: rows.reshape(x.shape)
    moved = x.movedim(axis, 0)
    return moved.reshape(moved.shape[0], -1), lambda rows: rows.reshape(moved.shape).movedim(
        0, axis
    )


# ---------------------------------------------------------------------------------------------
# Magnitude distributions G(p) = P(|x| <= p)


class MagnitudeDistribution(Protocol):
    """``cdf(p)``: ``P(|x| <= p)`` per channel for points ``p`` ``[C, J]``; ``smoothing``
    ``[C]``: the half-width of the central differences taken of the expected error."""

    smoothing: torch.Tensor

    def cdf(self, points: torch.Tensor) -> torch.Tensor: ...


class GaussianMagnitude:
    """``|x|`` for ``x ~ N(0, σ²)``: ``G(p) = erf(p / (σ√2))``."""

    def __init__(self, std: torch.Tensor) -> None:
        self.std = std.double().clamp(min=MIN_SCALE)
        self.smoothing = 1e-5 * self.std

    def cdf(self, points: torch.Tensor) -> torch.Tensor:
        return torch.erf(points.double().clamp(min=0) / (self.std[:, None] * math.sqrt(2.0)))


class LaplacianMagnitude:
    """``|x|`` for a Laplacian of standard deviation σ (scale σ/√2): ``G(p) = 1 - e^(-p√2/σ)``."""

    def __init__(self, std: torch.Tensor) -> None:
        self.std = std.double().clamp(min=MIN_SCALE)
        self.smoothing = 1e-5 * self.std

    def cdf(self, points: torch.Tensor) -> torch.Tensor:
        scale = self.std[:, None] / math.sqrt(2.0)
        return 1.0 - torch.exp(-points.double().clamp(min=0) / scale)


class EmpiricalMagnitude:
    """The empirical distribution of ``|x|`` per row of ``rows`` ``[C, N]``, smoothed.

    Eq. 6 needs a density, which a step CDF lacks; so ``G`` is the empirical CDF averaged over
    a window ``[p - h, p + h]`` with Silverman's bandwidth ``h = 1.06 σ N^(-1/5)``, computed
    exactly from prefix sums of the sorted magnitudes: ``∫_0^p G_N = (k p - S_k) / N`` with
    ``k`` the count of magnitudes ``<= p`` and ``S_k`` their sum.
    """

    def __init__(self, rows: torch.Tensor, signed: bool = True) -> None:
        values = rows.detach().double()
        magnitude = values.abs() if signed else values.clamp(min=0)
        self.sorted = magnitude.sort(dim=1).values.contiguous()
        self.prefix = torch.nn.functional.pad(torch.cumsum(self.sorted, dim=1), (1, 0))
        count = rows.shape[1]
        spread = values.std(dim=1) if count > 1 else magnitude.amax(dim=1)
        self.bandwidth = (1.06 * spread * count ** (-0.2)).clamp(min=MIN_SCALE)
        self.smoothing = self.bandwidth / 4

    def _integral(self, points: torch.Tensor) -> torch.Tensor:
        below = torch.searchsorted(self.sorted, points.contiguous(), right=True)
        total = torch.gather(self.prefix, 1, below)
        return (below * points - total) / self.sorted.shape[1]

    def cdf(self, points: torch.Tensor) -> torch.Tensor:
        points = points.double()
        h = self.bandwidth[:, None]
        return (self._integral(points + h) - self._integral(points - h)) / (2 * h)


class HistogramMagnitude:
    """``|x|`` of data summarised by a histogram (``counts`` ``[C, B]`` over ``[lo, hi]``),
    uniform within bins; the activation quantizer's calibration statistics."""

    def __init__(
        self, counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, signed: bool
    ) -> None:
        self.counts, self.lo, self.hi, self.signed = counts.double(), lo, hi, signed
        self.total = counts.sum(dim=1).clamp(min=1e-30)
        centres = (
            lo.double()[:, None]
            + (hi - lo).double()[:, None]
            * (torch.arange(counts.shape[1], dtype=torch.float64) + 0.5)
            / counts.shape[1]
        )
        mean = (counts * centres).sum(dim=1) / self.total
        spread = ((counts * (centres - mean[:, None]) ** 2).sum(dim=1) / self.total).sqrt()
        bin_width = (hi - lo).double() / counts.shape[1]
        self.rms = (spread**2 + mean**2).sqrt()
        self.smoothing = torch.maximum(1.06 * spread * self.total ** (-0.2), bin_width)

    def cdf(self, points: torch.Tensor) -> torch.Tensor:
        from qpp.quant.observers import cumulative_at

        points = points.double().clamp(min=0)
        inside = cumulative_at(self.counts, self.lo, self.hi, points)
        if self.signed:
            inside = inside - cumulative_at(self.counts, self.lo, self.hi, -points)
        return inside / self.total[:, None]


def fitted_distribution(
    name: str, rows: torch.Tensor, signed: bool = True
) -> MagnitudeDistribution:
    """The magnitude distribution ``name`` from ``DISTRIBUTIONS`` fitted to ``rows``."""
    if name == "empirical":
        return EmpiricalMagnitude(rows, signed)
    std = rows.double().std(dim=1) if rows.shape[1] > 1 else rows.double().abs().amax(dim=1)
    return GaussianMagnitude(std) if name == "gaussian" else LaplacianMagnitude(std)


# ---------------------------------------------------------------------------------------------
# Expected error and breakpoint selection


def expected_error(grid: PiecewiseGrid, distribution: MagnitudeDistribution) -> torch.Tensor:
    """``E = Σ_l s_l²/12 · (G(p_(l+1)) - G(p_l))`` per channel ``[C]``, ``G(m) = 1``.

    For the paper form, one breakpoint: eq. 4, ``C(b-1)[(m-p)² + m(2p-m)(2F(p)-1)]``; several
    breakpoints: supplement eq. 1.
    """
    tables = grid.tables()
    range_max = grid.range_max.double().clamp(min=MIN_SCALE)[..., None]
    edges = torch.cat([tables.edges.double(), range_max], dim=-1)
    shape = edges.shape
    # The distribution takes [C, J] points; candidates on leading dims go to the point axis.
    flat = edges.movedim(-2, 0).reshape(shape[-2], -1)
    cdf = distribution.cdf(flat).reshape(shape[-2], *shape[:-2], shape[-1])
    # G(0) = 0, and all data lies within [-m, m] (m = max|x|): the outer piece holds 1 - G(p_K).
    cdf[..., 0], cdf[..., -1] = 0.0, 1.0
    mass = torch.diff(cdf, dim=-1).movedim(0, -2)
    return (tables.steps.double() ** 2 / 12.0 * mass).sum(dim=-1)


def eq4_error(
    range_max: torch.Tensor, breakpoint_: torch.Tensor, bits: int, cdf_at_breakpoint: torch.Tensor
) -> torch.Tensor:
    """Paper eq. 4, ``C(b-1)[(m-p)² + m(2p-m)(2F(p)-1)]``, with ``F`` the signed CDF at p."""
    m, p = range_max, breakpoint_
    return uniform_error_constant(bits - 1) * (
        (m - p) ** 2 + m * (2 * p - m) * (2 * cdf_at_breakpoint - 1)
    )


def approximate_breakpoint(normalised_range: torch.Tensor, distribution: str) -> torch.Tensor:
    """The closed-form optimum of supplement §1.1 in units of σ: ``p̃* = ln(0.8614 m̃ + 0.6079)``
    (Gaussian) or ``0.8030 √m̃ - 0.3167`` (Laplacian), ``m̃ = m/σ``. The paper prints it as
    ``p*/m``; the code (and the numbers) give ``p̃*`` itself, so ``p* = p̃* σ``."""
    m = normalised_range.double()
    if distribution == "gaussian":
        return torch.log(GAUSSIAN_COEFFICIENT * m + GAUSSIAN_INTERCEPT)
    if distribution == "laplacian":
        return LAPLACIAN_COEFFICIENT * m.clamp(min=0).sqrt() + LAPLACIAN_INTERCEPT
    raise ValueError(f"no closed-form breakpoint for the '{distribution}' distribution")


def _derivative(
    grid: PiecewiseGrid, distribution: MagnitudeDistribution, index: int
) -> torch.Tensor:
    """``∂E/∂p_index`` per channel by a central difference of ``expected_error`` (eq. 6 for the
    paper form: ``2C(b-1)[p - 2m + 2mF(p) + m(2p-m)f(p)]``, f smoothed for empirical data)."""
    step = torch.zeros_like(grid.breakpoints.double())
    step[..., index] = distribution.smoothing
    shifted = [
        PiecewiseGrid(
            grid.range_max, grid.breakpoints + sign * step, grid.bits, grid.form, grid.signed
        )
        for sign in (1.0, -1.0)
    ]
    above, below = (expected_error(g, distribution) for g in shifted)
    return (above - below) / (2 * distribution.smoothing)


def initial_breakpoints(range_max: torch.Tensor, count: int) -> torch.Tensor:
    """``m/2`` for one breakpoint; ``m/2^(K+1-l)`` for several (bell shapes put them inward)."""
    ratios = 0.5 ** torch.arange(count, 0, -1, dtype=torch.float64)
    return range_max.double()[:, None] * ratios[None]


def bisection_breakpoints(
    range_max: torch.Tensor,
    distribution: MagnitudeDistribution,
    bits: int,
    form: str = "non-overlapping",
    signed: bool = True,
    count: int = 1,
    iterations: int = 36,
    sweeps: int = 4,
) -> torch.Tensor:
    """Breakpoints ``[C, K]`` where the expected error is stationary, by bisection (paper eq. 6,
    code ``binary_search``), all channels at once.

    One breakpoint is searched in ``(0, m/2]`` (Lemma 1: E is convex there; ``p = m/2`` gives
    the uniform grid) for the paper and non-overlapping forms, in ``(0, m]`` for the
    overlapping one. Several breakpoints (supplement eq. 1) are solved coordinate-wise: each
    sweep bisects every ``p_l`` in ``(p_(l-1), p_(l+1))`` with the others fixed.
    """
    range_max = range_max.double().clamp(min=MIN_SCALE)
    breakpoints = initial_breakpoints(range_max, count)
    upper_limit = range_max if count > 1 or form == "overlapping" else range_max / 2
    for _ in range(sweeps if count > 1 else 1):
        for index in range(count):
            low = breakpoints[:, index - 1] if index > 0 else torch.zeros_like(range_max)
            high = breakpoints[:, index + 1] if index + 1 < count else upper_limit
            for _ in range(iterations):
                middle = (low + high) / 2
                breakpoints = breakpoints.clone()
                breakpoints[:, index] = middle
                grid = PiecewiseGrid(range_max, breakpoints, bits, form, signed)
                rising = _derivative(grid, distribution, index) > 0
                high = torch.where(rising, middle, high)
                low = torch.where(rising, low, middle)
            breakpoints[:, index] = (low + high) / 2
    return breakpoints


def grid_search_breakpoints(
    rows: torch.Tensor,
    range_max: torch.Tensor,
    bits: int,
    form: str = "non-overlapping",
    signed: bool = True,
    start: torch.Tensor | None = None,
    sweeps: int = 2,
    corrected: bool = False,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Breakpoints minimising the actual L2 error ``||pw(w) - w||₂`` per channel, coarse to
    fine (supplement Algorithm 1, code ``pwlq_coarse2fine_grid_search``): ratios ``p/m`` in
    ``0.1, ..., 0.9``, then ±0.1 around the best in steps of 0.01, then ±0.01 in 0.001.

    With several breakpoints each is searched in turn within its neighbours, from ``start``
    (e.g. the bisection solution), ``sweeps`` times. Candidates loop, channels are vectorized.
    ``corrected``: minimise the error after the paper's bias correction instead (``row_errors``);
    ``gram``: minimise the layer's output error on data instead of the weight error.
    """
    range_max = range_max.double().clamp(min=MIN_SCALE)
    rows = rows.detach().float()
    if start is None:
        start = initial_breakpoints(range_max, 1)
    breakpoints = start.double().clone()
    count = breakpoints.shape[1]

    def error(candidate: torch.Tensor) -> torch.Tensor:
        grid = PiecewiseGrid(range_max.float(), candidate.float(), bits, form, signed)
        return row_errors(grid, rows, corrected, gram)

    for _ in range(sweeps if count > 1 else 1):
        for index in range(count):
            low = breakpoints[:, index - 1] if index > 0 else torch.zeros_like(range_max)
            high = breakpoints[:, index + 1] if index + 1 < count else range_max
            best_error = error(breakpoints) if count > 1 else torch.full_like(range_max, math.inf)
            best_ratio = breakpoints[:, index] / range_max
            centre = torch.full_like(range_max, 0.5)
            for stage, (step, reach) in enumerate(((0.1, 0.4), (0.01, 0.1), (0.001, 0.01))):
                if stage == 0 and count == 1:
                    offsets = torch.arange(-4, 5, dtype=torch.float64) * step  # 0.1 ... 0.9
                else:
                    offsets = torch.arange(-round(reach / step), round(reach / step) + 1) * step
                centre = centre if stage == 0 and count == 1 else best_ratio
                for offset in offsets.tolist():
                    ratio = centre + offset
                    value = ratio * range_max
                    valid = (value > low) & (value < high)
                    candidate = breakpoints.clone()
                    candidate[:, index] = torch.where(valid, value, breakpoints[:, index])
                    current = torch.where(valid, error(candidate), torch.inf)
                    better = current < best_error
                    best_error = torch.where(better, current, best_error)
                    best_ratio = torch.where(better, ratio, best_ratio)
            breakpoints[:, index] = best_ratio * range_max
    return breakpoints


def choose_breakpoints(
    rows: torch.Tensor,
    bits: int,
    form: str = "non-overlapping",
    count: int = 1,
    search: str = "auto",
    distribution: str = "gaussian",
    signed: bool = True,
    range_max: torch.Tensor | None = None,
    bias_correction: bool = False,
    gram: torch.Tensor | None = None,
) -> PiecewiseGrid:
    """The PWLQ grid of each row of ``rows`` ``[C, N]``: ``m = max|x|`` (unless given) and the
    breakpoints by ``search``:

    - ``approx``: the closed form of supplement §1.1 with σ the row's standard deviation
      (``distribution`` gaussian or laplacian); for several breakpoints, which have no closed
      form, the bisection on the fitted distribution.
    - ``bisection``: eq. 6 solved on the ``distribution`` (fitted, or the empirical one).
    - ``grid``: the coarse-to-fine search on the actual L2 error (several breakpoints start
      from the bisection solution).
    - ``auto`` (ours, not the paper's): per channel, the better of the model-based breakpoint
      (``approx``; ``bisection`` for several breakpoints or the empirical distribution) and
      the coarse-to-fine search from it, both judged by the actual L2 error of the weights as
      they will be used: after the bias correction when ``bias_correction`` is on. With
      ``gram`` (the layer's input second moments, see ``row_errors``) both searches judge
      candidates by the layer's output error on that data instead (ours, not the paper's).

    Rows of fewer than ``MIN_FIT_VALUES`` values (1x1 convolutions over a few channels) are too
    short to fit a distribution to; they always use the grid search, which is cheap there.
    """
    rows = rows.detach().float()
    if rows.shape[1] < MIN_FIT_VALUES and search not in ("grid", "auto"):
        search = "grid"
    magnitude = rows.abs() if signed else rows.clamp(min=0)
    if range_max is None:
        range_max = magnitude.amax(dim=1)
    range_max = range_max.double().clamp(min=MIN_SCALE)
    if search == "auto":
        model_based = "approx" if distribution != "empirical" else "bisection"
        start = choose_breakpoints(
            rows, bits, form, count, model_based, distribution, signed, range_max
        ).breakpoints.double()
        searched = grid_search_breakpoints(
            rows,
            range_max,
            bits,
            form,
            signed,
            start=start if count > 1 else None,
            corrected=bias_correction,
            gram=gram,
        )
        errors = [
            row_errors(
                PiecewiseGrid(range_max.float(), b.float(), bits, form, signed),
                rows,
                bias_correction,
                gram,
            )
            for b in (start, searched)
        ]
        breakpoints = torch.where((errors[1] < errors[0])[:, None], searched, start)
    elif search == "approx" and count == 1:
        if distribution not in ("gaussian", "laplacian"):
            raise ValueError("the approximate breakpoint needs a gaussian or laplacian fit")
        std = rows.double().std(dim=1) if rows.shape[1] > 1 else range_max
        std = std.clamp(min=MIN_SCALE)
        breakpoint_ = approximate_breakpoint(range_max / std, distribution) * std
        breakpoints = torch.minimum(breakpoint_.clamp(min=0), range_max / 2)[:, None]
    elif search == "grid" and count == 1:
        breakpoints = grid_search_breakpoints(rows, range_max, bits, form, signed, gram=gram)
    else:
        fitted = fitted_distribution(distribution, rows, signed)
        breakpoints = bisection_breakpoints(range_max, fitted, bits, form, signed, count)
        if search == "grid":
            breakpoints = grid_search_breakpoints(
                rows,
                range_max,
                bits,
                form,
                signed,
                start=breakpoints,
                gram=gram,
            )
    return PiecewiseGrid(range_max.float(), breakpoints.float(), bits, form, signed)


# ---------------------------------------------------------------------------------------------
# Activations: the clip range and the breakpoints together, on a calibration histogram

#: Stage 1 of the joint search: range factors from this fraction of max|x| up to 1 ...
SMALLEST_RANGE_FACTOR = 0.02
RANGE_FACTORS = 32
#: ... and breakpoint ratios p/m of 0.05, 0.10, ..., 1.
BREAKPOINT_RATIOS = 20
#: Points per histogram bin at which the error is evaluated (uniform within a bin).
POINTS_PER_BIN = 4


def histogram_points(
    counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, per_bin: int = POINTS_PER_BIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """A histogram (``counts`` ``[C, B]`` over ``[lo, hi]``) as weighted points ``[C, B·n]``:
    ``per_bin`` evenly spaced points per bin, each carrying an equal share of its count."""
    total = counts.shape[1] * per_bin
    fractions = (torch.arange(total, dtype=torch.float64) + 0.5) / total
    points = lo.double()[:, None] + (hi - lo).double()[:, None] * fractions[None]
    weights = counts.double().repeat_interleave(per_bin, dim=1) / per_bin
    return points.float(), weights


def weighted_errors(
    range_max: torch.Tensor,
    breakpoints: torch.Tensor,
    points: torch.Tensor,
    weights: torch.Tensor,
    bits: int,
    form: str,
    signed: bool,
) -> torch.Tensor:
    """``Σ w_i (pw(x_i) - x_i)²`` per candidate and channel ``[K, C]`` for candidate grids
    ``range_max`` ``[K, C]``, ``breakpoints`` ``[K, C, n]`` on weighted points ``[C, N]``; values
    beyond ``m`` are clipped to it, so the clipping error counts. Candidates go in chunks."""
    candidates, channels, size = range_max.shape[0], points.shape[0], points.shape[1]
    chunk = max(1, 2**21 // (channels * size))
    result = []
    for start in range(0, candidates, chunk):
        stop = min(start + chunk, candidates)
        grid = PiecewiseGrid(
            range_max[start:stop].float(), breakpoints[start:stop].float(), bits, form, signed
        )
        rows = points.expand(stop - start, channels, size)
        error = (grid.quantize_rows(rows) - rows).double().square()
        result.append((error * weights).sum(dim=-1))
    return torch.cat(result)


def joint_histogram_search(
    counts: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    form: str = "non-overlapping",
    signed: bool = True,
    count: int = 1,
) -> PiecewiseGrid:
    """The PWLQ grid of data summarised by a histogram per channel, the clip range ``m`` and
    the breakpoints searched together on the actual squared error (clipping included).

    The paper takes the range from the top-k median and puts ``p`` on it; at 4 bits the best
    breakpoint depends on how much is clipped, so here both move. One breakpoint: a grid of
    ``RANGE_FACTORS`` geometric factors of ``max|x|`` times ``BREAKPOINT_RATIOS`` ratios
    ``p/m``, then two rounds of finer grids around the best pair. Several breakpoints: the
    same search over ``m``, with the breakpoints of each candidate from eq. 6 (supplement eq. 1)
    on the histogram's CDF. Channels and candidates are vectorized.
    """
    counts = counts.double()
    top = torch.maximum(-lo, hi) if signed else hi
    top = top.double().clamp(min=MIN_SCALE)
    points, weights = histogram_points(counts, lo, hi)
    channels = counts.shape[0]
    step = (1.0 / SMALLEST_RANGE_FACTOR) ** (1.0 / (RANGE_FACTORS - 1))

    def breakpoints_for(range_max: torch.Tensor, ratios: torch.Tensor | None) -> torch.Tensor:
        if ratios is not None:
            return (ratios * range_max)[..., None]
        candidates = range_max.shape[0]
        magnitude = HistogramMagnitude(
            counts.repeat(candidates, 1), lo.repeat(candidates), hi.repeat(candidates), signed
        )
        solved = bisection_breakpoints(range_max.reshape(-1), magnitude, bits, form, signed, count)
        return solved.reshape(candidates, channels, count)

    def best(factors: torch.Tensor, ratios: torch.Tensor | None):  # type: ignore[no-untyped-def]
        """The best of candidate ``factors`` (and ``ratios``) ``[K, C]`` per channel."""
        factors = factors.clamp(max=1.0)
        range_max = factors * top[None]
        if ratios is not None:
            ratios = ratios.clamp(min=1e-3, max=1.0)
        breakpoints = breakpoints_for(range_max, ratios)
        errors = weighted_errors(range_max, breakpoints, points, weights, bits, form, signed)
        index = errors.argmin(dim=0, keepdim=True)
        chosen_ratio = None if ratios is None else ratios.gather(0, index)[0]
        chosen = breakpoints.gather(0, index[..., None].expand(1, channels, count))[0]
        return factors.gather(0, index)[0], chosen_ratio, chosen

    coarse = SMALLEST_RANGE_FACTOR * step ** torch.arange(RANGE_FACTORS, dtype=torch.float64)
    if count == 1:
        ratio_grid = torch.arange(1, BREAKPOINT_RATIOS + 1, dtype=torch.float64) / BREAKPOINT_RATIOS
        factors = coarse.repeat_interleave(BREAKPOINT_RATIOS)[:, None].expand(-1, channels)
        ratios = ratio_grid.repeat(RANGE_FACTORS)[:, None].expand(-1, channels)
        factor, ratio, _ = best(factors, ratios)
        ratio_step = 1.0 / BREAKPOINT_RATIOS
        for _ in range(2):
            spread = step ** torch.linspace(-1, 1, 9, dtype=torch.float64)
            offsets = torch.linspace(-ratio_step, ratio_step, 11, dtype=torch.float64)
            factors = (factor[None] * spread.repeat_interleave(11)[:, None]).contiguous()
            ratios = (ratio[None] + offsets.repeat(9)[:, None]).contiguous()
            factor, ratio, _ = best(factors, ratios)
            step, ratio_step = step**0.25, ratio_step / 5
        range_max = factor * top
        return PiecewiseGrid(
            range_max.float(), (ratio * range_max)[:, None].float(), bits, form, signed
        )
    factor, _, breakpoints = best(coarse[:, None].expand(-1, channels).contiguous(), None)
    for _ in range(2):
        spread = step ** torch.linspace(-1, 1, 9, dtype=torch.float64)
        factor, _, breakpoints = best(factor[None] * spread[:, None], None)
        step = step**0.25
    range_max = factor * top
    return PiecewiseGrid(range_max.float(), breakpoints.float(), bits, form, signed)


def zero_exact_floor(floor: torch.Tensor, centre_top: torch.Tensor, bits: int) -> torch.Tensor:
    """The floor ``f' ≈ f`` whose centre grid (``L = 2^b - 1`` steps on ``[f', u]``, ``u = p_1``)
    holds zero exactly: ``f' = -k u / (L - k)`` for the integer ``k = round(-f L / (u - f))``,
    so ``-f'`` is ``k`` steps of ``(u - f') / L``. A padded zero must be exact on a real integer
    grid, as for the uniform affine quantizer (white paper §2.2)."""
    levels = 2**bits - 1
    upper = centre_top.double().clamp(min=MIN_SCALE)
    low = floor.double().clamp(max=0)
    k = torch.round(-low * levels / (upper - low)).clamp(0, levels - 1)
    return (-k * upper / (levels - k)).to(floor.dtype)


def histogram_error(
    grid: PiecewiseGrid, counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """``Σ count · (pw(x) - x)²`` per channel of the data a histogram summarises (float64)."""
    points, weights = histogram_points(counts.double(), lo, hi)
    error = (grid.quantize_rows(points) - points).double().square()
    return (error * weights).sum(dim=-1)


def floored_histogram_search(
    counts: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    form: str = "non-overlapping",
    count: int = 1,
) -> PiecewiseGrid:
    """A one-sided grid on ``[f, m]`` for data whose least value ``f = lo < 0`` is small
    (hardswish's -0.375, GELU's -0.17): ``joint_histogram_search`` of the one-sided data
    ``x - f``, shifted back by ``f``, and the floor moved onto the centre grid so that zero is
    exact (``zero_exact_floor``). Every piece keeps all ``2^b`` levels, where the signed grid
    on ``[-m, m]`` spends half of its centre and a whole tail on values that never occur."""
    floor = lo.double().clamp(max=0)
    shifted = joint_histogram_search(
        counts, (lo - floor).float(), (hi - floor).float(), bits, form, False, count
    )
    range_max = (shifted.range_max.double() + floor).clamp(min=MIN_SCALE)
    # Zero stays in the centre piece (p_1 >= 0), where the snapped floor puts it on the grid.
    breakpoints = shifted.breakpoints.double() + floor[:, None]
    breakpoints = torch.minimum(breakpoints.clamp(min=0), range_max[:, None])
    snapped = zero_exact_floor(floor, breakpoints[:, 0], bits)
    return PiecewiseGrid(range_max.float(), breakpoints.float(), bits, form, False, snapped.float())


# ---------------------------------------------------------------------------------------------
# Bias correction


def bias_correction(
    rows: torch.Tensor, quantized: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PWLQ's "+BC" (code ``quant_weights``), per row: ``shift = mean(w) - mean(ŵ)`` and
    ``gain = std(w) / (std(ŵ) + 1e-12)``, applied as ``(ŵ + shift) · gain``; afterwards
    ``std`` matches exactly and the mean approximately (the gain also scales the mean)."""
    rows, quantized = rows.detach().double(), quantized.detach().double()
    shift = rows.mean(dim=1) - quantized.mean(dim=1)
    if rows.shape[1] > 1:
        gain = rows.std(dim=1) / (quantized.std(dim=1) + 1e-12)
    else:
        gain = torch.ones(rows.shape[0], dtype=torch.float64)
    return shift.float(), gain.float()


def output_bias_correction(
    rows: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ "+BC" for the output-error objective (ours, not the paper's): per row the constant
    ``shift`` of ``ŵ + shift · 1`` that minimises the layer's mean squared output error
    ``(ŵ + s·1 - w)ᵀ H (ŵ + s·1 - w)``:

        shift = 1ᵀH(w - ŵ) / 1ᵀH1,

    the output-space counterpart of the paper's weight-mean shift. The gain stays 1: a gain
    fitted the same way shrinks every channel (least squares attenuates), and on ppocr-det
    W3A8 that cost 2 points of box F1 where the shift alone gained 0.8 (scratch, 2026-12-07).
    Rows with ``1ᵀH1 = 0`` (no input) keep ``ŵ``. Shapes ``[..., C, N]`` -> ``[..., C]``
    each (shift, gain), float32."""
    values, rows = quantized.detach().double(), rows.detach().double()
    ones = torch.ones_like(values)
    h_ones = _gram_times(ones, gram)
    energy = (h_ones * ones).sum(-1)
    usable = energy > 1e-300
    shift = (h_ones * (rows - values)).sum(-1) / torch.where(usable, energy, 1.0)
    shift = torch.where(usable, shift, torch.zeros_like(shift))
    return shift.float(), torch.ones_like(shift).float()


def row_errors(
    grid: PiecewiseGrid,
    rows: torch.Tensor,
    corrected: bool = False,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||ŵ - w||²`` per row of ``rows`` ``[..., C, N]`` on ``grid``; with ``corrected``,
    ``ŵ`` after ``bias_correction`` (what the model then uses). ``[..., C]``, float64.

    With ``gram`` (``[G, N, N]``, the layer's input second moments ``E[x xᵀ]`` per group of
    rows, from ``qpp.ptq.input_moments``) the error is the layer's mean squared output error
    instead, ``(ŵ - w)ᵀ E[x xᵀ] (ŵ - w) = E[((ŵ - w)ᵀ x)²]`` per output channel (ours, not the
    paper's: the weight L2 error treats every input alike), and the correction is the one
    fitted to that error (``output_bias_correction``).
    """
    quantized = grid.quantize_rows(rows.detach()).detach()
    values = quantized.double()
    if corrected and gram is not None:
        shift, gain = output_bias_correction(rows, quantized, gram)
        values = (values + shift.double()[..., None]) * gain.double()[..., None]
    elif corrected:
        shift = rows.double().mean(dim=-1, keepdim=True) - values.mean(dim=-1, keepdim=True)
        if rows.shape[-1] > 1:
            gain = rows.double().std(dim=-1, keepdim=True) / (
                values.std(dim=-1, keepdim=True) + 1e-12
            )
        else:
            gain = torch.ones_like(shift)
        values = (values + shift) * gain
    difference = values - rows.double()
    if gram is None:
        return difference.square().sum(dim=-1)
    return output_errors(difference, gram)


def output_errors(difference: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``eᵀ H_g e`` for each row ``e`` of ``difference`` ``[..., C, N]``, rows split evenly
    into the ``G`` groups of ``gram`` ``[G, N, N]`` in order (grouped convolutions)."""
    return (_gram_times(difference, gram) * difference).sum(dim=-1)


def _gram_times(rows: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``H_g e`` for each row ``e`` of ``rows`` ``[..., C, N]`` (rows split into the groups of
    ``gram`` ``[G, N, N]`` in order). The product runs in float32 (it is the searches' cost,
    ``C·N²`` per candidate); the result is float64 for the sums after it."""
    groups = gram.shape[0]
    *lead, channels, width = rows.shape
    split = rows.float().reshape(*lead, groups, channels // groups, width)
    weighted = torch.einsum("...gcn,gnm->...gcm", split, gram.float())
    return weighted.reshape(*lead, channels, width).double()
