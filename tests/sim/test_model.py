"""QuantizedModel: names, enable/disable, overrides, calibration and encodings."""

import json

import pytest
import torch
from torch import nn

from qpp.api import prepare, quantize
from qpp.errors import ConfigError, EncodingsError
from qpp.sim.config import LayerOverride, QuantConfig


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def data() -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=generator),) for _ in range(3)]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = SmallNet().eval()
    with torch.no_grad():
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.running_mean.uniform_(-0.5, 0.5)
    return net


def test_all_quantizers_disabled_is_fp32(model: nn.Module, data: list) -> None:
    quantized = quantize(model, data)
    quantized.set_enabled(False)
    x = data[0][0]
    torch.testing.assert_close(quantized(x), model(x), rtol=1e-5, atol=1e-6)


def test_w8a8_is_close_and_w2_is_not(model: nn.Module, data: list) -> None:
    x = data[1][0]
    reference = model(x)
    error8 = (quantize(model, data)(x) - reference).abs().max()
    error2 = (
        (quantize(model, data, QuantConfig(weight_bits=2, activation_bits=2))(x) - reference)
        .abs()
        .max()
    )
    assert error8 < 0.05 * reference.abs().max()
    assert error2 > 4 * error8


def test_enable_by_kind_and_glob(model: nn.Module, data: list) -> None:
    quantized = quantize(model, data)
    quantized.set_enabled(False, kind="activation")
    assert all(q.enabled for q in quantized.select(kind="weight"))
    assert not any(q.enabled for q in quantized.select(kind="activation"))
    quantized.set_enabled(True, "*.output")
    assert all(q.enabled for q in quantized.select("*.output"))
    with pytest.raises(ConfigError, match="no quantizer matches"):
        quantized.select("nothing.like.this")
    with pytest.raises(ConfigError, match="kind"):
        quantized.select(kind="bias")


def test_overrides_change_specs(model: nn.Module, data: list) -> None:
    config = QuantConfig(
        overrides={
            "conv.weight": LayerOverride(bits=4, granularity="per-tensor"),
            "fc.*": LayerOverride(enabled=False),
        }
    )
    quantized = quantize(model, data, config)
    conv = quantized.quantizer("conv.weight")
    assert conv.spec.bits == 4 and conv.scale.numel() == 1
    assert not quantized.quantizer("fc.weight").enabled
    with pytest.raises(ConfigError, match=r"no quantizer is named 'convv\.weight'"):
        prepare(model, data[0], QuantConfig(overrides={"convv.weight": LayerOverride(bits=4)}))


def test_encodings_round_trip_and_reproduce_outputs(model: nn.Module, data: list) -> None:
    quantized = quantize(model, data, QuantConfig(weight_bits=4))
    saved = json.loads(json.dumps(quantized.encodings()))
    fresh = prepare(model, data[0], QuantConfig(weight_bits=4))
    fresh.load_encodings(saved)
    x = data[2][0]
    assert torch.equal(fresh(x), quantized(x))
    assert fresh.encodings() == saved


def test_encodings_from_another_model_are_refused(model: nn.Module, data: list) -> None:
    encodings = quantize(model, data).encodings()
    encodings["renamed.weight"] = encodings.pop("conv.weight")
    fresh = prepare(model, data[0], QuantConfig())
    with pytest.raises(EncodingsError, match="belong to another model"):
        fresh.load_encodings(encodings)


def test_calibration_is_deterministic(model: nn.Module, data: list) -> None:
    first = quantize(model, data).encodings()
    second = quantize(model, data).encodings()
    assert json.dumps(first) == json.dumps(second)


def test_weights_are_quantized_per_output_channel(model: nn.Module, data: list) -> None:
    quantized = quantize(model, data)
    conv = quantized.quantizer("conv.weight")
    weight = quantized.weight("conv.weight")
    assert conv.scale.shape == (weight.shape[0],)
    levels = torch.round(conv(weight) / conv.scale.reshape(-1, 1, 1, 1))
    assert levels.min() >= -128 and levels.max() <= 127
    assert torch.allclose(levels * conv.scale.reshape(-1, 1, 1, 1), conv(weight))


def test_integer_view_matches_fake_quantization(model: nn.Module, data: list) -> None:
    quantized = quantize(model, data)
    conv = quantized.quantizer("conv.weight")
    weight = quantized.weight("conv.weight")
    integer = conv.integer(weight)
    assert integer.values.dtype == torch.int32
    assert torch.equal(integer.dequantize(), conv(weight))


def test_biases_are_simulated_on_the_int32_accumulator_grid(model: nn.Module, data: list) -> None:
    """White paper §2.3 / eq. 11: an integer kernel adds the bias as int32 at scale s_x s_w."""
    from qpp.graph.patterns import get_attr

    quantized = quantize(model, data)
    biases = quantized.bias_quantizers()
    assert sorted(b.weight.name for b in biases) == ["conv.weight", "fc.weight"]
    for bias_quantizer in biases:
        bias = get_attr(quantized.graph_module, bias_quantizer.name)
        on_grid = bias_quantizer(bias)
        step = bias_quantizer.activation.scale.double() * bias_quantizer.weight.scale.double()
        assert torch.equal(on_grid, (torch.round(bias.double() / step) * step).float())
        assert bool(((on_grid.double() - bias.double()).abs() <= step / 2 + 1e-9).all())
        assert not torch.equal(on_grid, bias)
        # The grid follows the quantizers: with the input in float the bias stays float.
        bias_quantizer.activation.enabled = False
        assert torch.equal(bias_quantizer(bias), bias)
        bias_quantizer.activation.enabled = True
    x = data[0][0]
    float_bias = quantize(model, data, QuantConfig(int32_bias=False))
    assert float_bias.bias_quantizers() == []
    difference = (quantized(x) - float_bias(x)).abs().max()
    assert 0 < difference < 0.02 * float_bias(x).abs().max()
