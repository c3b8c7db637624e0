"""Observers: streaming statistics that match one pass over the data, in bounded memory."""

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qpp.quant.observers import (
    HistogramObserver,
    MinMaxObserver,
    SampleObserver,
    TopKObserver,
    channels_first,
)
from qpp.quant.ranges import percentile_range


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def state_bytes(observer: object) -> int:
    tensors = [v for v in vars(observer).values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_channels_first_puts_one_channel_per_row(axis: int | None) -> None:
    x = gaussian(3, 4, 5)
    rows = channels_first(x, axis)
    if axis is None:
        assert torch.equal(rows, x.reshape(1, -1))
        return
    assert rows.shape == (x.shape[axis], x.numel() // x.shape[axis])
    for c in range(x.shape[axis]):
        assert torch.equal(rows[c].sort().values, x.select(axis, c).reshape(-1).sort().values)


# --- min-max -------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    batches=st.integers(1, 6),
    axis=st.sampled_from([None, 1, 2, -1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_streaming_min_max_equals_one_pass(batches: int, axis: int | None, seed: int) -> None:
    data = (
        gaussian(2 * batches, 3, 4, 5, seed=seed)
        * torch.linspace(0.1, 10, 2 * batches)[:, None, None, None]
    )
    streamed, once = MinMaxObserver(axis), MinMaxObserver(axis)
    assert streamed.empty
    for batch in data.chunk(batches, dim=0):
        streamed.update(batch)
    once.update(data)
    rows = channels_first(data, axis)
    assert not streamed.empty
    assert torch.equal(streamed.min, once.min)
    assert torch.equal(streamed.max, once.max)
    assert torch.equal(once.min, rows.amin(dim=1))
    assert torch.equal(once.max, rows.amax(dim=1))


# --- histogram -----------------------------------------------------------------------------------


def test_histogram_of_one_batch_counts_every_value_in_its_bin() -> None:
    x = gaussian(5000)
    histogram = HistogramObserver(bins=64)
    histogram.update(x)
    assert histogram.counts is not None
    assert histogram.lo.item() == x.min().item()
    assert histogram.hi.item() == x.max().item()
    edges = histogram.edges()[0].float()
    expected = torch.histc(x, bins=64, min=x.min().item(), max=x.max().item())
    assert histogram.counts.sum().item() == 5000
    # torch.histc and our binning may disagree only for values on a bin edge.
    assert (histogram.counts[0].float() - expected).abs().sum().item() <= 4
    assert edges[0].item() == pytest.approx(x.min().item())
    assert edges[-1].item() == pytest.approx(x.max().item())


@settings(max_examples=30, deadline=None)
@given(
    batches=st.integers(2, 12),
    scales=st.lists(st.floats(0.05, 20.0), min_size=12, max_size=12),
    shift=st.floats(-5.0, 5.0),
    seed=st.integers(0, 2**31 - 1),
)
# The range grows on one side only; a float32 width once lost part of the edge bin here.
@example(batches=2, scales=[0.05, 0.05078125] + [1.0] * 10, shift=0.0, seed=0)
def test_streaming_histogram_keeps_count_and_exact_range(
    batches: int, scales: list[float], shift: float, seed: int
) -> None:
    """Batches with growing and shrinking spreads force rebinning; no count may be lost."""
    data = [gaussian(300, seed=seed + i) * scales[i] + shift for i in range(batches)]
    histogram = HistogramObserver(bins=128)
    for batch in data:
        histogram.update(batch)
    everything = torch.cat(data)
    assert histogram.counts is not None
    assert histogram.counts.sum().item() == pytest.approx(everything.numel(), rel=1e-12)
    assert bool((histogram.counts >= 0).all())
    assert histogram.lo.item() == everything.min().item()
    assert histogram.hi.item() == everything.max().item()


@pytest.mark.parametrize("order", ["shuffled", "growing"])
def test_streamed_histogram_percentiles_match_torch_quantile(order: str) -> None:
    """Rebinning interpolates the old counts; percentiles stay within a bin width of the truth.

    The ``growing`` order sorts the data by magnitude, so the range grows on every batch: the
    worst case for rebinning.
    """
    x = gaussian(40_000, seed=1)
    if order == "growing":
        x = x[x.abs().argsort()]
    histogram = HistogramObserver(bins=512)
    for batch in x.split(1000):
        histogram.update(batch)
    width = ((histogram.hi - histogram.lo) / histogram.bins).item()
    for percentile in (60.0, 75.0, 90.0, 99.0, 99.9):
        lo, hi = percentile_range(histogram, percentile)
        expected_lo = torch.quantile(x, 1 - percentile / 100).item()
        expected_hi = torch.quantile(x, percentile / 100).item()
        assert lo.item() == pytest.approx(expected_lo, abs=width)
        assert hi.item() == pytest.approx(expected_hi, abs=width)


def test_rebinning_preserves_the_cumulative_distribution() -> None:
    """When the range grows, the new cumulative counts follow the old piecewise-linear CDF."""
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    histogram = HistogramObserver(bins=100)
    histogram.update(x)
    old_edges = histogram.edges()[0].numpy()
    old_cumulative = np.concatenate([[0.0], np.cumsum(histogram.counts[0].numpy())])
    histogram.update(torch.tensor([-1.0, 2.0]))  # the range grows from [~0, ~1] to [-1, 2]
    assert histogram.counts.sum().item() == pytest.approx(10_002, rel=1e-12)
    new_edges = histogram.edges()[0].numpy()[1:]
    new_cumulative = np.cumsum(histogram.counts[0].numpy())
    # The outlier at -1 sits in the first new bin, so it adds 1 below every later edge.
    expected = np.interp(new_edges, old_edges, old_cumulative) + 1
    inside = (new_edges > old_edges[0]) & (new_edges < old_edges[-1])
    assert inside.sum() > 20
    np.testing.assert_allclose(new_cumulative[inside], expected[inside], rtol=0, atol=1e-6)


def test_per_channel_histogram_equals_per_tensor_histogram_of_each_channel() -> None:
    x = gaussian(4, 3, 50) * torch.tensor([0.5, 1.0, 4.0])[None, :, None]
    per_channel = HistogramObserver(axis=1, bins=32)
    for batch in x.chunk(2, dim=0):
        per_channel.update(batch)
    assert per_channel.counts is not None
    assert per_channel.counts.shape == (3, 32)
    for c in range(3):
        alone = HistogramObserver(bins=32)
        for batch in x.chunk(2, dim=0):
            alone.update(batch[:, c])
        assert alone.counts is not None
        assert per_channel.lo[c] == alone.lo[0]
        assert per_channel.hi[c] == alone.hi[0]
        torch.testing.assert_close(per_channel.counts[c], alone.counts[0], rtol=0, atol=1e-9)


def test_constant_data_gets_a_non_empty_range() -> None:
    histogram = HistogramObserver(bins=16)
    histogram.update(torch.full((100,), 3.0))
    assert histogram.hi.item() > histogram.lo.item() == 3.0
    assert histogram.counts.sum().item() == 100


def test_histogram_skips_non_finite_values() -> None:
    x = torch.tensor([0.0, 1.0, float("nan"), 2.0, float("inf"), -float("inf"), -1.0])
    histogram = HistogramObserver(bins=8)
    histogram.update(x)
    assert histogram.lo.item() == -1.0
    assert histogram.hi.item() == 2.0
    assert histogram.counts.sum().item() == 4


def test_per_channel_histogram_skips_non_finite_values_only_where_they_are() -> None:
    x = gaussian(10, 3)
    x[2, 0] = float("nan")
    x[5, 0] = -float("inf")
    x[7, 2] = float("inf")
    histogram = HistogramObserver(axis=1, bins=16)
    histogram.update(x)
    assert histogram.counts is not None
    assert histogram.counts.sum(dim=1).tolist() == [8, 10, 9]
    finite = torch.where(torch.isfinite(x), x, torch.nan)
    assert torch.equal(histogram.lo, finite.nan_to_num(torch.inf).amin(dim=0))
    assert torch.equal(histogram.hi, finite.nan_to_num(-torch.inf).amax(dim=0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: MinMaxObserver(axis=1),
        lambda: HistogramObserver(axis=1, bins=64),
        lambda: TopKObserver(axis=1, k=5),
    ],
    ids=["minmax", "histogram", "topk"],
)
def test_observer_memory_does_not_grow_with_batches(make: Callable[[], object]) -> None:
    observer = make()
    observer.update(gaussian(8, 3, 10))
    after_one = state_bytes(observer)
    for seed in range(1, 40):
        observer.update(gaussian(8, 3, 10, seed=seed) * (1 + seed))
    assert state_bytes(observer) == after_one > 0


# --- top-k and samples ---------------------------------------------------------------------------


def test_topk_observer_is_the_batch_average_of_the_top_k_median() -> None:
    """PWLQ §5 (and its code): sort each batch, take the k extremes, torch.median, then mean."""
    batches = [gaussian(6, 40, seed=seed) * (1 + seed) for seed in range(5)]
    k = 10
    observer = TopKObserver(k=k)
    assert observer.empty
    for batch in batches:
        observer.update(batch)
    tops, bottoms = [], []
    for batch in batches:
        ordered = batch.reshape(-1).sort().values
        tops.append(ordered[-k:].median())
        bottoms.append(ordered[:k].median())
    assert observer.batches == 5
    torch.testing.assert_close(observer.top, torch.stack(tops).mean()[None])
    torch.testing.assert_close(observer.bottom, torch.stack(bottoms).mean()[None])


def test_topk_observer_per_channel_and_small_batches() -> None:
    x = gaussian(2, 3, 4)  # 8 values per channel along axis 1, fewer than k
    observer = TopKObserver(axis=1, k=10)
    observer.update(x)
    rows = channels_first(x, 1)
    torch.testing.assert_close(observer.top, rows.median(dim=1).values)
    torch.testing.assert_close(observer.bottom, rows.median(dim=1).values)
    assert observer.top.shape == (3,)


def test_sample_observer_keeps_the_first_rows_and_caps_them() -> None:
    observer = SampleObserver(max_rows=50)
    assert observer.empty
    batches = [gaussian(4, 8, 10, seed=seed) for seed in range(5)]  # 32 rows each
    for batch in batches:
        observer.update(batch)
    samples = observer.samples()
    assert observer.count == 50
    assert samples.shape == (50, 10)
    assert torch.equal(samples, torch.cat(batches).reshape(-1, 10)[:50])
    # The observer copies: changing the input afterwards leaves the samples alone.
    batches[0].zero_()
    assert torch.equal(observer.samples(), samples)
