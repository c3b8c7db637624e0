"""Observers: streaming statistics of a tensor, in memory that does not grow with the data.

An observer only collects; a range estimator (``ranges.py``) later turns its statistics into a
quantization range. Every observer works per channel: statistics have a leading channel
dimension ``C`` (``C = 1`` for per-tensor), and ``axis`` says which tensor dimension is the
channel one.
"""

from __future__ import annotations

import torch


def channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as ``[C, N]``: one row per channel (one row in all for per-tensor)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis % x.ndim, 0).reshape(x.shape[axis], -1)


class MinMaxObserver:
    """Running minimum and maximum per channel."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = channels_first(x, self.axis)
        batch_min, batch_max = torch.aminmax(rows, dim=1)
        if self.min is None or self.max is None:
            self.min, self.max = batch_min, batch_max
        else:
            self.min = torch.minimum(self.min, batch_min)
            self.max = torch.maximum(self.max, batch_max)

    @property
    def empty(self) -> bool:
        return self.min is None


class HistogramObserver:
    """A histogram per channel over the running ``[min, max]``, with a fixed number of bins.

    When a batch falls outside the current range, the range grows to cover it and the old
    counts are redistributed onto the new bins by interpolating their cumulative distribution
    (data is assumed uniform within a bin). Counts are float64 so large calibration sets stay
    exact.
    """

    def __init__(self, axis: int | None = None, bins: int = 2048) -> None:
        self.axis = axis
        self.bins = bins
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.counts is None

    def update(self, x: torch.Tensor) -> None:
        rows = channels_first(x, self.axis)
        batch_lo, batch_hi = torch.aminmax(rows, dim=1)
        finite: torch.Tensor | None = None
        if not bool(torch.isfinite(batch_lo).all() and torch.isfinite(batch_hi).all()):
            # Rare (attention masks of -inf): non-finite values are skipped, not counted.
            finite = torch.isfinite(rows)
            batch_lo = torch.where(finite, rows, torch.inf).amin(dim=1)
            batch_hi = torch.where(finite, rows, -torch.inf).amax(dim=1)
            rows = torch.where(finite, rows, batch_lo[:, None])
            if not bool(finite.any(dim=1).all()):
                return
        if self.counts is None or self.lo is None or self.hi is None:
            lo, hi = batch_lo, batch_hi
            # A constant channel still needs a non-empty range.
            hi = torch.where(hi > lo, hi, lo + torch.clamp(lo.abs(), min=1e-8) * 1e-3)
            self.lo, self.hi = lo, hi
            self.counts = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64)
        else:
            new_lo, new_hi = torch.minimum(self.lo, batch_lo), torch.maximum(self.hi, batch_hi)
            if bool((new_lo < self.lo).any() or (new_hi > self.hi).any()):
                self.counts = self._rebin(self.counts, self.lo, self.hi, new_lo, new_hi)
                self.lo, self.hi = new_lo, new_hi
        width = (self.hi - self.lo) / self.bins
        index = torch.floor((rows - self.lo[:, None]) / width[:, None]).long()
        index = index.clamp_(0, self.bins - 1)
        index += (torch.arange(rows.shape[0]) * self.bins)[:, None]
        weights = None if finite is None else finite.reshape(-1).double()
        flat = torch.bincount(index.reshape(-1), weights, minlength=rows.shape[0] * self.bins)
        self.counts += flat.reshape(rows.shape[0], self.bins).double()

    def _rebin(
        self,
        counts: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        new_lo: torch.Tensor,
        new_hi: torch.Tensor,
    ) -> torch.Tensor:
        new_edges = self.edges_between(new_lo, new_hi)
        cumulative = cumulative_at(counts, lo, hi, new_edges)
        return torch.diff(cumulative, dim=1).clamp_(min=0)

    def edges_between(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        # Subtract in float64: a float32 width would put the last edge short of ``hi``.
        lo, hi = lo.double(), hi.double()
        steps = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)
        return lo[:, None] + (hi - lo)[:, None] * steps[None, :]

    def edges(self) -> torch.Tensor:
        """Bin edges, ``[C, bins + 1]`` (float64)."""
        assert self.lo is not None and self.hi is not None
        return self.edges_between(self.lo, self.hi)


def cumulative_at(
    counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    """The histogram's cumulative count at ``points`` (``[C, K]``), uniform within bins."""
    bins = counts.shape[1]
    lo, hi = lo.double(), hi.double()
    position = (points - lo[:, None]) / (hi - lo)[:, None] * bins
    position = position.clamp(0, bins)
    index = torch.floor(position).long().clamp_(max=bins - 1)
    fraction = position - index
    cumulative = torch.nn.functional.pad(torch.cumsum(counts, dim=1), (1, 0))
    below = torch.gather(cumulative, 1, index)
    inside = torch.gather(counts, 1, index) * fraction
    return below + inside


class TopKObserver:
    """Mean over batches of the median of each batch's k largest and k smallest values.

    The activation range of PWLQ §5: "the median of the top-10 values, averaged over batches".
    """

    def __init__(self, axis: int | None = None, k: int = 10) -> None:
        self.axis = axis
        self.k = k
        self.sum_top: torch.Tensor | None = None
        self.sum_bottom: torch.Tensor | None = None
        self.batches = 0

    @property
    def empty(self) -> bool:
        return self.batches == 0

    def update(self, x: torch.Tensor) -> None:
        rows = channels_first(x, self.axis)
        k = min(self.k, rows.shape[1])
        top = rows.topk(k, dim=1).values.median(dim=1).values
        bottom = rows.topk(k, dim=1, largest=False).values.median(dim=1).values
        if self.sum_top is None or self.sum_bottom is None:
            self.sum_top, self.sum_bottom = top, bottom
        else:
            self.sum_top = self.sum_top + top
            self.sum_bottom = self.sum_bottom + bottom
        self.batches += 1

    @property
    def top(self) -> torch.Tensor:
        assert self.sum_top is not None
        return self.sum_top / self.batches

    @property
    def bottom(self) -> torch.Tensor:
        assert self.sum_bottom is not None
        return self.sum_bottom / self.batches


class SampleObserver:
    """The first ``max_rows`` samples of a tensor, one row per sample (for task-loss ranges).

    Keeps memory bounded at ``max_rows`` x features; used for the cross-entropy range of the
    final logits, where the estimator must see whole output vectors.
    """

    def __init__(self, max_rows: int = 1024) -> None:
        self.max_rows = max_rows
        self.rows: list[torch.Tensor] = []
        self.count = 0

    @property
    def empty(self) -> bool:
        return self.count == 0

    def update(self, x: torch.Tensor) -> None:
        if self.count >= self.max_rows:
            return
        flat = x.detach().float().reshape(-1, x.shape[-1])
        take = flat[: self.max_rows - self.count]
        self.rows.append(take.clone())
        self.count += take.shape[0]

    def samples(self) -> torch.Tensor:
        return torch.cat(self.rows)


class PlateauObserver:
    """Values that a share of a tensor sits on exactly, near its low and high ends (per tensor).

    An activation's floor (the zero region of a ReLU or hard-swish moved by a folded affine
    ``a*y + b``: every such element is ``b``) or ceiling (ReLU6, hard-sigmoid) puts a share of
    the tensor on one float near an end of its range. Each batch, the values that repeat among
    the lowest and the highest ``TAIL`` of a fixed sample of ``SAMPLE`` elements become
    candidates (at most ``CANDIDATES``), and every candidate's exact count over the whole batch
    is added up.
    """

    SAMPLE = 4096
    TAIL = 0.02
    CANDIDATES = 8

    def __init__(self) -> None:
        self.counts: dict[float, int] = {}
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return
        if flat.numel() > self.SAMPLE:
            generator = torch.Generator().manual_seed(flat.numel())
            sample = flat[torch.randint(flat.numel(), (self.SAMPLE,), generator=generator)]
        else:
            sample = flat
        ordered = sample.sort().values
        tail = max(8, int(self.TAIL * ordered.numel()))
        for part in (ordered[:tail], ordered[-tail:]):
            values, repeats = torch.unique(part, return_counts=True)
            for value in values[repeats >= 3].tolist():
                if len(self.counts) < self.CANDIDATES:
                    self.counts.setdefault(value, 0)
        for value in self.counts:
            self.counts[value] += int((flat == value).sum())
        self.count += flat.numel()

    def plateaus(self, share: float) -> dict[float, float]:
        """Each candidate that at least ``share`` of all values sit on, with its share."""
        if not self.count:
            return {}
        return {
            value: count / self.count
            for value, count in self.counts.items()
            if count >= share * self.count
        }
