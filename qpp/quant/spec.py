"""What a quantizer is, as a plain frozen dataclass that round-trips through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from qpp.errors import ConfigError
from qpp.quant.affine import MAX_BITS, MIN_BITS

GRANULARITIES = ("per-tensor", "per-channel")


@dataclass(frozen=True)
class PiecewiseSpec:
    """Piecewise linear quantization (PWLQ, Fang et al. 2020) settings; see ``qpp.quant.pwl``.

    ``form``: paper (eq. 3), non-overlapping (the official code's) or overlapping.
    ``breakpoints``: per side, 1 (the paper) to 3 (supplement eq. 1).
    ``search``: auto (default: per channel the better of approx and a coarse-to-fine search,
    judged by the weight error after +BC when it is on), approx (closed form), bisection
    (eq. 6) or grid (coarse-to-fine on L2 error). Activations: auto and grid search the clip
    range and the breakpoints jointly on the calibration histogram; approx and bisection keep
    the estimator's range and put the breakpoints on it.
    ``distribution``: gaussian, laplacian or empirical, for approx and bisection.
    ``bias_correction``: the paper's "+BC" on weights (per-channel mean and std).
    ``split_above``: weights only (ours, not the paper's): a layer whose relative squared
    weight error ``||ŵ - w||² / ||w||²`` with ``breakpoints`` per side is above this gets one
    more breakpoint per side (supplement eq. 1), paying one more region bit per weight; 0
    (default): never. Heavy-tailed layers are the ones a single breakpoint leaves coarse.
    ``objective``: weights only, what the ``auto`` and ``grid`` searches minimise per channel:
    ``weight`` (default, the paper), the squared weight error ``||ŵ - w||²``; ``output`` (ours,
    not the paper's), the layer's mean squared output error ``(ŵ - w)ᵀ E[x xᵀ] (ŵ - w)`` on
    the calibration data (``qpp.ptq.input_moments``), which also counts the mean output
    shift that a weight error causes on inputs with a non-zero mean; "+BC" is then the
    per-channel weight shift that minimises that error (``output_bias_correction``).
    """

    form: str = "non-overlapping"
    breakpoints: int = 1
    search: str = "auto"
    distribution: str = "gaussian"
    bias_correction: bool = False
    split_above: float = 0.0
    objective: str = "weight"

    def __post_init__(self) -> None:
        from qpp.quant.pwl import DISTRIBUTIONS, FORMS, MAX_BREAKPOINTS, OBJECTIVES, SEARCHES

        choices = {
            "form": FORMS,
            "search": SEARCHES,
            "distribution": DISTRIBUTIONS,
            "objective": OBJECTIVES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"unknown PWLQ {key} '{getattr(self, key)}'; use one of {', '.join(allowed)}"
                )
        if not isinstance(self.breakpoints, int) or not 1 <= self.breakpoints <= MAX_BREAKPOINTS:
            raise ConfigError(
                f"PWLQ takes 1 to {MAX_BREAKPOINTS} breakpoints per side, got {self.breakpoints!r}"
            )
        if not isinstance(self.split_above, (int, float)) or not 0 <= self.split_above < 1:
            raise ConfigError(
                f"PWLQ split_above is a relative squared error in [0, 1), got "
                f"{self.split_above!r}; e.g. 0.015 splits layers above 1.5 %"
            )
        if self.objective == "output" and self.search not in ("auto", "grid"):
            raise ConfigError(
                f"the output-error objective steers the breakpoint searches; --breakpoint-search "
                f"{self.search} has none: use auto or grid, or --breakpoint-objective weight"
            )
        if self.search == "approx" and self.distribution == "empirical":
            raise ConfigError(
                "the approximate breakpoint assumes a gaussian or laplacian distribution; "
                "use --breakpoint-search bisection (or grid) with the empirical distribution"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PiecewiseSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown PWLQ setting(s) {sorted(unknown)}; "
                f"allowed: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)


@dataclass(frozen=True)
class QuantSpec:
    """A quantizer: bit-width, grid, granularity and the range estimator.

    ``signed=None`` means "signed if symmetric", the usual choice for weights (symmetric, int8)
    and activations (asymmetric, uint8). ``axis`` is the channel axis of a per-channel quantizer;
    ``None`` lets the placement pick the op's output-channel axis. ``piecewise`` makes it a PWLQ
    quantizer (``None``: one uniform grid).
    """

    bits: int = 8
    symmetric: bool = False
    signed: bool | None = None
    granularity: str = "per-tensor"
    axis: int | None = None
    estimator: str = "minmax"
    piecewise: PiecewiseSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.piecewise, dict):  # from to_dict() / JSON
            object.__setattr__(self, "piecewise", PiecewiseSpec.from_dict(self.piecewise))
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
