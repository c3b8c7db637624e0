"""The quantizer module that the simulation inserts into a captured graph."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import torch

from qpp.errors import ConfigError, EncodingsError
from qpp.quant.affine import (
    IntegerTensor,
    choose_qparams,
    fake_quantize,
    integer_range,
    snap_to_plateau,
)
from qpp.quant.observers import PlateauObserver
from qpp.quant.ranges import Grid, activation_range, make_observers, weight_range
from qpp.quant.spec import QuantSpec

#: The share of an activation's calibration values that must sit on its minimum (maximum) for
#: that value to count as a floor (ceiling) the grid should hold exactly.
PLATEAU_SHARE = 1e-3


class QuantizerKind(StrEnum):
    WEIGHT = "weight"
    ACTIVATION = "activation"


class Mode(StrEnum):
    #: Pass the input through unchanged.
    OFF = "off"
    #: Pass the input through and collect statistics for the range estimator.
    OBSERVE = "observe"
    #: Fake-quantize with the current scale and zero point.
    QUANTIZE = "quantize"


class Quantizer(torch.nn.Module):
    """Fake-quantizes one tensor (a weight, or an activation edge) on a uniform affine grid.

    The encoding (``scale``, ``zero_point``) is a pair of buffers, per tensor (shape ``[]``) or
    per channel along ``spec.axis`` (shape ``[C]``). In ``OBSERVE`` mode the module records the
    statistics its estimator needs and returns its input; ``compute_encoding`` then sets the QPs.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, name: str, kind: QuantizerKind, spec: QuantSpec) -> None:
        super().__init__()
        self.name = name
        self.kind = kind
        self.spec = spec
        self.mode = Mode.OFF
        self.enabled = True
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.calibrated = False
        self._statistics: dict[str, object] = {}
        self._cached: tuple[torch.Tensor, tuple[object, ...], torch.Tensor] | None = None
        #: When set, replaces the static fake-quantization of an activation with per-sample QPs
        #: (dynamic or predicted; see ``qpp.predict``).
        self.per_sample: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: When set, ``OBSERVE`` mode records only ``observed_part(x)`` (e.g. the real tokens of
        #: a padded batch), so values that are not data do not set the range.
        self.observed_part: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: Per-tensor asymmetric activations: hold a floor or ceiling that at least
        #: ``PLATEAU_SHARE`` of the calibration values sit on exactly on the grid
        #: (``qpp.quant.affine.snap_to_plateau``).
        self.exact_plateaus = True
        self._plateaus: PlateauObserver | None = None

    # --- configuration ------------------------------------------------------------------------

    @property
    def axis(self) -> int | None:
        return self.spec.axis if self.spec.per_channel else None

    @property
    def grid(self) -> Grid:
        return Grid(self.spec.bits, self.spec.symmetric, self.spec.is_signed)

    @property
    def integer_range(self) -> tuple[int, int]:
        return integer_range(self.spec.bits, self.spec.is_signed)

    def set_spec(self, spec: QuantSpec) -> None:
        """Change bits, granularity or estimator; the encoding must be computed again."""
        self.spec = spec
        self.calibrated = False
        self._cached = None

    # --- calibration --------------------------------------------------------------------------

    def start_observing(self) -> None:
        self._statistics = make_observers(self.spec.estimator, self.axis)
        self._plateaus = PlateauObserver() if self._snaps_plateaus else None
        self.mode = Mode.OBSERVE

    @property
    def _snaps_plateaus(self) -> bool:
        return (
            self.exact_plateaus
            and self.kind is QuantizerKind.ACTIVATION
            and self.axis is None
            and not self.spec.symmetric
            and self.spec.piecewise is None
        )

    def observe(self, x: torch.Tensor) -> None:
        if self.observed_part is not None:
            x = self.observed_part(x)
            if x.numel() == 0:
                return
        for observer in self._statistics.values():
            observer.update(x)  # type: ignore[attr-defined]
        if self._plateaus is not None:
            self._plateaus.update(x)

    @property
    def has_statistics(self) -> bool:
        return bool(self._statistics) and not next(iter(self._statistics.values())).empty  # type: ignore[attr-defined]

    def compute_encoding(self) -> None:
        """Set scale and zero point from the observed statistics with the spec's estimator."""
        lo, hi = activation_range(self._statistics, self.spec.estimator, self.grid)
        self.set_range(lo, hi)
        if self._plateaus is not None:
            scale, zero_point = snap_to_plateau(
                self.scale,
                self.zero_point,
                self.spec.bits,
                self.spec.is_signed,  # type: ignore[arg-type]
                self._plateaus.plateaus(PLATEAU_SHARE),
            )
            self.set_encoding(scale, zero_point)
        self._statistics = {}
        self._plateaus = None

    def compute_weight_encoding(
        self, weight: torch.Tensor, input_moment: torch.Tensor | None = None
    ) -> None:
        """Set scale and zero point from the weight tensor itself (no data needed).
        ``input_moment`` (an output-error objective) is for PWLQ weights only."""
        if input_moment is not None:
            raise ConfigError(
                f"quantizer '{self.name}': only PWLQ weights take an output-error objective"
            )
        lo, hi = weight_range(weight.detach(), self.axis, self.spec.estimator, self.grid)
        self.set_range(lo, hi)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the QPs whose grid covers ``[lo, hi]`` (per channel if vectors are given)."""
        if self.axis is None:
            lo, hi = lo.reshape(()), hi.reshape(())
        scale, zero_point = choose_qparams(
            lo, hi, self.spec.bits, self.spec.symmetric, self.spec.is_signed
        )
        self.set_encoding(scale, zero_point)

    def set_encoding(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        qmin, qmax = self.integer_range
        if not bool(torch.all((scale > 0) & torch.isfinite(scale))):
            raise EncodingsError(f"quantizer '{self.name}': scales must be positive and finite")
        if not bool(torch.all(zero_point == torch.round(zero_point))):
            raise EncodingsError(f"quantizer '{self.name}': zero points must be integers")
        if not bool(torch.all((zero_point >= qmin) & (zero_point <= qmax))):
            raise EncodingsError(
                f"quantizer '{self.name}': zero points must lie in [{qmin}, {qmax}] for "
                f"{self.spec.bits}-bit {'signed' if self.spec.is_signed else 'unsigned'}"
            )
        self.scale = scale.detach().float().clone()
        self.zero_point = zero_point.detach().float().clone()
        self.calibrated = True
        self.mode = Mode.QUANTIZE
        self._cached = None

    def integer(self, x: torch.Tensor) -> IntegerTensor:
        """The integer view of ``x`` under this quantizer's encoding (values, scale, zero point)."""
        return IntegerTensor.from_float(
            x.detach(), self.scale, self.zero_point, self.spec.bits, self.spec.is_signed, self.axis
        )

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.mode is Mode.OFF:
            return x
        if self.mode is Mode.OBSERVE:
            self.observe(x)
            return x
        if self.per_sample is not None:
            return self.per_sample(x)
        if self.kind is QuantizerKind.WEIGHT and not torch.is_grad_enabled():
            return self._cached_weight(x)
        return self.fake_quantize(x)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on this quantizer's grid, with the straight-through gradient."""
        return fake_quantize(
            x, self.scale, self.zero_point, self.spec.bits, self.spec.is_signed, self.axis
        )

    def _cached_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Weights change rarely: reuse their fake-quantized copy until the tensor changes.

        A change is a different memory view or an in-place write that bumps the tensor's
        version counter (any write under ``torch.no_grad()``). Writes through ``weight.data``
        bypass that counter and are not seen. The cache holds the weight itself, so its memory
        cannot be freed and reused by a new tensor with the same address and version.
        """
        key = (weight.data_ptr(), weight.shape, weight.stride(), weight.dtype, weight._version)
        if self._cached is None or self._cached[1] != key:
            quantized = self.fake_quantize(weight)
            self._cached = (weight.detach(), key, quantized)
        return self._cached[2]

    # --- storage and encodings beyond scale and zero point ---------------------------------------

    @property
    def bits_per_element(self) -> int:
        """Stored bits per quantized value."""
        return self.spec.bits

    def storage_bytes(self, weight: torch.Tensor) -> int:
        """Bytes to store ``weight`` quantized: ``bits`` per element plus one float scale and a
        zero point byte per channel."""
        return (weight.numel() * self.bits_per_element + 7) // 8 + self.scale.numel() * 5

    def extra_encoding(self) -> dict[str, object]:
        """Encoding data beyond scale and zero point (JSON-ready); none for a uniform grid."""
        return {}

    def load_extra_encoding(self, data: dict[str, object]) -> None:
        """Set what ``extra_encoding`` wrote."""

    def extra_repr(self) -> str:
        state = "on" if self.enabled else "off"
        return f"{self.name!r}, {self.kind.value}, {self.spec}, {state}"
