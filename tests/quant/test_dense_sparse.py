"""Dense+Sparse quantization (QPP): exact thresholds, outliers untouched, dense grid."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpp.errors import ConfigError
from qpp.quant.dense_sparse import (
    dense_sparse_fake_quantize,
    outlier_density,
    outlier_threshold,
)


@settings(max_examples=40, deadline=None)
@given(
    columns=st.integers(10, 5000),
    fraction=st.floats(0.0, 0.2),
    seed=st.integers(0, 2**16),
)
def test_exact_threshold_gives_density_within_one_element(
    columns: int, fraction: float, seed: int
) -> None:
    rows = torch.randn(4, columns, generator=torch.Generator().manual_seed(seed))
    rows *= torch.tensor([[0.1], [1.0], [10.0], [100.0]])  # per-sample scales differ a lot
    density = outlier_density(rows, outlier_threshold(rows, fraction))
    assert torch.all((density - fraction).abs() <= 1.0 / columns + 1e-6)


def test_outliers_pass_unquantized_and_dense_part_is_on_the_grid() -> None:
    x = torch.randn(3, 2, 50, generator=torch.Generator().manual_seed(1))
    threshold = outlier_threshold(x.reshape(3, -1), 0.05)
    y = dense_sparse_fake_quantize(x, threshold, bits=4)
    t = threshold[:, None, None]
    outliers = x.abs() > t
    assert torch.equal(y[outliers], x[outliers])
    steps = (y / (t / 7)).expand_as(y)[~outliers]
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert steps.abs().max() <= 7
    assert not torch.equal(y[~outliers], x[~outliers])


def test_nonnegative_tensors_use_the_unsigned_grid() -> None:
    x = torch.rand(2, 100, generator=torch.Generator().manual_seed(2))
    threshold = torch.tensor([0.5, 0.8])
    y = dense_sparse_fake_quantize(x, threshold, bits=3, floor=0.0)
    dense = x <= threshold[:, None]
    levels = (y / (threshold[:, None] / 7))[dense]
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert len(torch.unique(levels.round())) == 8  # all 2^3 levels of [0, t] are used


def test_a_floor_above_minus_t_spends_every_level_on_the_range_the_tensor_takes() -> None:
    # hardswish's floor is -0.375: [-t, t] would leave the levels below it unused.
    x = torch.nn.functional.hardswish(
        torch.randn(2, 4000, generator=torch.Generator().manual_seed(3)) * 2
    )
    threshold = outlier_threshold(x, 0.01)
    floor = float(x.min())
    y = dense_sparse_fake_quantize(x, threshold, bits=4, floor=floor)
    symmetric = dense_sparse_fake_quantize(x, threshold, bits=4)
    dense = x.abs() <= threshold[:, None]
    assert torch.equal(y[~dense], x[~dense])  # the outliers are the same: |x| > t
    assert len(torch.unique(y[0][dense[0]])) == 16  # all 2^4 levels of [floor, t] are used
    assert len(torch.unique(symmetric[0][dense[0]])) <= 10  # the signed grid: about half
    error = ((y - x) ** 2).mean()
    assert error < 0.5 * ((symmetric - x) ** 2).mean()
    assert torch.any(y == 0) and torch.equal(y[x == 0], x[x == 0])  # zero stays exact
    # a value below the calibrated floor (within -t) clamps to the grid; the density stays rho
    lower = torch.tensor([[floor - 0.1, 0.0]])
    low_end = float(y[0][dense[0]].min())
    assert dense_sparse_fake_quantize(lower, threshold[:1], 4, floor=floor)[0, 0] == low_end
    assert outlier_density(lower, threshold[:1])[0] == 0.0


def test_a_floor_below_minus_t_keeps_the_symmetric_grid() -> None:
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(4))
    threshold = outlier_threshold(x, 0.02)
    floor = float(x.min())  # below -t: the tensor's negative tail is an outlier tail too
    assert torch.equal(
        dense_sparse_fake_quantize(x, threshold, 4, floor=floor),
        dense_sparse_fake_quantize(x, threshold, 4),
    )


def test_static_scalar_threshold() -> None:
    x = torch.linspace(-2, 2, 41).reshape(1, 41)
    y = dense_sparse_fake_quantize(x, torch.tensor(1.0), bits=8)
    assert torch.equal(y[x.abs() > 1], x[x.abs() > 1])
    assert (y[x.abs() <= 1] - x[x.abs() <= 1]).abs().max() <= 0.5 / 127 + 1e-6


def test_outlier_fraction_must_be_a_fraction() -> None:
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\)"):
        outlier_threshold(torch.ones(1, 4), 1.5)
