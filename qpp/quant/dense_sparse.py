"""Dense+Sparse quantization (QPP, Kryzhanovskiy et al. CVPR 2021).

A fixed fraction ρ (``outlier_fraction``) of each activation tensor, its largest magnitudes,
stays unquantized in a sparse side tensor; the dense rest is quantized uniformly on ``[-t, t]``
(or ``[0, t]`` for non-negative tensors such as ReLU outputs), where the threshold ``t`` is the
``(1 - ρ)`` quantile of ``|x|``. Per-sample thresholds are rows of a ``[N, M]`` view.

The paper's ``[0, t]`` after ReLU generalises to any tensor with a floor ``f > -t``, the least
value it takes (calibrated): the dense grid spans ``[f, t]`` with all ``2^b`` levels, where
``[-t, t]`` would leave the levels below ``f`` unused (after hardswish, ``f = -0.375``, about
half of a 4-bit grid). The outliers stay those with ``|x| > t``, so the density is ρ
whatever the floor; a value below ``f`` (unseen in calibration) clamps to the grid's low end.
"""

from __future__ import annotations

import math

import torch

from qpp.errors import ConfigError
from qpp.quant.affine import broadcast_shape, choose_qparams, fake_quantize


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


def dense_sparse_floor(least: float, mean_threshold: float) -> float:
    """The floor a layer's dense range keeps: the least value its tensor took on calibration
    data, where that is above ``-t`` on average (a bounded tensor: ReLU, hardswish, GELU);
    else ``-inf``, the symmetric grid (the negative tail reaches the outliers: an unbounded
    tensor's least value lies beyond ``-t`` of the sample with the largest ``t``)."""
    return least if least > -mean_threshold else -math.inf


def dense_floor(threshold: torch.Tensor, floor: float) -> torch.Tensor:
    """The low end of the dense range: ``-t``, or the tensor's floor where that is above
    ``-t`` (0 for non-negative tensors, so that zero stays on the grid)."""
    return torch.clamp(torch.clamp(-threshold.float(), min=floor), max=0.0)


def dense_grid(
    threshold: torch.Tensor, bits: int, floor: float = -math.inf
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (on the unsigned ``b``-bit grid) of the dense range.

    ``[-t, t]``: the symmetric signed grid, ``s = t / (2^(b-1) - 1)``, written as unsigned
    levels with ``z = 2^(b-1)``; ``[f, t]`` with ``f > -t``: the affine grid of white-paper eq.
    5-7, ``s = (t - f) / (2^b - 1)``, ``z = round(-f / s)`` (``[0, t]``: ``s = t / (2^b - 1)``).
    """
    low = dense_floor(threshold, floor)
    affine_scale, affine_zero = choose_qparams(low, threshold, bits, symmetric=False, signed=False)
    signed_scale, _ = choose_qparams(-threshold, threshold, bits, symmetric=True, signed=True)
    symmetric = low <= -threshold.float()
    scale = torch.where(symmetric, signed_scale, affine_scale)
    zero_point = torch.where(symmetric, torch.full_like(affine_zero, 2 ** (bits - 1)), affine_zero)
    return scale, zero_point


def dense_sparse_fake_quantize(
    x: torch.Tensor,
    threshold: torch.Tensor,
    bits: int,
    floor: float = -math.inf,
    axis: int | None = 0,
) -> torch.Tensor:
    """``x`` where ``|x| > t`` (the sparse outliers), else ``x`` fake-quantized on the dense
    grid of ``dense_grid``.

    ``threshold`` is a scalar or one value per index of ``axis`` (per sample for ``axis=0``);
    ``floor`` the least value the tensor takes (``-inf``: unbounded, ``0``: non-negative).
    """
    scale, zero_point = dense_grid(threshold, bits, floor)
    per_index = axis if threshold.ndim else None
    dense = fake_quantize(x, scale, zero_point, bits, False, per_index)
    limit = broadcast_shape(threshold, x.ndim, per_index)
    return torch.where(x.abs() > limit, x, dense)


def outlier_density(rows: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The fraction of each row that is an outlier (``|x| > t``): the achieved ρ per sample."""
    limit = threshold.reshape(-1, 1) if threshold.ndim else threshold
    return (rows.abs() > limit).float().mean(dim=1)
