"""Dense+Sparse quantization (QPP, Kryzhanovskiy et al. CVPR 2021).

A fixed fraction ρ (``outlier_fraction``) of each activation tensor, its largest magnitudes,
stays unquantized in a sparse side tensor; the dense rest is quantized uniformly on ``[-t, t]``
(or ``[0, t]`` for non-negative tensors such as ReLU outputs), where the threshold ``t`` is the
``(1 - ρ)`` quantile of ``|x|``. Per-sample thresholds are rows of a ``[N, M]`` view.
"""

from __future__ import annotations

import math

import torch

from qpp.errors import ConfigError
from qpp.quant.affine import broadcast_shape, fake_quantize, integer_range


def check_outlier_fraction(outlier_fraction: float) -> None:
    if not 0.0 <= outlier_fraction < 1.0:
        raise ConfigError(
            f"outlier fraction {outlier_fraction} must be in [0, 1); "
            "write e.g. --outlier-fraction 0.01 (1 % of each tensor stays in float)"
        )


#: Dense+Sparse needs this many expected outliers per sample: with fewer elements than
#: ``MIN_EXPECTED_OUTLIERS / ρ`` the achievable density is too coarse (steps of 1/M) to
#: hold ρ, e.g. a squeeze-excitation vector of 8 values has no 1 % tail at all.
MIN_EXPECTED_OUTLIERS = 10


def min_dense_sparse_elements(outlier_fraction: float) -> int:
    """Elements per sample below which a tensor keeps the uniform scheme."""
    if outlier_fraction <= 0.0:
        return 0
    return math.ceil(MIN_EXPECTED_OUTLIERS / outlier_fraction)


def outlier_threshold(rows: torch.Tensor, outlier_fraction: float) -> torch.Tensor:
    """Per row, ``t`` = the ``(1 - ρ)`` quantile of ``|x|``: the k-th smallest ``|x|`` with
    ``k = ceil((1 - ρ) M)``, so at most ``ρ M`` and (without ties) at least ``ρ M - 1``
    elements of the row exceed it."""
    check_outlier_fraction(outlier_fraction)
    columns = rows.shape[1]
    k = min(columns, max(1, math.ceil((1.0 - outlier_fraction) * columns - 1e-9)))
    return rows.detach().abs().kthvalue(k, dim=1).values


def dense_grid(
    threshold: torch.Tensor, bits: int, nonnegative: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Scale, zero point and signedness of the dense grid on ``[-t, t]`` or ``[0, t]``."""
    signed = not nonnegative
    _, qmax = integer_range(bits, signed)
    scale = torch.clamp(threshold.float() / qmax, min=1e-8)
    return scale, torch.zeros_like(scale), signed


def dense_sparse_fake_quantize(
    x: torch.Tensor,
    threshold: torch.Tensor,
    bits: int,
    nonnegative: bool,
    axis: int | None = 0,
) -> torch.Tensor:
    """``x`` where ``|x| > t`` (the sparse outliers), else ``x`` fake-quantized on the dense grid.

    ``threshold`` is a scalar or one value per index of ``axis`` (per sample for ``axis=0``).
    """
    scale, zero_point, signed = dense_grid(threshold, bits, nonnegative)
    dense = fake_quantize(x, scale, zero_point, bits, signed, axis if threshold.ndim else None)
    limit = broadcast_shape(threshold, x.ndim, axis if threshold.ndim else None)
    return torch.where(x.abs() > limit, x, dense)


def outlier_density(rows: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The fraction of each row that is an outlier (``|x| > t``): the achieved ρ per sample."""
    limit = threshold.reshape(-1, 1) if threshold.ndim else threshold
    return (rows.abs() > limit).float().mean(dim=1)
