"""Bias correction removes the mean output shift that weight quantization causes (§3.3)."""

from dataclasses import replace

import pytest
import torch
from torch import nn

import qpp
from qpp.errors import ConfigError
from qpp.ptq.bias_correction import (
    BiasCorrectionConfig,
    bias_correction,
    clipped_normal_mean,
)
from qpp.quant.spec import PiecewiseSpec
from qpp.sim.config import QuantConfig

W4_PER_TENSOR = QuantConfig(
    weight_bits=4, weight_granularity="per-tensor", weight_estimator="minmax"
)


class ConvBNReLUConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8, momentum=None)
        self.conv2 = nn.Conv2d(8, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


@pytest.fixture
def conv_bn_relu_conv() -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    """BN statistics estimated on the same Gaussian inputs that calibrate (so they are right)."""
    torch.manual_seed(0)
    model = ConvBNReLUConv()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2)
        model.bn.bias.uniform_(-1, 1)
    data = [(torch.randn(64, 3, 10, 10),) for _ in range(4)]
    model.train()
    with torch.no_grad():
        for (x,) in data:
            model(x)
    return model.eval(), data


def _weights_only(qmodel: qpp.QuantizedModel) -> None:
    qmodel.set_enabled(False, kind="activation")
    qmodel.compute_weight_encodings()


def _channel_mean_error(qmodel, reference: torch.Tensor, data) -> torch.Tensor:
    return (qpp.run(qmodel, data) - reference).mean((0, 2, 3))


def test_clipped_normal_mean_matches_sampling() -> None:
    mean, std = torch.tensor([-1.0, 0.0, 0.5, 2.0]), torch.tensor([0.5, 1.0, 2.0, 0.0])
    samples = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0)) * std + mean
    torch.testing.assert_close(
        clipped_normal_mean(mean, std).float(), samples.relu().mean(0), atol=1e-2, rtol=0
    )


def test_empirical_correction_removes_the_mean_shift(depthwise_net, images) -> None:
    reference = qpp.run(depthwise_net, images)
    qmodel = qpp.prepare(depthwise_net, images[0], W4_PER_TENSOR)
    _weights_only(qmodel)
    before = (qpp.run(qmodel, images) - reference).mean(0).abs()
    report = bias_correction(qmodel, images)
    after = (qpp.run(qmodel, images) - reference).mean(0).abs()
    assert len(report.corrected) == 6 and not report.skipped
    assert float(after.mean()) < 0.3 * float(before.mean()), (before, after)


def test_empirical_correction_of_one_layer_is_exact(conv_bn_relu_conv) -> None:
    model, data = conv_bn_relu_conv
    reference = qpp.run(model, data)
    qmodel = qpp.prepare(model, data[0], W4_PER_TENSOR)
    _weights_only(qmodel)
    qmodel.set_enabled(False, pattern="conv1.weight")
    assert _channel_mean_error(qmodel, reference, data).abs().max() > 1e-3
    bias_correction(qmodel, data)
    torch.testing.assert_close(
        _channel_mean_error(qmodel, reference, data), torch.zeros(6), atol=1e-5, rtol=0
    )


def test_analytic_correction_from_batch_norm(conv_bn_relu_conv) -> None:
    model, data = conv_bn_relu_conv
    reference = qpp.run(model, data)
    qmodel = qpp.prepare(model, data[0], W4_PER_TENSOR)
    _weights_only(qmodel)
    qmodel.set_enabled(False, pattern="conv1.weight")
    before = _channel_mean_error(qmodel, reference, data).abs()
    report = bias_correction(qmodel, None, BiasCorrectionConfig("analytic"))
    after = _channel_mean_error(qmodel, reference, data).abs()
    assert list(report.corrected) == ["conv2d_1"]
    assert "conv2d" in report.skipped  # its input is the image, not a BN output
    assert float(after.max()) < 0.1 * float(before.max()), (before, after)


def test_empirical_needs_data_and_modes_are_checked(conv_bn_relu_conv) -> None:
    model, data = conv_bn_relu_conv
    qmodel = qpp.prepare(model, data[0], W4_PER_TENSOR)
    with pytest.raises(ConfigError, match="needs calibration data"):
        bias_correction(qmodel, None)
    with pytest.raises(ConfigError, match="unknown bias correction mode"):
        BiasCorrectionConfig("exact")


def _quantized_weights_only_error(model, data, config: QuantConfig) -> torch.Tensor:
    """Per output channel mean error of ``quantize(model, data, config)`` with its activation
    quantizers off (the conditions its bias correction measured in)."""
    qmodel = qpp.quantize(model, data, config)
    qmodel.set_enabled(False, kind="activation")
    return _channel_mean_error(qmodel, qpp.run(model, data), data)


def test_quantize_with_empirical_bias_correction_unbiases_pwlq_weights(conv_bn_relu_conv) -> None:
    """``QuantConfig.empirical_bias_correction`` runs eq. 19 after the weight encodings (here
    3-bit PWLQ +BC, whose per-channel gain shifts the output mean): the last layer, measured
    last, ends with no mean error on the calibration data."""
    model, data = conv_bn_relu_conv
    pwlq = QuantConfig(
        weight_bits=3, weight_quantizer="pwlq", piecewise=PiecewiseSpec(bias_correction=True)
    )
    before = _quantized_weights_only_error(model, data, pwlq)
    after = _quantized_weights_only_error(
        model, data, replace(pwlq, empirical_bias_correction=True)
    )
    assert before.abs().max() > 1e-3, before
    torch.testing.assert_close(after, torch.zeros(6), atol=1e-5, rtol=0)


def test_empirical_bias_correction_and_a_recipe_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="drop empirical_bias_correction"):
        QuantConfig(empirical_bias_correction=True, recipe="wp-ptq")
