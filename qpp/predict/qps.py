"""Per-sample activation QPs: static, dynamic (exact, per input) or predicted (QPP).

One ``SampleQuantizer`` is attached to an activation ``Quantizer`` (``quantizer.per_sample``)
and replaces its static fake-quantization. It serves the two schemes of QPP (Kryzhanovskiy et
al. 2021): uniform (a per-sample ``[lo, hi]``, hence scale and zero point) and Dense+Sparse (a
per-sample threshold ``t``; see ``qpp.quant.dense_sparse``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

import torch

from qpp.errors import ConfigError, DataError
from qpp.quant.affine import choose_qparams, fake_quantize, grid_limits
from qpp.quant.dense_sparse import (
    check_outlier_fraction,
    dense_sparse_fake_quantize,
    outlier_density,
    outlier_threshold,
)
from qpp.quant.ranges import parse_estimator, row_percentile_range, rows_mse_range
from qpp.sim.quantizer import Quantizer

#: Columns of a per-sample row that an MSE range search evaluates (a strided subset): the
#: error estimate needs a few thousand values, not every element of a large feature map.
MSE_SEARCH_COLUMNS = 2048


class QPMode(StrEnum):
    STATIC = "static"
    DYNAMIC = "dynamic"
    PREDICTED = "predicted"


class Scheme(StrEnum):
    UNIFORM = "uniform"
    DENSE_SPARSE = "dense-sparse"


DYNAMIC_ESTIMATORS = ("minmax", "percentile", "mse")


def parse_mode(mode: str) -> QPMode:
    try:
        return QPMode(mode)
    except ValueError:
        raise ConfigError(
            f"unknown activation-range mode '{mode}'; use static, dynamic or predicted"
        ) from None


def parse_scheme(scheme: str) -> Scheme:
    try:
        return Scheme(scheme)
    except ValueError:
        raise ConfigError(f"unknown scheme '{scheme}'; use uniform or dense-sparse") from None


#: ``auto``: chosen on calibration data by ``qpp.predict.estimator_choice``. Until then (a
#: sampler is built before the choice runs) it means min-max at 8 bits and more, MSE below
#: (white paper §3.1: min-max ranges suffice at 8 bits, lower bit-widths need clipping).
AUTO_ESTIMATOR = "auto"
#: ``per-layer``: ``auto``'s choice, then each layer's own estimator, chosen layer by layer on
#: the model's output error (``qpp.predict.estimator_choice.refine_per_layer``); predicted
#: ranges then take, layer by layer, the predictor fit with the least predicted-mode output
#: error (``qpp.predict.target_choice``).
PER_LAYER_ESTIMATOR = "per-layer"
#: The estimator settings that are chosen on calibration data.
CHOSEN_ESTIMATORS = (AUTO_ESTIMATOR, PER_LAYER_ESTIMATOR)
#: A layer's "per-input" range that is its calibrated static range for every input: the exact
#: counterpart, in ``dynamic`` mode, of a layer that predicted mode keeps on its static range
#: (``qpp.predict.target_choice.static_columns``). A layer's estimator only, never a setting.
STATIC_ESTIMATOR = "static"


def resolve_dynamic_estimator(estimator: str, bits: int) -> str:
    """The per-sample estimator ``estimator`` means for a ``bits``-bit activation."""
    if estimator not in CHOSEN_ESTIMATORS:
        return estimator
    return "minmax" if bits >= 8 else "mse"


def check_dynamic_estimator(estimator: str) -> None:
    if estimator in CHOSEN_ESTIMATORS:
        return
    if estimator == STATIC_ESTIMATOR:
        raise ConfigError(
            f"estimator '{estimator}' is not a per-input range; for static ranges use "
            "--activation-ranges static, otherwise auto, per-layer, minmax, percentile[:P] or "
            "mse[:p]"
        )
    name, _ = parse_estimator(estimator)
    if name not in DYNAMIC_ESTIMATORS:
        raise ConfigError(
            f"estimator '{estimator}' cannot run per sample; use auto, per-layer, minmax, "
            "percentile[:P] or mse[:p]"
        )


@dataclass
class SampleQPs:
    """QPs of one tensor for a batch, one value per sample: ``[lo, hi]`` or the threshold."""

    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    threshold: torch.Tensor | None = None


def predicted_slots(targets: list[tuple[str, str]], qps: torch.Tensor) -> dict[str, SampleQPs]:
    """Predicted QPs ``[N, T]`` (linear scale, one column per ``(name, kind)`` of ``targets``)
    as each quantizer's ``SampleQPs``; a range without ``lo`` (a non-negative tensor) starts
    at 0."""
    slots: dict[str, SampleQPs] = {}
    for column, (name, kind) in enumerate(targets):
        slot = slots.setdefault(name, SampleQPs())
        value = qps[:, column]
        if kind == "lo":
            slot.lo = -value
        elif kind == "hi":
            slot.hi = value
        else:
            slot.threshold = value
    for slot in slots.values():
        if slot.hi is not None and slot.lo is None:
            slot.lo = torch.zeros_like(slot.hi)
    return slots


def sample_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as ``[N, M]``, one row per sample (the batch dimension is dim 0)."""
    if x.ndim == 0:
        raise DataError(
            f"quantizer '{name}' sees a scalar; per-sample QPs need a batch dimension, so keep "
            "it static (--override '<name>:enabled=false' or static activation ranges)"
        )
    return x.detach().reshape(x.shape[0], -1).float()


@cache
def column_subset(columns: int, limit: int) -> torch.Tensor:
    """A fixed random subset of ``limit`` column indices of ``columns`` (all if fewer), sorted.

    Random, not strided: a stride that divides the channel count would keep the same channels
    at every position and could miss every outlier channel of a transformer.
    """
    if columns <= limit:
        return torch.arange(columns)
    generator = torch.Generator().manual_seed(columns)
    return torch.randperm(columns, generator=generator)[:limit].sort().values


def search_columns(columns: int) -> torch.Tensor:
    """The columns an MSE range search evaluates (``MSE_SEARCH_COLUMNS`` of them at most)."""
    return column_subset(columns, MSE_SEARCH_COLUMNS)


def check_layer_estimator(estimator: str) -> None:
    """A layer's dynamic estimator: a per-input one, or ``STATIC_ESTIMATOR``."""
    if estimator != STATIC_ESTIMATOR:
        check_dynamic_estimator(estimator)


def static_range(quantizer: Quantizer) -> tuple[float, float]:
    """The ends ``(lo, hi)`` of a per-tensor quantizer's calibrated grid."""
    if quantizer.axis is not None or quantizer.scale is None:
        raise ConfigError(
            f"quantizer '{quantizer.name}' has no calibrated per-tensor range to run as its "
            "static per-input range; calibrate it first (per-channel activations have none)"
        )
    spec = quantizer.spec
    low, high = grid_limits(
        quantizer.scale.double(),
        quantizer.zero_point.double(),
        spec.bits,
        spec.is_signed,  # type: ignore[arg-type]
    )
    return float(low), float(high)


def dynamic_range(rows: torch.Tensor, estimator: str, quantizer: Quantizer) -> SampleQPs:
    """The per-sample ``[lo, hi]`` that ``estimator`` picks for each row (white paper §3.1);
    ``STATIC_ESTIMATOR``: the calibrated range, the same for every row."""
    if estimator == STATIC_ESTIMATOR:
        low, high = static_range(quantizer)
        lo = torch.full((rows.shape[0],), low, dtype=rows.dtype)
        return SampleQPs(lo=lo.clamp(max=0), hi=torch.full_like(lo, high).clamp(min=0))
    name, argument = parse_estimator(estimator)
    if name == "percentile":
        lo, hi = row_percentile_range(rows, argument or 99.99)
    else:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    if name == "mse":
        subset = rows[:, search_columns(rows.shape[1])]
        # The calibrated ranges' full search grid (24 coarse, 7 fine steps): with 12 and 5 (two
        # sided: 6 and 3 per bound) ppocr-cls W8A4 scored 63.0 % against 77.7 % (300 lines;
        # static 74.3 %), the coarse steps missing the clipping that MSE ranges are for.
        lo, hi = rows_mse_range(subset, lo, hi, quantizer.grid, argument or 2.0)
    return SampleQPs(lo=lo.clamp(max=0), hi=hi.clamp(min=0))


class SampleQuantizer:
    """Fake-quantizes one activation with static, dynamic or predicted QPs (QPP §3).

    - ``static`` uniform: the quantizer's calibrated encoding; static Dense+Sparse: the mean of
      the calibration samples' thresholds (the paper's "D+S Static");
    - ``dynamic``: exact QPs of each sample, computed from the tensor at run time (a uniform
      range optionally scaled by a fitted per-layer factor, ``range_offset``);
    - ``predicted``: QPs written into ``predicted`` by a predictor before this tensor arrives.

    While ``recorded`` is a list, every forward appends the exact per-sample QPs (the
    regression targets); while ``densities`` is a list, Dense+Sparse forwards append the
    achieved outlier fraction of each sample.
    """

    def __init__(
        self,
        quantizer: Quantizer,
        scheme: Scheme,
        mode: QPMode,
        outlier_fraction: float = 0.01,
        estimator: str = AUTO_ESTIMATOR,
    ) -> None:
        check_outlier_fraction(outlier_fraction)
        check_dynamic_estimator(estimator)
        self.quantizer = quantizer
        self.scheme = scheme
        self.mode = mode
        self.outlier_fraction = outlier_fraction
        self.estimator = resolve_dynamic_estimator(estimator, quantizer.spec.bits)
        #: ``dynamic`` uniform: the log factor ``δ`` on each sample's exact range, which runs
        #: as ``[lo, hi] e^δ`` (``qpp.predict.offsets.fit_dynamic_offsets``); 0: the exact range.
        self.range_offset = 0.0
        self.nonnegative = False
        #: The floor of the Dense+Sparse dense range, set from the calibration data
        #: (``qpp.quant.dense_sparse.dense_sparse_floor``); ``-inf``: none, ``[-t, t]``.
        self.floor = -math.inf
        self.static_threshold: torch.Tensor | None = None
        self.predicted: SampleQPs | None = None
        self.recorded: list[SampleQPs] | None = None
        self.densities: list[torch.Tensor] | None = None
        #: While a list, predicted forwards append (predicted, exact) QPs for comparison.
        self.pairs: list[tuple[SampleQPs, SampleQPs]] | None = None

    @property
    def name(self) -> str:
        return self.quantizer.name

    @property
    def runs_static(self) -> bool:
        """Whether ``dynamic`` mode runs this uniform layer on its calibrated grid as is
        (``STATIC_ESTIMATOR`` without a range offset)."""
        return (
            self.scheme is Scheme.UNIFORM
            and self.estimator == STATIC_ESTIMATOR
            and self.range_offset == 0.0
        )

    def exact_qps(self, rows: torch.Tensor) -> SampleQPs:
        """The dynamic QPs of each row."""
        if self.scheme is Scheme.DENSE_SPARSE:
            return SampleQPs(
                lo=rows.amin(dim=1), threshold=outlier_threshold(rows, self.outlier_fraction)
            )
        return dynamic_range(rows, self.estimator, self.quantizer)

    def offset(self, qps: SampleQPs) -> SampleQPs:
        """Uniform ``qps`` scaled by ``e^range_offset`` (Dense+Sparse and 0 offsets as is)."""
        if self.scheme is Scheme.DENSE_SPARSE or self.range_offset == 0.0:
            return qps
        factor = math.exp(self.range_offset)
        return SampleQPs(lo=qps.lo * factor, hi=qps.hi * factor)  # type: ignore[operator]

    def _qps(self, rows: torch.Tensor) -> SampleQPs | None:
        if self.mode is QPMode.DYNAMIC and self.runs_static and self.recorded is None:
            return None  # exactly the static grid
        if self.mode is QPMode.DYNAMIC or self.recorded is not None:
            qps = self.exact_qps(rows)
            if self.recorded is not None:  # the regression targets: exact, without offset
                self.recorded.append(qps)
            return self.offset(qps) if self.mode is QPMode.DYNAMIC else qps
        if self.mode is QPMode.PREDICTED:
            qps = self.predicted
            if qps is None:
                raise ConfigError(
                    f"quantizer '{self.name}' expects predicted QPs but no predictor ran before "
                    "it; fit the predictor (qpp.predict.configure_activation_qps)"
                )
            count = (qps.threshold if qps.threshold is not None else qps.hi).shape[0]  # type: ignore[union-attr]
            if count != rows.shape[0]:
                raise DataError(
                    f"quantizer '{self.name}' got {count} predicted QPs for a batch of "
                    f"{rows.shape[0]}; its tensor's first dimension must be the batch"
                )
            if self.pairs is not None:
                self.pairs.append((qps, self.exact_qps(rows)))
            return qps
        return None  # static

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = sample_rows(x, self.name)
        qps = self._qps(rows)
        spec = self.quantizer.spec
        if self.scheme is Scheme.UNIFORM:
            if qps is None:
                return self.quantizer.fake_quantize(x)
            scale, zero_point = choose_qparams(
                qps.lo,
                qps.hi,
                spec.bits,
                spec.symmetric,
                spec.is_signed,  # type: ignore[arg-type]
            )
            return fake_quantize(x, scale, zero_point, spec.bits, spec.is_signed, axis=0)
        threshold = self.static_threshold if qps is None else qps.threshold
        if threshold is None:
            raise ConfigError(
                f"quantizer '{self.name}' has no static Dense+Sparse threshold; calibrate it "
                "(qpp.predict.configure_activation_qps)"
            )
        if self.densities is not None:
            self.densities.append(outlier_density(rows, threshold))
        return dense_sparse_fake_quantize(x, threshold, spec.bits, self.floor, axis=0)
