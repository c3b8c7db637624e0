"""Predicted QPs shifted to serve their scheme (qpp.predict.offsets)."""

import math

import pytest
import torch
from torch import nn

from qpp.api import quantize
from qpp.predict import ActivationQPSettings, configure_activation_qps
from qpp.predict.offsets import best_offset, densities_above, fit_dynamic_offsets, range_errors
from qpp.predict.qps import QPMode
from qpp.quant.affine import choose_qparams, fake_quantize
from qpp.sim.config import QuantConfig

RHO = 0.01


class ClippedNet(nn.Module):
    """x -> min(3x, 2.5) -> conv: the conv's input has an atom (a tied mass) at 2.5."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Conv2d(2, 2, 1, bias=False)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        with torch.no_grad():
            self.scale.weight.copy_(3.0 * torch.eye(2).reshape(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.clamp(self.scale(x), max=2.5))


def batches(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.exp(torch.randn(8, 1, 1, 1, generator=generator) * 0.3)
            * torch.randn(8, 2, 24, 24, generator=generator),
        )
        for _ in range(count)
    ]


def test_densities_above_counts_strictly_larger_magnitudes() -> None:
    rows = torch.tensor([[-3.0, 1.0, 2.0, 2.0], [0.5, -0.5, 4.0, 0.0]])
    thresholds = torch.tensor([[1.5, 2.0, 3.0], [0.4, 0.5, 5.0]], dtype=torch.float64)
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.75, 0.25, 0.0]], dtype=torch.float64)
    assert torch.equal(densities_above(rows, thresholds), expected)


def test_best_offset_prefers_the_least_loss_then_the_smaller_shift() -> None:
    offsets = torch.tensor([-0.1, 0.0, 0.1, 0.2])
    densities = torch.tensor([[0.05, 0.03, 0.01, 0.01], [0.05, 0.02, 0.01, 0.01]])
    assert best_offset((densities - 0.01).square(), offsets) == 2


def _conv_input_densities(fit_offsets: bool) -> tuple[torch.Tensor, dict[str, float]]:
    torch.manual_seed(0)
    net = ClippedNet().eval()
    model = quantize(net, batches(4, 0), QuantConfig(activation_bits=4))
    handle = configure_activation_qps(
        model,
        batches(8, 0),
        ActivationQPSettings(
            mode="predicted",
            scheme="dense-sparse",
            outlier_fraction=RHO,
            sources=("scale.input",),  # the conv's threshold is predicted from the input
            fit_offsets=fit_offsets,
        ),
    )
    with torch.no_grad(), handle.tracking_density() as layers:
        for batch in batches(4, 9):
            model(*batch)
    conv_input = next(layer for layer in layers if layer.name.startswith("conv"))
    return conv_input.values, handle.qp_offsets


def test_offsets_keep_a_tied_mass_out_of_the_outliers() -> None:
    """Without offsets, thresholds predicted just below the clipped value 2.5 make every
    clipped element an outlier; the fitted offset lifts them above it."""
    plain, none = _conv_input_densities(False)
    fitted, offsets = _conv_input_densities(True)
    assert none == {}
    assert offsets and max(offsets.values()) > 0
    plain_error = float((plain - RHO).square().mean())
    fitted_error = float((fitted - RHO).square().mean())
    assert fitted_error < 0.5 * plain_error, (plain_error, fitted_error)
    assert float(fitted.mean()) <= RHO + 0.005


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_only_predicted_thresholds_get_offsets(mode: str) -> None:
    torch.manual_seed(0)
    model = quantize(ClippedNet().eval(), batches(2, 0), QuantConfig(activation_bits=4))
    handle = configure_activation_qps(
        model, batches(2, 0), ActivationQPSettings(mode=mode, scheme="dense-sparse")
    )
    assert handle.qp_offsets == {}


def test_range_errors_are_the_fake_quantization_errors() -> None:
    torch.manual_seed(0)
    model = quantize(ClippedNet().eval(), batches(2, 0), QuantConfig(activation_bits=4))
    handle = configure_activation_qps(model, batches(2, 0), ActivationQPSettings(mode="dynamic"))
    sampler = next(iter(handle.samplers.values()))
    rows = torch.randn(3, 500)
    lo, hi = torch.full((3,), -1.0), torch.tensor([1.0, 2.0, 3.0])
    errors = range_errors(rows, lo, hi, torch.tensor([1.0, 0.5], dtype=torch.float64), sampler)
    for index, factor in enumerate((1.0, 0.5)):
        step = (hi - lo) * factor / 15  # 4 bits: 15 steps
        zero = torch.round(-lo * factor / step)
        quantized = (
            torch.clamp(torch.round(rows / step[:, None]) + zero[:, None], 0, 15) - zero[:, None]
        ) * step[:, None]
        expected = (quantized - rows).double().square().sum(dim=1)
        assert torch.allclose(errors[:, index], expected, rtol=1e-5)


def _first_layer_error(fit_offsets: bool) -> tuple[float, dict[str, float]]:
    """Squared quantization error at the network input on fresh inputs, with a predictor that
    cannot see the input's scale (its mean only) and so predicts one range for all."""
    torch.manual_seed(0)
    model = quantize(ClippedNet().eval(), batches(4, 0), QuantConfig(activation_bits=4))
    handle = configure_activation_qps(
        model,
        batches(8, 0),
        ActivationQPSettings(
            mode="predicted", features=("mean",), sources=("scale.input",), fit_offsets=fit_offsets
        ),
    )
    first = handle.samplers["scale.input"].quantizer
    total = [0.0]

    def measure(module, args, output) -> None:  # type: ignore[no-untyped-def]
        total[0] += float((output - args[0]).square().sum())

    hook = first.register_forward_hook(measure)
    with torch.no_grad():
        for batch in batches(4, 9):
            model(*batch)
    hook.remove()
    return total[0], handle.qp_offsets


def test_uniform_offsets_lower_the_quantization_error() -> None:
    plain, none = _first_layer_error(False)
    fitted, offsets = _first_layer_error(True)
    assert none == {} and "scale.input" in offsets
    assert fitted < plain, (plain, fitted, offsets)


def _first_layer_dynamic_error(model, handle, offset: float) -> float:  # type: ignore[no-untyped-def]
    """Squared quantization error at the network input on fresh inputs in dynamic mode, with
    ``offset`` on the input's exact min-max ranges."""
    handle.set_mode("dynamic")
    sampler = handle.samplers["scale.input"]
    sampler.range_offset = offset
    total = [0.0]

    def measure(module, args, output) -> None:  # type: ignore[no-untyped-def]
        total[0] += float((output - args[0]).square().sum())

    hook = sampler.quantizer.register_forward_hook(measure)
    try:
        with torch.no_grad():
            for batch in batches(4, 9):
                model(*batch)
    finally:
        hook.remove()
        sampler.range_offset = 0.0
        handle.set_mode("predicted")
    return total[0]


def test_dynamic_offsets_clip_exact_min_max_ranges_where_that_lowers_the_error() -> None:
    """At 4 bits a Gaussian's min-max range wastes the grid on its extremes: the offset
    fitted on the exact ranges is negative (it clips) and lowers the quantization error, and
    the recorded exact QPs (the regression targets) stay unscaled."""
    torch.manual_seed(0)
    model = quantize(ClippedNet().eval(), batches(4, 0), QuantConfig(activation_bits=4))
    settings = ActivationQPSettings(
        mode="predicted", estimator="minmax", features=("mean",), sources=("scale.input",)
    )
    handle = configure_activation_qps(model, batches(8, 0), settings)
    names = list(handle.samplers)
    estimators = {name: handle.samplers[name].estimator for name in names}
    offsets = fit_dynamic_offsets(
        model, handle.samplers, handle.predictors, estimators, batches(4, 0)
    )
    assert set(offsets) == set(names)
    assert offsets["scale.input"] < 0, offsets
    # Modes and offsets are as they were.
    assert {s.mode.value for s in handle.samplers.values()} == {"predicted"}
    assert all(s.range_offset == 0.0 for s in handle.samplers.values())
    exact = _first_layer_dynamic_error(model, handle, 0.0)
    clipped = _first_layer_dynamic_error(model, handle, offsets["scale.input"])
    assert clipped < exact, (exact, clipped)
    sampler = handle.samplers["scale.input"]
    sampler.mode, sampler.range_offset, sampler.recorded = QPMode.DYNAMIC, -0.3, []
    rows = torch.randn(2, 100)
    used = sampler(rows)  # fake-quantized on the offset range
    assert sampler.recorded is not None
    assert torch.allclose(sampler.recorded[0].hi, rows.amax(dim=1))  # targets stay exact
    factor, spec = math.exp(-0.3), sampler.quantizer.spec
    lo, hi = rows.amin(dim=1) * factor, rows.amax(dim=1) * factor
    scale, zero_point = choose_qparams(lo, hi, spec.bits, spec.symmetric, spec.is_signed)  # type: ignore[arg-type]
    expected = fake_quantize(rows, scale, zero_point, spec.bits, spec.is_signed, axis=0)  # type: ignore[arg-type]
    assert torch.equal(used, expected)
