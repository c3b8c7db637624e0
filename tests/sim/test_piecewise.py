"""PWLQ in the simulation: the quantizer module, encodings, config, storage and branches."""

import json

import pytest
import torch
from torch import nn

from qpp.api import prepare, quantize, run
from qpp.errors import ConfigError, EncodingsError
from qpp.pipeline import quantized_size_bytes, weight_bits_per_element
from qpp.quant import pwl
from qpp.quant.observers import channels_first
from qpp.quant.spec import PiecewiseSpec, QuantSpec
from qpp.sim.config import QuantConfig
from qpp.sim.model import QuantizedModel
from qpp.sim.piecewise import PiecewiseQuantizer


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.conv2(y)).mean((2, 3)))


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


PWLQ_W4 = QuantConfig(weight_bits=4, weight_quantizer="pwlq")
PWLQ_W4A4_BC = QuantConfig(
    weight_bits=4,
    activation_bits=4,
    weight_quantizer="pwlq",
    activation_quantizer="pwlq",
    piecewise=PiecewiseSpec(bias_correction=True, breakpoints=2, search="bisection"),
)


@pytest.fixture(scope="module")
def pwlq_w4(model: nn.Module, data: list) -> QuantizedModel:
    return quantize(model, data, PWLQ_W4)


@pytest.fixture(scope="module")
def pwlq_w4a4(model: nn.Module, data: list) -> QuantizedModel:
    """Weights and activations PWLQ, two breakpoints, bias correction."""
    return quantize(model, data, PWLQ_W4A4_BC)


def test_weight_quantizers_apply_the_grid_of_pwl(pwlq_w4: QuantizedModel) -> None:
    quantized = pwlq_w4
    weights = list(quantized.weight_quantizers())
    assert len(weights) == 3
    for quantizer, weight in weights:
        assert isinstance(quantizer, PiecewiseQuantizer)
        rows = channels_first(weight, quantizer.axis)
        grid = pwl.choose_breakpoints(rows, 4)
        expected = grid.fake_quantize(weight, quantizer.axis)
        assert torch.equal(quantizer(weight), expected)
        assert torch.allclose(quantizer.range_max, rows.abs().amax(dim=1))
    activations = quantized.select(kind="activation")
    assert activations and not any(isinstance(q, PiecewiseQuantizer) for q in activations)


@pytest.mark.parametrize("bits", [3, 4])
def test_pwlq_weights_have_lower_mse_than_uniform_on_every_layer(
    model: nn.Module, data: list, bits: int
) -> None:
    uniform = quantize(model, data, QuantConfig(weight_bits=bits))
    piecewise = quantize(model, data, QuantConfig(weight_bits=bits, weight_quantizer="pwlq"))
    for (u, weight), (p, _) in zip(
        uniform.weight_quantizers(), piecewise.weight_quantizers(), strict=True
    ):
        assert (p(weight) - weight).square().mean() < (u(weight) - weight).square().mean()


def test_bias_correction_keeps_each_channels_std(model: nn.Module, data: list) -> None:
    config = QuantConfig(
        weight_bits=3, weight_quantizer="pwlq", piecewise=PiecewiseSpec(bias_correction=True)
    )
    quantized = quantize(model, data, config)
    for quantizer, weight in quantized.weight_quantizers():
        rows = channels_first(weight, quantizer.axis)
        corrected = channels_first(quantizer(weight), quantizer.axis)
        assert torch.allclose(corrected.std(dim=1), rows.std(dim=1), rtol=1e-4)


def test_activations_get_one_sided_or_signed_grids(pwlq_w4a4: QuantizedModel) -> None:
    quantized = pwlq_w4a4
    activations = quantized.select(kind="activation")
    assert all(isinstance(q, PiecewiseQuantizer) for q in activations)
    assert {q.signed for q in activations} == {True, False}  # the input; post-ReLU edges
    for quantizer in activations:
        x = torch.linspace(-5, 5, 1001)
        out = quantizer(x)
        low = -float(quantizer.range_max) if quantizer.signed else 0.0
        assert float(out.min()) >= low - 1e-6 and float(out.max()) <= float(quantizer.range_max)
        assert len(torch.unique(out)) <= 3 * 2**4  # three pieces of at most 2^b levels
        assert quantizer.breakpoints.shape == (1, 2)


class HardswishNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(nn.functional.hardswish(2 * self.conv(x)))


def test_hardswish_activations_get_a_floored_grid(data: list) -> None:
    """With the joint search (auto), the hardswish output's grid is one-sided on [f, m] with
    f near -0.375 (zero exact, the symmetric network input stays signed); it beats the signed
    grid on that tensor; its floor survives a JSON round trip, and an encoding saved before
    floors existed loads as the one-sided grid from 0."""
    torch.manual_seed(0)
    model = HardswishNet().eval()
    config = QuantConfig(
        weight_bits=8, activation_bits=4, weight_quantizer="pwlq", activation_quantizer="pwlq"
    )
    quantized = quantize(model, data, config)
    inputs = {q.name: q for q in quantized.select(kind="activation")}
    floored = [q for q in inputs.values() if not q.signed and float(q.floor.min()) < 0]
    assert len(floored) == 1 and any(q.signed for q in inputs.values())
    quantizer = floored[0]
    assert -0.376 - float(quantizer.scale) <= float(quantizer.floor[0]) < -0.3
    assert float(quantizer(torch.zeros(4)).abs().max()) == 0.0
    with torch.no_grad():
        hidden = nn.functional.hardswish(2 * model.conv(torch.cat([d[0] for d in data])))
    rows = hidden.reshape(1, -1)
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    counts = torch.histc(rows, 2048, float(lo), float(hi))[None].double()
    signed_grid = pwl.joint_histogram_search(counts, lo, hi, 4, signed=True)
    own_error = (quantizer.grid.quantize_rows(rows) - rows).square().mean()
    assert own_error < 0.7 * (signed_grid.quantize_rows(rows) - rows).square().mean()
    encodings = json.loads(json.dumps(quantized.encodings()))
    rebuilt = prepare(model, data[0], config)
    rebuilt.load_encodings(encodings)
    assert torch.equal(run(rebuilt, data), run(quantized, data))
    del encodings[quantizer.name]["piecewise"]["floor"]
    rebuilt.load_encodings(encodings)
    assert float(rebuilt.quantizer(quantizer.name).floor.abs().max()) == 0.0
    assert float(rebuilt.quantizer(quantizer.name)(torch.tensor([-0.3])).abs()) == 0.0


def test_encodings_round_trip_through_json(
    model: nn.Module, data: list, pwlq_w4a4: QuantizedModel
) -> None:
    quantized = pwlq_w4a4
    text = json.dumps(quantized.encodings())
    piecewise = next(iter(json.loads(text).values()))["piecewise"]
    assert {"range_max", "breakpoints", "piece_scales", "piece_offsets"} <= set(piecewise)
    config = QuantConfig.from_json(PWLQ_W4A4_BC.to_json())
    assert config == PWLQ_W4A4_BC
    rebuilt = prepare(model, data[0], config)
    rebuilt.load_encodings(json.loads(text))
    assert torch.equal(run(rebuilt, data), run(quantized, data))
    uniform = prepare(model, data[0], QuantConfig(weight_bits=4, activation_bits=4))
    with pytest.raises(EncodingsError, match="uniform or pwlq"):
        uniform.load_encodings(json.loads(text))


def test_malformed_piecewise_encoding_is_a_user_error(
    model: nn.Module, data: list, pwlq_w4: QuantizedModel
) -> None:
    quantized = pwlq_w4
    encodings = quantized.encodings()
    name = next(n for n, e in encodings.items() if e["kind"] == "weight")
    broken = json.loads(json.dumps(encodings))
    broken[name]["piecewise"]["breakpoints"] = [[0.1, 0.2]] * len(
        encodings[name]["piecewise"]["breakpoints"]
    )
    with pytest.raises(EncodingsError, match="breakpoints of shape"):
        prepare(model, data[0], PWLQ_W4).load_encodings(broken)
    broken[name]["piecewise"]["breakpoints"] = [[1e9]] * len(broken[name]["scale"])
    with pytest.raises(EncodingsError, match="must lie in"):
        prepare(model, data[0], PWLQ_W4).load_encodings(broken)


def test_branches_sum_to_the_simulated_weight(pwlq_w4a4: QuantizedModel) -> None:
    quantized = pwlq_w4a4
    for quantizer, weight in quantized.weight_quantizers():
        branches = quantizer.branches(weight)
        total = sum(branch.dequantize() for branch in branches)
        assert torch.allclose(total, quantizer(weight), atol=1e-6)
        assert len(branches) == 3 + 2 + 1  # 3 pieces, 2 offset tails, the correction
    with pytest.raises(ConfigError, match="branches"):
        quantizer.integer(weight)


def test_storage_counts_the_region_bits(
    model: nn.Module, data: list, pwlq_w4: QuantizedModel, pwlq_w4a4: QuantizedModel
) -> None:
    uniform = quantize(model, data, QuantConfig(weight_bits=4))
    piecewise, two = pwlq_w4, pwlq_w4a4
    assert weight_bits_per_element(uniform) == 4
    assert weight_bits_per_element(piecewise) == 5
    assert weight_bits_per_element(two) == 6  # three pieces need two region bits
    elements = sum(w.numel() for _, w in piecewise.weight_quantizers())
    channels = sum(q.range_max.numel() for q, _ in piecewise.weight_quantizers())
    # One more bit per weight; per channel 2 scales and 1 offset instead of a scale and a byte.
    extra = quantized_size_bytes(piecewise) - quantized_size_bytes(uniform)
    assert abs(extra - (elements / 8 + channels * (12 - 5))) <= 3


def test_gradient_passes_straight_through(pwlq_w4: QuantizedModel) -> None:
    quantized = pwlq_w4
    quantizer, weight = next(iter(quantized.weight_quantizers()))
    probe = weight.detach().clone().requires_grad_()
    quantizer(probe).sum().backward()
    assert probe.grad is not None and torch.equal(probe.grad, torch.ones_like(probe))


def test_bad_pwlq_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="breakpoints"):
        PiecewiseSpec(breakpoints=4)
    with pytest.raises(ConfigError, match="form"):
        PiecewiseSpec(form="zigzag")
    with pytest.raises(ConfigError, match="bisection"):
        PiecewiseSpec(search="approx", distribution="empirical")
    with pytest.raises(ConfigError, match="weight quantizer"):
        QuantConfig(weight_quantizer="log2")
    with pytest.raises(ConfigError, match="PWLQ setting"):
        QuantConfig.from_dict({"piecewise": {"breakpoint": 2}})
    spec = QuantSpec(bits=4, piecewise=PiecewiseSpec(breakpoints=2))
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_split_above_gives_the_coarse_layers_one_more_breakpoint(
    model: nn.Module, data: list, pwlq_w4: QuantizedModel
) -> None:
    """Layers whose relative weight error with one breakpoint is above ``split_above`` get two
    (and pay a second region bit); the others keep one; the mixed encoding reloads."""
    errors = {}
    for quantizer, weight in pwlq_w4.weight_quantizers():
        rows = channels_first(weight.detach(), quantizer.axis)
        grid = quantizer.grid
        errors[quantizer.name] = float(pwl.row_errors(grid, rows).sum() / rows.square().sum())
    threshold = sorted(errors.values())[len(errors) // 2 - 1] * 1.0001
    config = QuantConfig(
        weight_bits=4, weight_quantizer="pwlq", piecewise=PiecewiseSpec(split_above=threshold)
    )
    split = quantize(model, data, config)
    counts = {q.name: q.breakpoints.shape[1] for q, _ in split.weight_quantizers()}
    assert counts == {name: 1 if e <= threshold else 2 for name, e in errors.items()}
    assert set(counts.values()) == {1, 2}
    sizes = {q.name: w.numel() for q, w in split.weight_quantizers()}
    expected = sum(sizes[n] * (5 if c == 1 else 6) for n, c in counts.items()) / sum(sizes.values())
    assert weight_bits_per_element(split) == pytest.approx(expected, abs=1e-3)
    rebuilt = prepare(model, data[0], config)
    rebuilt.load_encodings(json.loads(json.dumps(split.encodings())))
    assert torch.equal(run(rebuilt, data), run(split, data))
    with pytest.raises(ConfigError, match="split_above"):
        PiecewiseSpec(split_above=1.5)
