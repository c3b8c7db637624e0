"""Uniform affine quantization (white paper §2.1-2.2, eq. 3-7 and the STE of eq. 36)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpp.quant.affine import (
    INT32_RANGE,
    MAX_BITS,
    MIN_BITS,
    MIN_SCALE,
    IntegerTensor,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_bias,
    grid_limits,
    integer_range,
    quantize,
    quantize_bias,
)

EPS32 = float(torch.finfo(torch.float32).eps)


def random_tensor(shape: list[int], low: float, high: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=generator)


@st.composite
def grids(draw: st.DrawFn) -> dict:
    """A bit-width, grid type and a range ``[lo, hi]`` that may or may not contain 0."""
    lo = draw(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False))
    width = draw(st.floats(0.0, 2e3, allow_nan=False, allow_subnormal=False))
    return {
        "bits": draw(st.integers(MIN_BITS, MAX_BITS)),
        "symmetric": draw(st.booleans()),
        "signed": draw(st.booleans()),
        "lo": lo,
        "hi": lo + width,
    }


def qparams_of(grid: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return choose_qparams(
        torch.tensor(grid["lo"]),
        torch.tensor(grid["hi"]),
        grid["bits"],
        grid["symmetric"],
        grid["signed"],
    )


# --- the integer grid ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(MIN_BITS, MAX_BITS + 1))
def test_integer_range_has_2_to_the_b_levels(bits: int) -> None:
    signed_lo, signed_hi = integer_range(bits, signed=True)
    unsigned_lo, unsigned_hi = integer_range(bits, signed=False)
    assert (signed_lo, signed_hi) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (unsigned_lo, unsigned_hi) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [-1, 0, 1, 17, 32])
def test_unsupported_bit_widths_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"\[2, 16\], got {bits}"):
        integer_range(bits, signed=False)
    with pytest.raises(ValueError):
        fake_quantize(torch.zeros(3), torch.tensor(1.0), torch.tensor(0.0), bits, signed=True)
    with pytest.raises(ValueError):
        quantize(torch.zeros(3), torch.tensor(1.0), torch.tensor(0.0), bits, signed=True)


# --- choosing scale and zero point ---------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(grid=grids())
def test_qparams_are_valid_and_zero_is_exact(grid: dict) -> None:
    scale, zero_point = qparams_of(grid)
    qmin, qmax = integer_range(grid["bits"], grid["signed"])
    assert scale.item() >= np.float32(MIN_SCALE)
    assert zero_point.item() == round(zero_point.item())
    assert qmin <= zero_point.item() <= qmax
    if grid["symmetric"]:
        assert zero_point.item() == 0
    zero = torch.zeros(4)
    integers = quantize(zero, scale, zero_point, grid["bits"], grid["signed"])
    assert torch.equal(integers.float(), zero_point.expand(4))
    assert torch.equal(fake_quantize(zero, scale, zero_point, grid["bits"], grid["signed"]), zero)


@settings(max_examples=50, deadline=None)
@given(grid=grids())
def test_asymmetric_grid_covers_the_range_within_half_a_step(grid: dict) -> None:
    """The zero point is rounded, so each grid end moves by at most s/2 (and 0 is included)."""
    scale, zero_point = choose_qparams(
        torch.tensor(grid["lo"]), torch.tensor(grid["hi"]), grid["bits"], False, grid["signed"]
    )
    q_min, q_max = grid_limits(scale, zero_point, grid["bits"], grid["signed"])
    lo, hi = min(grid["lo"], 0.0), max(grid["hi"], 0.0)
    slack = scale.item() * (0.5 + 1e-3) + 1e-6 * max(abs(lo), abs(hi))
    assert q_min.item() <= 0.0 <= q_max.item()
    assert q_min.item() <= lo + slack
    assert q_max.item() >= hi - slack
    if scale.item() > np.float32(MIN_SCALE):  # a floored scale gives a wider grid on purpose
        assert q_min.item() >= lo - slack
        assert q_max.item() <= hi + slack


def test_symmetric_signed_grid_is_centred_on_zero() -> None:
    scale, zero_point = choose_qparams(torch.tensor(-3.0), torch.tensor(1.5), 8, True, True)
    assert zero_point.item() == 0
    assert scale.item() == pytest.approx(3.0 / 127)
    q_min, q_max = grid_limits(scale, zero_point, 8, True)
    assert q_max.item() == pytest.approx(3.0)
    assert q_min.item() == pytest.approx(-3.0 * 128 / 127)


def test_symmetric_unsigned_grid_starts_at_zero() -> None:
    scale, zero_point = choose_qparams(torch.tensor(-1.0), torch.tensor(6.0), 4, True, False)
    q_min, q_max = grid_limits(scale, zero_point, 4, False)
    assert zero_point.item() == 0
    assert q_min.item() == 0.0
    assert q_max.item() == pytest.approx(6.0)


def test_positive_range_is_widened_to_include_zero() -> None:
    scale, zero_point = choose_qparams(torch.tensor(2.0), torch.tensor(3.0), 8, False, False)
    q_min, q_max = grid_limits(scale, zero_point, 8, False)
    assert zero_point.item() == 0
    assert q_min.item() == 0.0
    assert q_max.item() == pytest.approx(3.0)


def test_constant_zero_tensor_gets_the_smallest_scale() -> None:
    scale, zero_point = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), 8, False, False)
    assert scale.item() == np.float32(MIN_SCALE)
    x = torch.zeros(5)
    assert torch.equal(fake_quantize(x, scale, zero_point, 8, False), x)


def test_per_channel_qparams_equal_per_tensor_qparams_of_each_channel() -> None:
    lo = torch.tensor([-1.0, 0.0, -5.0, 0.5])
    hi = torch.tensor([1.0, 3.0, 0.1, 0.7])
    for symmetric in (False, True):
        scales, zero_points = choose_qparams(lo, hi, 6, symmetric, symmetric)
        for c in range(4):
            scale, zero_point = choose_qparams(lo[c], hi[c], 6, symmetric, symmetric)
            assert scales[c] == scale
            assert zero_points[c] == zero_point


# --- quantize, dequantize, fake-quantize ---------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(grid=grids())
def test_asymmetric_grid_has_exactly_2_to_the_b_equally_spaced_levels(grid: dict) -> None:
    bits = grid["bits"]
    scale, zero_point = choose_qparams(
        torch.tensor(grid["lo"]), torch.tensor(grid["hi"]), bits, False, grid["signed"]
    )
    q_min, q_max = grid_limits(scale, zero_point, bits, grid["signed"])
    step = scale.item()
    x = torch.linspace(q_min.item() - 3 * step, q_max.item() + 3 * step, 2 ** (bits + 2))
    out = fake_quantize(x, scale, zero_point, bits, grid["signed"])
    assert bool((torch.diff(out) >= 0).all())  # monotone, so distinct values are the level set
    levels = torch.cat([out[:1], out[1:][torch.diff(out) > 0]])
    if scale.item() > np.float32(MIN_SCALE):  # a zero range collapses onto very few levels
        assert levels.numel() == 2**bits
        gaps = torch.diff(levels.double())
        ulps = 4 * EPS32 * max(abs(q_min.item()), abs(q_max.item()))
        assert (gaps - step).abs().max().item() <= ulps
    assert levels.min() == q_min
    assert levels.max() == q_max
    assert (levels == 0).any()


@settings(max_examples=50, deadline=None)
@given(
    grid=grids(),
    shape=st.lists(st.integers(1, 6), min_size=0, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_rounding_error_is_at_most_half_a_step_inside_and_clips_outside(
    grid: dict, shape: list[int], seed: int
) -> None:
    bits, signed = grid["bits"], grid["signed"]
    scale, zero_point = qparams_of(grid)
    q_min, q_max = grid_limits(scale, zero_point, bits, signed)
    span = (q_max - q_min).item() + scale.item()
    x = random_tensor(shape, q_min.item() - span, q_max.item() + span, seed)
    out = fake_quantize(x, scale, zero_point, bits, signed)
    inside = (x >= q_min) & (x <= q_max)
    error = (out.double() - x.double()).abs()
    # float32 division and multiplication may move a tie by a few ulps of x / s
    bound = scale.item() / 2 + 4 * EPS32 * (x.abs().double() + scale.item() * (2**bits + 1))
    assert bool((error[inside] <= bound[inside]).all())
    assert bool((out[x > q_max] == q_max).all())
    assert bool((out[x < q_min] == q_min).all())
    assert bool(((out >= q_min) & (out <= q_max)).all())


@settings(max_examples=50, deadline=None)
@given(
    grid=grids(),
    shape=st.lists(st.integers(1, 6), min_size=0, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_dequantize_of_quantize_equals_fake_quantize_bit_exactly(
    grid: dict, shape: list[int], seed: int
) -> None:
    bits, signed = grid["bits"], grid["signed"]
    scale, zero_point = qparams_of(grid)
    x = random_tensor(shape, 2 * min(grid["lo"], 0.0) - 1, 2 * max(grid["hi"], 0.0) + 1, seed)
    integers = quantize(x, scale, zero_point, bits, signed)
    qmin, qmax = integer_range(bits, signed)
    assert integers.dtype == torch.int32
    assert bool(((integers >= qmin) & (integers <= qmax)).all())
    fake = fake_quantize(x, scale, zero_point, bits, signed)
    assert torch.equal(dequantize(integers, scale, zero_point), fake)
    # Fake-quantization is idempotent: grid points are fixed points.
    assert torch.equal(fake_quantize(fake, scale, zero_point, bits, signed), fake)
    # The in-place path without gradients gives the straight-through path's values exactly.
    tracked = fake_quantize(x.clone().requires_grad_(), scale, zero_point, bits, signed)
    assert tracked.requires_grad and not fake.requires_grad
    assert torch.equal(tracked.detach(), fake)


@settings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    axis=st.sampled_from([0, 1, -1]),
    bits=st.integers(MIN_BITS, MAX_BITS),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_channel_equals_per_tensor_channel_by_channel(
    shape: list[int], axis: int, bits: int, symmetric: bool, seed: int
) -> None:
    x = random_tensor(shape, -3.0, 3.0, seed)
    channels = x.shape[axis]
    ranges = random_tensor([2, channels], -2.0, 2.0, seed + 1)
    lo, hi = ranges.amin(0), ranges.amax(0)
    scale, zero_point = choose_qparams(lo, hi, bits, symmetric, symmetric)
    fake = fake_quantize(x, scale, zero_point, bits, symmetric, axis=axis)
    integers = quantize(x, scale, zero_point, bits, symmetric, axis=axis)
    assert torch.equal(dequantize(integers, scale, zero_point, axis=axis), fake)
    tracked = fake_quantize(x, scale.requires_grad_(), zero_point, bits, symmetric, axis=axis)
    assert torch.equal(tracked.detach(), fake)  # the straight-through path, same values
    scale = scale.detach()
    for c in range(channels):
        channel = x.select(axis, c)
        expected = fake_quantize(channel, scale[c], zero_point[c], bits, symmetric)
        assert torch.equal(fake.select(axis, c), expected)
        expected_int = quantize(channel, scale[c], zero_point[c], bits, symmetric)
        assert torch.equal(integers.select(axis, c), expected_int)


def test_rounding_is_half_to_even_like_numpy() -> None:
    scale = torch.tensor(0.25)  # a power of two, so x / s is exact
    ties = (torch.arange(-20, 20) + 0.5) * scale
    integers = quantize(ties, scale, torch.tensor(0.0), 8, signed=True)
    expected = np.rint(ties.numpy() / 0.25).astype(np.int32)
    assert np.array_equal(integers.numpy(), expected)
    small = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    even = [0, 2, 2, 0, -2, -2]
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    assert quantize(small, one, zero, 8, signed=True).tolist() == even
    assert fake_quantize(small, one, zero, 8, signed=True).tolist() == even


def _onnx_quantize_linear(x: np.ndarray, scale: float, zero_point: int, signed: bool) -> np.ndarray:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    element = TensorProto.INT8 if signed else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"])],
        "quantize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor_value_info("y", element, [x.size])],
        [
            numpy_helper.from_array(np.array(scale, np.float32), "scale"),
            numpy_helper.from_array(
                np.array(zero_point, np.int8 if signed else np.uint8), "zero_point"
            ),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.int32)


@pytest.mark.parametrize(
    ("scale", "zero_point", "signed"),
    [(0.25, 3, False), (0.0173, 128, False), (0.031, 0, True), (0.5, -5, True)],
)
def test_quantize_matches_onnx_runtime_quantize_linear(
    scale: float, zero_point: int, signed: bool
) -> None:
    rng = np.random.default_rng(0)
    ties = (np.arange(-300, 300) + 0.5) * scale
    x = np.concatenate([ties, rng.normal(0.0, 2.0, 4000)]).astype(np.float32)
    expected = _onnx_quantize_linear(x, scale, zero_point, signed)
    ours = quantize(
        torch.from_numpy(x), torch.tensor(scale), torch.tensor(float(zero_point)), 8, signed
    )
    assert np.array_equal(ours.numpy(), expected)


# --- gradients (STE, LSQ) ------------------------------------------------------------------------


def test_straight_through_gradient_is_one_inside_and_zero_outside() -> None:
    scale, zero_point = torch.tensor(0.1), torch.tensor(5.0)
    q_min, q_max = grid_limits(scale, zero_point, 4, False)  # [-0.5, 1.0]
    # -0.47 and 0.97 round onto the grid's ends but lie inside it.
    x = torch.tensor(
        [-2.0, -0.73, -0.47, -0.31, 0.0, 0.04, 0.37, 0.93, 0.97, 1.26, 3.0], requires_grad=True
    )
    fake_quantize(x, scale, zero_point, 4, False).sum().backward()
    assert x.grad is not None
    inside = (x > q_min) & (x < q_max)
    assert torch.equal(x.grad, inside.float())
    assert x.grad[2] == x.grad[8] == 1


def test_scale_and_zero_point_get_the_lsq_gradients() -> None:
    """∂x̂/∂s = round(x/s) - x/s inside, n - z or p - z outside; ∂x̂/∂z = 0 inside, -s outside."""
    bits, signed = 4, False
    qmin, qmax = integer_range(bits, signed)
    scale = torch.tensor(0.1, requires_grad=True)
    zero_point = torch.tensor(5.0, requires_grad=True)
    x = torch.tensor([-2.0, -0.47, -0.33, 0.04, 0.37, 0.93, 0.97, 3.0])
    out = fake_quantize(x, scale, zero_point, bits, signed)
    scale_grads = [torch.autograd.grad(y, scale, retain_graph=True)[0] for y in out]
    zero_grads = [torch.autograd.grad(y, zero_point, retain_graph=True)[0] for y in out]
    s, z = 0.1, 5.0
    for i, value in enumerate(x.tolist()):
        y = value / s
        if y + z < qmin:
            expected_scale, expected_zero = qmin - z, -s
        elif y + z > qmax:
            expected_scale, expected_zero = qmax - z, -s
        else:
            expected_scale, expected_zero = round(y) - y, 0.0
        assert scale_grads[i].item() == pytest.approx(expected_scale, abs=1e-5)
        assert zero_grads[i].item() == pytest.approx(expected_zero, abs=1e-6)


def test_per_channel_scale_gets_a_gradient_per_channel() -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([0.05, 0.1, 0.2], requires_grad=True)
    fake_quantize(x, scale, torch.zeros(3), 4, True, axis=0).square().sum().backward()
    assert scale.grad is not None
    assert scale.grad.shape == (3,)
    assert bool(torch.isfinite(scale.grad).all() and (scale.grad != 0).all())


# --- the integer view ----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    grid=grids(),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_integer_tensor_round_trips(grid: dict, per_channel: bool, seed: int) -> None:
    bits, signed = grid["bits"], grid["signed"]
    x = random_tensor([3, 5], grid["lo"] - 1, grid["hi"] + 1, seed)
    if per_channel:
        axis: int | None = 0
        lo = torch.tensor([grid["lo"], grid["lo"] / 2, grid["lo"] - 1])
        hi = torch.tensor([grid["hi"], grid["hi"] * 2, grid["hi"] + 1])
        scale, zero_point = choose_qparams(lo, hi, bits, grid["symmetric"], signed)
    else:
        axis = None
        scale, zero_point = qparams_of(grid)
    view = IntegerTensor.from_float(x, scale, zero_point, bits, signed, axis)
    qmin, qmax = integer_range(bits, signed)
    assert view.values.dtype == torch.int32
    assert bool(((view.values >= qmin) & (view.values <= qmax)).all())
    assert torch.equal(view.dequantize(), fake_quantize(x, scale, zero_point, bits, signed, axis))
    again = IntegerTensor.from_float(view.dequantize(), scale, zero_point, bits, signed, axis)
    assert torch.equal(again.values, view.values)


# --- biases on the accumulator grid (eq. 11) ----------------------------------------------------


def test_bias_lands_on_the_accumulator_grid_per_output_channel() -> None:
    bias = random_tensor([6], -2.0, 2.0, seed=3)
    activation_scale = torch.tensor(0.037)
    weight_scale = random_tensor([6], 1e-3, 1e-2, seed=4)
    integer = quantize_bias(bias, activation_scale, weight_scale)
    step = activation_scale.double() * weight_scale.double()
    assert integer.values.dtype == torch.int32
    torch.testing.assert_close(integer.scale, step)
    # Nearest grid point: within half a step of the float bias.
    assert bool(((integer.dequantize() - bias.double()).abs() <= step / 2 + 1e-12).all())
    # The simulation's fake-quantized bias is exactly the stored integers times the step.
    simulated = fake_quantize_bias(bias, activation_scale, weight_scale)
    assert torch.equal(simulated, (integer.values.double() * step).float())


def test_bias_beyond_int32_saturates_and_per_tensor_weights_broadcast() -> None:
    bias = torch.tensor([1e6, -1e6, 0.3])
    scale = torch.tensor(1e-4)
    integer = quantize_bias(bias, scale, scale)
    assert integer.values.tolist()[:2] == [INT32_RANGE[1], INT32_RANGE[0]]
    assert integer.values[2] == round(float(bias[2]) / float(scale) ** 2)
    assert integer.scale.shape == (3,)


def test_bias_rounding_passes_the_straight_through_gradient() -> None:
    bias = torch.tensor([0.123, -0.456], requires_grad=True)
    fake_quantize_bias(bias, torch.tensor(0.1), torch.tensor([0.01, 0.02])).sum().backward()
    assert bias.grad is not None
    torch.testing.assert_close(bias.grad, torch.ones(2))
