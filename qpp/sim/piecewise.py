"""The PWLQ quantizer module: a ``Quantizer`` whose grid is piecewise linear (``qpp.quant.pwl``).

Weights: ``m = max|w|`` per channel and the breakpoints of ``spec.piecewise`` (closed form,
bisection or grid search), optionally the paper's bias correction. Activations: the range from
the spec's estimator (signed ``[-m, m]`` if it goes below zero, else one-sided ``[0, m]``, as
PWLQ §5), the breakpoints from a histogram of the calibration data; or (search auto, grid)
the range and the breakpoints searched together on that histogram, and for data that goes a
little below zero (hardswish, GELU) the better, on that histogram, of the signed grid and a
one-sided grid on ``[f, m]`` from the least value ``f``.

The inherited ``scale`` buffer holds each channel's centre step (zero point 0), so code that
reads a scale per channel still works; the grid is in ``range_max`` and ``breakpoints``.
"""

from __future__ import annotations

import math

import torch

from qpp.errors import ConfigError, EncodingsError
from qpp.quant.affine import IntegerTensor, broadcast_shape
from qpp.quant.observers import HistogramObserver, channels_first
from qpp.quant.pwl import (
    MAX_BREAKPOINTS,
    HistogramMagnitude,
    PiecewiseGrid,
    approximate_breakpoint,
    bias_correction,
    bisection_breakpoints,
    choose_breakpoints,
    floored_histogram_search,
    histogram_error,
    joint_histogram_search,
    output_bias_correction,
    output_errors,
    row_errors,
)
from qpp.quant.ranges import activation_range
from qpp.quant.spec import PiecewiseSpec, QuantSpec
from qpp.sim.quantizer import Mode, Quantizer, QuantizerKind


class PiecewiseQuantizer(Quantizer):
    """Fake-quantizes one tensor on a piecewise linear grid (PWLQ), per channel or per tensor."""

    range_max: torch.Tensor
    breakpoints: torch.Tensor
    correction_shift: torch.Tensor
    correction_gain: torch.Tensor
    floor: torch.Tensor

    def __init__(self, name: str, kind: QuantizerKind, spec: QuantSpec) -> None:
        super().__init__(name, kind, spec)
        self.register_buffer("range_max", torch.ones(1))
        self.register_buffer("breakpoints", torch.full((1, 1), 0.5))
        self.register_buffer("correction_shift", torch.zeros(0))
        self.register_buffer("correction_gain", torch.zeros(0))
        # One-sided activation grids: the low end per channel (0 after ReLU, f < 0 floored).
        self.register_buffer("floor", torch.zeros(1))
        self.signed = kind is QuantizerKind.WEIGHT

    @property
    def settings(self) -> PiecewiseSpec:
        assert self.spec.piecewise is not None
        return self.spec.piecewise

    @property
    def grid(self) -> PiecewiseGrid:  # type: ignore[override]
        return PiecewiseGrid(
            self.range_max,
            self.breakpoints,
            self.spec.bits,
            self.settings.form,
            self.signed,
            None if self.signed else self.floor,
        )

    @property
    def corrected(self) -> bool:
        return self.correction_gain.numel() > 0

    # --- encodings ----------------------------------------------------------------------------

    def compute_weight_encoding(
        self, weight: torch.Tensor, input_moment: torch.Tensor | None = None
    ) -> None:
        """``m = max|w|`` and the breakpoints per channel; one more breakpoint per side while
        the relative error is above ``split_above``; then "+BC" if the spec asks.

        ``input_moment``: the layer's ``E[x xᵀ]`` (``qpp.ptq.input_moments``); the searches
        then judge breakpoints by the layer's output error instead of the weight error, and
        "+BC" is the per-channel weight shift fitted to that error."""
        rows = channels_first(weight, self.axis)
        settings = self.settings
        if input_moment is not None and (
            self.axis is None or input_moment.shape[-1] != rows.shape[1]
        ):
            raise ConfigError(
                f"quantizer '{self.name}': the output-error objective needs per-channel weights "
                f"whose rows match the layer's inputs ({tuple(rows.shape)} rows, input moments "
                f"{tuple(input_moment.shape)})"
            )
        count = settings.breakpoints
        # ||w||², or the layer's output energy E[(wᵀx)²] under the output-error objective
        if input_moment is None:
            energy = rows.double().square().sum()
        else:
            energy = output_errors(rows.double(), input_moment).sum()
        norm = float(energy.clamp(min=1e-30))
        while True:
            grid = choose_breakpoints(
                rows,
                self.spec.bits,
                settings.form,
                count,
                settings.search,
                settings.distribution,
                bias_correction=settings.bias_correction,
                gram=input_moment,
            )
            if settings.split_above <= 0 or count >= MAX_BREAKPOINTS:
                break
            errors = row_errors(grid, rows.float(), settings.bias_correction, input_moment)
            error = float(errors.sum()) / norm
            if error <= settings.split_above:
                break
            count += 1
        shift = gain = torch.zeros(0)
        if settings.bias_correction:
            quantized = grid.quantize_rows(rows)
            if input_moment is None:
                shift, gain = bias_correction(rows, quantized)
            else:
                shift, gain = output_bias_correction(rows, quantized, input_moment)
        self.set_piecewise(grid, shift, gain)

    def start_observing(self) -> None:
        super().start_observing()
        # The breakpoints need the data's distribution, whatever the range estimator keeps.
        if "histogram" not in self._statistics:
            self._statistics["histogram"] = HistogramObserver(self.axis)

    def compute_encoding(self) -> None:
        """Search ``auto`` or ``grid``: the range and the breakpoints together on the
        calibration histogram (``joint_histogram_search``). ``approx``, ``bisection``: the
        estimator's range and, from the histogram, the breakpoints (eq. 6 on its CDF, or the
        closed form with σ the data's root mean square)."""
        histogram = self._statistics["histogram"]
        assert isinstance(histogram, HistogramObserver) and histogram.counts is not None
        settings = self.settings
        if settings.search in ("auto", "grid"):
            assert histogram.lo is not None and histogram.hi is not None
            signed = bool((histogram.lo < 0).any())
            arguments = (histogram.counts, histogram.lo, histogram.hi, self.spec.bits)
            grid = joint_histogram_search(*arguments, settings.form, signed, settings.breakpoints)
            if signed:
                floored = floored_histogram_search(*arguments, settings.form, settings.breakpoints)
                if histogram_error(floored, *arguments[:3]).sum() < (
                    histogram_error(grid, *arguments[:3]).sum()
                ):
                    grid, signed = floored, False
            self.signed = signed
            self.set_piecewise(grid, torch.zeros(0), torch.zeros(0))
            self._statistics = {}
            return
        lo, hi = activation_range(self._statistics, self.spec.estimator, super().grid)
        signed = bool((lo < 0).any())
        range_max = torch.maximum(-lo, hi) if signed else hi
        range_max = range_max.reshape(-1).double().clamp(min=1e-8)
        magnitude = HistogramMagnitude(histogram.counts, histogram.lo, histogram.hi, signed)
        if settings.search == "approx" and settings.breakpoints == 1:
            rms = magnitude.rms.clamp(min=1e-12)
            breakpoint_ = approximate_breakpoint(range_max / rms, settings.distribution) * rms
            breakpoints = torch.minimum(breakpoint_.clamp(min=0), range_max / 2)[:, None]
        else:
            breakpoints = bisection_breakpoints(
                range_max, magnitude, self.spec.bits, settings.form, signed, settings.breakpoints
            )
        self.signed = signed
        grid = PiecewiseGrid(
            range_max.float(), breakpoints.float(), self.spec.bits, settings.form, signed
        )
        self.set_piecewise(grid, torch.zeros(0), torch.zeros(0))
        self._statistics = {}

    def set_piecewise(self, grid: PiecewiseGrid, shift: torch.Tensor, gain: torch.Tensor) -> None:
        """Install ``grid`` (and a bias correction, if ``gain`` is not empty)."""
        range_max, breakpoints = grid.range_max.float(), grid.breakpoints.float()
        if not bool(torch.all(range_max > 0) and torch.isfinite(breakpoints).all()):
            raise EncodingsError(f"quantizer '{self.name}': ranges must be positive and finite")
        if not bool(torch.all((breakpoints >= 0) & (breakpoints <= range_max[:, None]))):
            raise EncodingsError(f"quantizer '{self.name}': breakpoints must lie in [0, range_max]")
        if not bool(torch.all(torch.diff(breakpoints, dim=1) >= 0)):
            raise EncodingsError(f"quantizer '{self.name}': breakpoints must increase")
        floor = grid.floor if grid.floor is not None and not grid.signed else None
        if floor is not None and (
            floor.numel() != range_max.numel()
            or not bool(torch.all((floor <= 0) & torch.isfinite(floor)))
        ):
            raise EncodingsError(
                f"quantizer '{self.name}': the floor needs one value <= 0 per channel"
            )
        self.range_max, self.breakpoints = range_max.clone(), breakpoints.clone()
        self.floor = torch.zeros_like(range_max) if floor is None else floor.float().clone()
        self.correction_shift, self.correction_gain = shift.float().clone(), gain.float().clone()
        centre_step = self.grid.tables().steps[:, 0]
        if self.axis is None:
            centre_step = centre_step.reshape(())
        self.set_encoding(centre_step, torch.zeros_like(centre_step))

    def extra_encoding(self) -> dict[str, object]:
        tables = self.grid.tables()
        return {
            "piecewise": {
                "signed": self.signed,
                "range_max": self.range_max.tolist(),
                "breakpoints": self.breakpoints.tolist(),
                "floor": self.floor.tolist(),
                "piece_scales": tables.steps.tolist(),
                "piece_offsets": tables.offsets.tolist(),
                "correction_shift": self.correction_shift.tolist(),
                "correction_gain": self.correction_gain.tolist(),
            }
        }

    def load_extra_encoding(self, data: dict[str, object]) -> None:
        encoding = data.get("piecewise")
        try:
            assert isinstance(encoding, dict)
            range_max = torch.tensor(encoding["range_max"], dtype=torch.float32).reshape(-1)
            breakpoints = torch.tensor(encoding["breakpoints"], dtype=torch.float32)
            shift = torch.tensor(encoding.get("correction_shift", []), dtype=torch.float32)
            gain = torch.tensor(encoding.get("correction_gain", []), dtype=torch.float32)
            signed = bool(encoding.get("signed", True))
            floor = torch.tensor(encoding.get("floor", [0.0]), dtype=torch.float32).reshape(-1)
        except (AssertionError, KeyError, TypeError, ValueError) as error:
            raise EncodingsError(
                f"PWLQ encoding of '{self.name}' is missing or malformed ({error}); quantize again"
            ) from None
        channels = self.scale.numel()
        expected = (channels, self.settings.breakpoints)
        counts = range(self.settings.breakpoints, MAX_BREAKPOINTS + 1)
        split = self.settings.split_above > 0 and self.kind is QuantizerKind.WEIGHT
        shape_ok = breakpoints.ndim == 2 and breakpoints.shape[0] == channels
        if split and shape_ok and breakpoints.shape[1] in counts:
            expected = (channels, breakpoints.shape[1])
        if range_max.numel() != channels or tuple(breakpoints.shape) != expected:
            raise EncodingsError(
                f"PWLQ encoding of '{self.name}' has {range_max.numel()} ranges and breakpoints "
                f"of shape {tuple(breakpoints.shape)}, but its spec needs {channels} and "
                f"{expected}; it belongs to another model or config, quantize again"
            )
        self.signed = signed
        if floor.numel() == 1:  # saved before floors: one-sided grids started at 0
            floor = floor.expand(range_max.shape)
        self.set_piecewise(
            PiecewiseGrid(
                range_max, breakpoints, self.spec.bits, self.settings.form, signed, floor
            ),
            shift,
            gain,
        )

    # --- forward ------------------------------------------------------------------------------

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        quantized = self.grid.fake_quantize(x, self.axis)
        if self.corrected:
            shift = broadcast_shape(self.correction_shift, x.ndim, self.axis)
            gain = broadcast_shape(self.correction_gain, x.ndim, self.axis)
            quantized = (quantized + shift) * gain
        return quantized

    def integer(self, x: torch.Tensor) -> IntegerTensor:
        raise ConfigError(
            f"quantizer '{self.name}' is piecewise linear: its integer view is several "
            "branches; use branches() instead of integer()"
        )

    def branches(self, x: torch.Tensor) -> list[IntegerTensor]:
        """``x`` as integer tensors on per-channel scales whose dequantized sum is this
        quantizer's output (``PiecewiseGrid.branches``); with bias correction every branch's
        scale carries the gain, and one more branch of ones carries ``shift · gain``."""
        if self.mode is not Mode.QUANTIZE:
            raise ConfigError(f"quantizer '{self.name}' has no encoding yet; calibrate first")
        branches = self.grid.branches(x.detach(), self.axis)
        if not self.corrected:
            return branches
        gain = self.correction_gain if self.axis is not None else self.correction_gain[0]
        scaled = [
            IntegerTensor(b.values, b.scale * gain, b.zero_point, b.bits, b.signed, b.axis)
            for b in branches
        ]
        offset = self.correction_shift * self.correction_gain
        sign = torch.sign(offset)
        ones = broadcast_shape(sign, x.ndim, self.axis).expand(x.shape).to(torch.int32)
        scale = offset.abs() if self.axis is not None else offset.abs()[0]
        zero = torch.zeros_like(scale)
        return [*scaled, IntegerTensor(ones.contiguous(), scale, zero, 2, True, self.axis)]

    # --- storage ------------------------------------------------------------------------------

    @property
    def bits_per_element(self) -> int:
        """``b`` bits per value plus the region index: one bit for one breakpoint (paper §4),
        two for two or three (this quantizer's own count, which ``split_above`` may raise)."""
        return self.spec.bits + math.ceil(math.log2(self.breakpoint_count + 1))

    @property
    def breakpoint_count(self) -> int:
        """Breakpoints per side of this quantizer's grid (the spec's until it is encoded)."""
        return max(self.breakpoints.shape[1], self.settings.breakpoints)

    def storage_bytes(self, weight: torch.Tensor) -> int:
        """Values at ``bits_per_element`` plus, per channel, each piece's float scale and each
        tail's float offset (and the correction's two floats)."""
        pieces = self.breakpoint_count + 1
        floats = pieces + self.breakpoint_count + (2 if self.settings.bias_correction else 0)
        return (
            weight.numel() * self.bits_per_element + 7
        ) // 8 + self.range_max.numel() * floats * 4
