"""The Quantizer module: observe, compute the encoding, fake-quantize; weight caching."""

import pytest
import torch

from qpp.errors import EncodingsError
from qpp.quant.affine import choose_qparams, fake_quantize
from qpp.quant.spec import QuantSpec
from qpp.sim.quantizer import Mode, Quantizer, QuantizerKind


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def activation_quantizer(**spec: object) -> Quantizer:
    return Quantizer("block.relu", QuantizerKind.ACTIVATION, QuantSpec(**spec))  # type: ignore[arg-type]


def weight_quantizer(bits: int = 4) -> Quantizer:
    spec = QuantSpec(bits=bits, symmetric=True, granularity="per-channel", axis=0)
    return Quantizer("conv.weight", QuantizerKind.WEIGHT, spec)


def reference(quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
    spec = quantizer.spec
    return fake_quantize(
        x, quantizer.scale, quantizer.zero_point, spec.bits, spec.is_signed, quantizer.axis
    )


# --- activations: observe -> compute_encoding -> quantize ----------------------------------------


def test_observe_then_compute_encoding_then_quantize() -> None:
    quantizer = activation_quantizer(bits=8)
    assert quantizer.mode is Mode.OFF
    assert not quantizer.calibrated
    quantizer.start_observing()
    assert quantizer.mode is Mode.OBSERVE
    assert not quantizer.has_statistics
    batches = [gaussian(4, 16, seed=seed) * (seed + 1) for seed in range(3)]
    for batch in batches:
        assert quantizer(batch) is batch  # observing leaves the activation untouched
    assert quantizer.has_statistics
    quantizer.compute_encoding()
    assert quantizer.calibrated
    assert quantizer.mode is Mode.QUANTIZE
    assert not quantizer.has_statistics  # statistics are dropped once used
    everything = torch.cat(batches)
    scale, zero_point = choose_qparams(everything.min(), everything.max(), 8, False, False)
    assert quantizer.scale.shape == quantizer.zero_point.shape == ()
    assert torch.equal(quantizer.scale, scale)
    assert torch.equal(quantizer.zero_point, zero_point)
    x = gaussian(5, 16, seed=9) * 4
    out = quantizer(x)
    assert torch.equal(out, fake_quantize(x, scale, zero_point, 8, False))
    assert not torch.equal(out, x)


def test_mse_estimator_clips_at_4_bits() -> None:
    quantizer = activation_quantizer(bits=4, estimator="mse")
    quantizer.start_observing()
    x = gaussian(64, 64)
    quantizer(x)
    quantizer.compute_encoding()
    top = quantizer.scale * (15 - quantizer.zero_point)
    assert 0 < top.item() < x.max().item()
    error = (quantizer(x) - x).square().sum()
    scale, zero_point = choose_qparams(x.min(), x.max(), 4, False, False)
    assert error < (fake_quantize(x, scale, zero_point, 4, False) - x).square().sum()


def test_per_channel_activation_encoding() -> None:
    quantizer = activation_quantizer(bits=8, granularity="per-channel", axis=1)
    quantizer.start_observing()
    x = gaussian(8, 3, 5, 5) * torch.tensor([0.1, 1.0, 10.0])[:, None, None]
    quantizer(x)
    quantizer.compute_encoding()
    assert quantizer.scale.shape == quantizer.zero_point.shape == (3,)
    rows = x.movedim(1, 0).reshape(3, -1)
    scale, zero_point = choose_qparams(rows.amin(1), rows.amax(1), 8, False, False)
    assert torch.equal(quantizer.scale, scale)
    assert torch.equal(quantizer(x), fake_quantize(x, scale, zero_point, 8, False, axis=1))


def test_off_and_disabled_pass_through() -> None:
    quantizer = activation_quantizer(bits=2)
    x = gaussian(3, 7)
    assert quantizer(x) is x  # a fresh quantizer is off
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    assert quantizer.mode is Mode.QUANTIZE
    assert not torch.equal(quantizer(x), x)
    quantizer.enabled = False
    assert quantizer(x) is x
    quantizer.enabled = True
    quantizer.mode = Mode.OFF
    assert quantizer(x) is x


def test_a_disabled_quantizer_does_not_observe() -> None:
    quantizer = activation_quantizer()
    quantizer.start_observing()
    quantizer.enabled = False
    quantizer(gaussian(4, 4))
    assert not quantizer.has_statistics


def test_set_range_per_tensor_accepts_one_element_vectors() -> None:
    quantizer = activation_quantizer(bits=8)
    quantizer.set_range(torch.tensor([-2.0]), torch.tensor([6.0]))
    assert quantizer.scale.shape == ()
    assert quantizer.scale.item() == pytest.approx(8.0 / 255)
    assert quantizer.zero_point.item() == 64


def test_set_spec_requires_a_new_encoding() -> None:
    quantizer = activation_quantizer(bits=8)
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    quantizer.set_spec(QuantSpec(bits=4))
    assert not quantizer.calibrated
    assert quantizer.integer_range == (0, 15)
    assert quantizer.grid.bits == 4


# --- weights -------------------------------------------------------------------------------------


def test_weight_encoding_is_symmetric_per_channel() -> None:
    quantizer = weight_quantizer()
    weight = gaussian(6, 3, 3, 3) * torch.linspace(0.1, 3, 6)[:, None, None, None]
    quantizer.compute_weight_encoding(weight)
    assert quantizer.scale.shape == (6,)
    assert torch.equal(quantizer.zero_point, torch.zeros(6))
    expected_scale = weight.abs().amax(dim=(1, 2, 3)) / 7
    torch.testing.assert_close(quantizer.scale, expected_scale)
    with torch.no_grad():
        assert torch.equal(quantizer(weight), reference(quantizer, weight))


def test_weight_gradient_flows_straight_through() -> None:
    quantizer = weight_quantizer()
    weight = torch.nn.Parameter(gaussian(4, 8))
    quantizer.compute_weight_encoding(weight)
    out = quantizer(weight)
    assert torch.equal(out, reference(quantizer, weight.detach()))
    out.sum().backward()
    assert weight.grad is not None
    # Min-max clips nothing; only a row's largest value may sit exactly on the grid's end.
    on_the_end = weight.detach() == weight.detach().abs().amax(dim=1, keepdim=True)
    assert torch.equal(weight.grad[~on_the_end], torch.ones_like(weight)[~on_the_end])


def test_cached_weight_equals_uncached_and_is_reused() -> None:
    quantizer = weight_quantizer()
    weight = torch.nn.Parameter(gaussian(4, 8))
    quantizer.compute_weight_encoding(weight)
    with torch.no_grad():
        first = quantizer(weight)
        second = quantizer(weight)
    assert second is first
    assert torch.equal(first, reference(quantizer, weight.detach()))


def test_weight_cache_sees_in_place_changes() -> None:
    quantizer = weight_quantizer()
    weight = torch.nn.Parameter(gaussian(4, 8))
    quantizer.compute_weight_encoding(weight)
    with torch.no_grad():
        before = quantizer(weight).clone()
        weight.mul_(0.5)
        after = quantizer(weight)
        assert torch.equal(after, reference(quantizer, weight))
        assert not torch.equal(after, before)
        weight.copy_(gaussian(4, 8, seed=1))
        assert torch.equal(quantizer(weight), reference(quantizer, weight))


def test_weight_cache_sees_a_new_tensor_at_a_reused_address() -> None:
    """A freed weight's memory is reused by the next tensor of the same size (version 0)."""
    quantizer = weight_quantizer()
    quantizer.compute_weight_encoding(gaussian(64, 32))
    with torch.no_grad():
        for seed in range(20):
            weight = gaussian(64, 32, seed=seed)
            assert torch.equal(quantizer(weight), reference(quantizer, weight)), seed
            del weight


def test_weight_cache_sees_a_replaced_parameter_tensor() -> None:
    quantizer = weight_quantizer()
    weight = torch.nn.Parameter(gaussian(16, 16))
    quantizer.compute_weight_encoding(weight)
    with torch.no_grad():
        for seed in range(1, 10):
            quantizer(weight)
            weight.data = gaussian(16, 16, seed=seed)
            assert torch.equal(quantizer(weight), reference(quantizer, weight)), seed


def test_weight_cache_is_invalidated_by_a_new_encoding() -> None:
    quantizer = weight_quantizer()
    weight = gaussian(4, 8)
    quantizer.compute_weight_encoding(weight)
    with torch.no_grad():
        quantizer(weight)
        quantizer.set_encoding(quantizer.scale * 2, quantizer.zero_point)
        assert torch.equal(quantizer(weight), reference(quantizer, weight))
        quantizer.set_spec(QuantSpec(bits=2, symmetric=True, granularity="per-channel", axis=0))
        quantizer.compute_weight_encoding(weight)
        assert torch.equal(quantizer(weight), reference(quantizer, weight))
        assert quantizer(weight).unique().numel() <= 4 * 4


# --- encodings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf")])
def test_set_encoding_rejects_bad_scales(scale: float) -> None:
    quantizer = activation_quantizer()
    with pytest.raises(EncodingsError, match=r"'block\.relu': scales must be positive"):
        quantizer.set_encoding(torch.tensor(scale), torch.tensor(0.0))
    assert not quantizer.calibrated


@pytest.mark.parametrize(
    ("signed", "zero_point"), [(False, -1.0), (False, 256.0), (True, -129.0), (True, 128.0)]
)
def test_set_encoding_rejects_zero_points_off_the_grid(signed: bool, zero_point: float) -> None:
    quantizer = activation_quantizer(bits=8, signed=signed)
    bounds = "[-128, 127] for 8-bit signed" if signed else "[0, 255] for 8-bit unsigned"
    with pytest.raises(EncodingsError, match=rf"zero points must lie in \{bounds}"):
        quantizer.set_encoding(torch.tensor(0.1), torch.tensor(zero_point))


def test_set_encoding_rejects_fractional_and_nan_zero_points() -> None:
    quantizer = activation_quantizer(bits=8)
    with pytest.raises(EncodingsError, match="zero points must be integers"):
        quantizer.set_encoding(torch.tensor(0.1), torch.tensor(3.5))
    with pytest.raises(EncodingsError, match="zero points"):
        quantizer.set_encoding(torch.tensor(0.1), torch.tensor(float("nan")))


def test_set_encoding_checks_every_channel() -> None:
    quantizer = weight_quantizer(bits=8)
    with pytest.raises(EncodingsError, match="scales"):
        quantizer.set_encoding(torch.tensor([0.1, 0.0, 0.2]), torch.zeros(3))
    with pytest.raises(EncodingsError, match="zero points"):
        quantizer.set_encoding(torch.tensor([0.1, 0.1, 0.2]), torch.tensor([0.0, 0.0, 200.0]))
    quantizer.set_encoding(torch.tensor([0.1, 0.1, 0.2]), torch.tensor([0.0, -128.0, 127.0]))
    assert quantizer.calibrated
    assert quantizer.mode is Mode.QUANTIZE


def test_set_encoding_copies_its_inputs() -> None:
    quantizer = activation_quantizer(bits=8)
    scale, zero_point = torch.tensor(0.5), torch.tensor(3.0)
    quantizer.set_encoding(scale, zero_point)
    scale.mul_(2)
    zero_point.add_(1)
    assert quantizer.scale.item() == 0.5
    assert quantizer.zero_point.item() == 3.0


def test_encoding_lives_in_the_state_dict() -> None:
    quantizer = activation_quantizer(bits=8)
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    state = quantizer.state_dict()
    assert set(state) == {"scale", "zero_point"}
    assert torch.equal(state["scale"], quantizer.scale)
    assert "block.relu" in repr(quantizer)
