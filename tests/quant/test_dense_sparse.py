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
    y = dense_sparse_fake_quantize(x, threshold, bits=4, nonnegative=False)
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
    y = dense_sparse_fake_quantize(x, threshold, bits=3, nonnegative=True)
    dense = x <= threshold[:, None]
    levels = (y / (threshold[:, None] / 7))[dense]
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert len(torch.unique(levels.round())) == 8  # all 2^3 levels of [0, t] are used


def test_static_scalar_threshold() -> None:
    x = torch.linspace(-2, 2, 41).reshape(1, 41)
    y = dense_sparse_fake_quantize(x, torch.tensor(1.0), bits=8, nonnegative=False)
    assert torch.equal(y[x.abs() > 1], x[x.abs() > 1])
    assert (y[x.abs() <= 1] - x[x.abs() <= 1]).abs().max() <= 0.5 / 127 + 1e-6


def test_outlier_fraction_must_be_a_fraction() -> None:
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\)"):
        outlier_threshold(torch.ones(1, 4), 1.5)
