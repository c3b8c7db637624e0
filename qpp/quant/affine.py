"""Uniform affine quantization: the one place where rounding and clamping happen.

White paper (Nagel et al. 2021) §2.1-2.2:

- eq. (3)-(4): ``x_int = clamp(round(x / s) + z; n, p)``, ``x̂ = s (x_int - z)``
- eq. (7): symmetric quantization is the special case ``z = 0``; signed grids are
  ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ``[0, 2^b - 1]``.
- §4 eq. (36): round-to-nearest gets a straight-through gradient, so clipping passes no
  gradient to ``x`` and gives the LSQ gradients to ``s``.

Per-channel quantization broadcasts a vector of scales along ``axis``. Rounding is round half
to even, as torch.round and ONNX QuantizeLinear both do, so the simulation and ONNX Runtime agree
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS = 2
MAX_BITS = 16
#: Smallest scale we emit; a constant (all-zero) tensor gets this instead of 0.
MIN_SCALE = 1e-8


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid ``(n, p)``: ``[-2^(b-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def broadcast_shape(values: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Reshape per-channel ``values`` so they broadcast along ``axis`` of an ``ndim`` tensor."""
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return values.reshape(shape)


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    bits: int,
    symmetric: bool,
    signed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point whose grid covers ``[min_val, max_val]`` (white paper eq. 5-7).

    The range is first widened to include 0, so real zero is exactly representable (zero padding
    and ReLU add no error). Symmetric grids put ``z = 0`` and use ``s = max|x| / p`` (signed) or
    ``s = max / p`` (unsigned). Asymmetric grids use ``s = (max - min) / (p - n)`` and
    ``z = clamp(round(n - min / s); n, p)``. Works element-wise, so vectors give per-channel QPs.
    """
    qmin, qmax = integer_range(bits, signed)
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    if symmetric:
        scale = torch.maximum(-min_val, max_val) / qmax if signed else max_val / qmax
        scale = torch.clamp(scale, min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=MIN_SCALE)
    zero_point = torch.clamp(torch.round(qmin - min_val / scale), qmin, qmax)
    return scale, zero_point


def grid_limits(
    scale: torch.Tensor, zero_point: torch.Tensor, bits: int, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real values of the grid's ends, ``q_min = s (n - z)``, ``q_max = s (p - z)``."""
    qmin, qmax = integer_range(bits, signed)
    return scale * (qmin - zero_point), scale * (qmax - zero_point)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    signed: bool,
    axis: int | None = None,
) -> torch.Tensor:
    """``x_int = clamp(round(x / s) + z; n, p)`` (eq. 3), returned as an int32 tensor."""
    qmin, qmax = integer_range(bits, signed)
    scale = broadcast_shape(scale, x.ndim, axis)
    zero_point = broadcast_shape(zero_point, x.ndim, axis)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def dequantize(
    x_int: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None = None,
) -> torch.Tensor:
    """``x̂ = s (x_int - z)`` (eq. 4)."""
    scale = broadcast_shape(scale, x_int.ndim, axis)
    zero_point = broadcast_shape(zero_point, x_int.ndim, axis)
    return (x_int.float() - zero_point) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with the straight-through gradient of eq. (36)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    signed: bool,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` in float: ``s (clamp(round(x / s) + z; n, p) - z)``.

    Differentiable with the straight-through estimator: ``∂x̂/∂x = 1`` inside the grid and 0
    outside; ``scale`` and ``zero_point`` get the LSQ gradients (white paper §4.1), so the same
    function serves PTQ and QAT with learnable ranges.
    """
    qmin, qmax = integer_range(bits, signed)
    scale = broadcast_shape(scale, x.ndim, axis)
    if not (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
        # No gradient to carry: the same values in place, one buffer instead of eight
        # (calibration and the per-layer sweeps run the model many times): 3x faster on
        # an [8, 32, 160, 160] tensor.
        zero_point = broadcast_shape(torch.round(zero_point), x.ndim, axis)
        x_int = (x / scale).round_().add_(zero_point).clamp_(qmin, qmax)
        return x_int.sub_(zero_point).mul_(scale)
    zero_point = broadcast_shape(round_ste(zero_point), x.ndim, axis)
    scaled = x / scale
    # The gradient follows the unrounded position (LSQ: n < x/s + z < p), so a value that rounds
    # onto a grid end still counts as inside. The forward value is exactly eq. (3): ``position``
    # lies within 1/2 of the integer ``x_int``, so their float difference is exact.
    position = torch.clamp(scaled + zero_point, qmin, qmax)
    x_int = torch.clamp(torch.round(scaled) + zero_point, qmin, qmax)
    x_int = position + (x_int - position).detach()
    return (x_int - zero_point) * scale


@dataclass(frozen=True)
class IntegerTensor:
    """The integer view of a quantized tensor: ``values`` on the grid plus its QPs."""

    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    axis: int | None = None

    @classmethod
    def from_float(
        cls,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        signed: bool,
        axis: int | None = None,
    ) -> IntegerTensor:
        values = quantize(x, scale, zero_point, bits, signed, axis)
        return cls(values, scale, zero_point, bits, signed, axis)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.values, self.scale, self.zero_point, self.axis)


# --- biases on the accumulator grid ----------------------------------------------------------

#: The accumulator of an integer conv/matmul: a bias is stored as int32 on its grid.
INT32_RANGE = (-(2**31), 2**31 - 1)


def bias_scale(
    activation_scale: torch.Tensor, weight_scale: torch.Tensor, channels: int
) -> torch.Tensor:
    """The accumulator scale ``s_x s_w`` of each of ``channels`` outputs, in float64.

    White paper eq. (11): ``W x`` in integers sums ``s_w s_x W_int x_int``, so the bias that an
    integer kernel adds to the int32 accumulator lives on the grid ``s_x s_w`` (per output
    channel where the weight is per channel).
    """
    scale = activation_scale.detach().double().reshape(()) * weight_scale.detach().double()
    return scale.reshape(-1).expand(channels).contiguous()


def quantize_bias(
    bias: torch.Tensor, activation_scale: torch.Tensor, weight_scale: torch.Tensor
) -> IntegerTensor:
    """The bias as int32 on the accumulator grid: ``clamp(round(b / (s_x s_w)); int32)``
    (white paper §2.3 and eq. 11, zero point 0), as ONNX Runtime's QLinearConv / QGemm add it."""
    scale = bias_scale(activation_scale, weight_scale, bias.shape[0])
    values = torch.clamp(torch.round(bias.detach().double() / scale), *INT32_RANGE)
    zero_point = torch.zeros_like(scale)
    return IntegerTensor(values.to(torch.int32), scale, zero_point, 32, True, 0)


def fake_quantize_bias(
    bias: torch.Tensor, activation_scale: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """``quantize_bias`` dequantized, ``s_x s_w clamp(round(b / (s_x s_w)); int32)``, with the
    straight-through gradient to ``b`` (eq. 36). Computed in float64 so the rounding is the one
    ``quantize_bias`` stores, however large the integer."""
    scale = bias_scale(activation_scale, weight_scale, bias.shape[0])
    integer = torch.clamp(round_ste(bias.double() / scale), *INT32_RANGE)
    return (integer * scale).to(bias.dtype)


def snap_to_plateau(
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    signed: bool,
    plateaus: dict[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric QPs whose grid holds an activation's plateau value exactly, when
    rounding the zero point left it up to one step outside the grid.

    Eq. 7 rounds ``z``, which moves the grid's ends ``q_min = s (n - z)``, ``q_max = s (p - z)``
    by up to a step (white paper §2.2); a value just outside is clipped by less than a step.
    For most values that is a rounding error like any other, but an activation's floor (a ReLU
    or hard-swish zero region after a folded affine ``a*y + b``: every such element is ``b``)
    or ceiling holds a share of the whole tensor, and clipping all of it by the same amount
    biases the next layer's sums (on PP-OCRv4 rec with 4-bit PWLQ +BC weights, one such layer
    cost 34 of 100 lines). ``plateaus`` maps values to their share of the tensor; of those
    within a step below ``q_min`` (else above ``q_max``) the farthest out, ``v``, sets the
    grid's end: it keeps ``z`` and takes the slightly larger step ``s' = -v / (z - n)``
    (``v / (p - z)``), so ``v`` is exact and the plateau values between it and the old end
    are no longer clipped. Plateaus inside the grid, or that the range estimator
    clipped on purpose (more than a step outside), are left alone.
    """
    qmin, qmax = integer_range(bits, signed)
    for sign, steps in ((-1.0, float(zero_point) - qmin), (1.0, qmax - float(zero_point))):
        if steps < 1:
            continue
        end = steps * float(scale)
        outside = {
            v: share
            for v, share in plateaus.items()
            if v * sign > 0 and end < abs(v) <= end + float(scale)
        }
        if outside:
            value = max(outside, key=abs)
            return torch.tensor(abs(value) / steps, dtype=scale.dtype), zero_point
    return scale, zero_point
