"""What a quantizer is, as a plain frozen dataclass that round-trips through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from qpp.errors import ConfigError
from qpp.quant.affine import MAX_BITS, MIN_BITS

GRANULARITIES = ("per-tensor", "per-channel")


@dataclass(frozen=True)
class QuantSpec:
    """A uniform quantizer: bit-width, grid, granularity and the range estimator.

    ``signed=None`` means "signed if symmetric", the usual choice for weights (symmetric, int8)
    and activations (asymmetric, uint8). ``axis`` is the channel axis of a per-channel quantizer;
    ``None`` lets the placement pick the op's output-channel axis.
    """

    bits: int = 8
    symmetric: bool = False
    signed: bool | None = None
    granularity: str = "per-tensor"
    axis: int | None = None
    estimator: str = "minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"bit-width {self.bits!r} is not supported; "
                f"use an integer from {MIN_BITS} to {MAX_BITS}"
            )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"unknown granularity '{self.granularity}'; use one of {', '.join(GRANULARITIES)}"
            )
        from qpp.quant.ranges import check_estimator_name

        check_estimator_name(self.estimator)

    @property
    def is_signed(self) -> bool:
        return self.symmetric if self.signed is None else self.signed

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per-channel"

    def with_changes(self, **changes: Any) -> QuantSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown quantizer setting(s) {sorted(unknown)}; "
                f"allowed: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)
