"""AdaRound (white paper §3.4): rounding learned per layer beats rounding to nearest."""

import json

import pytest
import torch

import qpp
from qpp.errors import ConfigError
from qpp.graph.patterns import weight_layers
from qpp.ptq.activations import data_positions
from qpp.ptq.adaround import (
    AdaRoundConfig,
    _sample_rows,
    adaround,
    beta_schedule,
    initial_logits,
    rectified_sigmoid,
    rounding_regularizer,
)
from qpp.sim.config import QuantConfig

W4 = QuantConfig(weight_bits=4)
FAST = AdaRoundConfig(iterations=300, rows=2048, batch_rows=256)


def test_rectified_sigmoid_reaches_0_and_1_and_inverts() -> None:
    v = torch.linspace(-20, 20, 101)
    h = rectified_sigmoid(v)
    assert h.min() == 0 and h.max() == 1 and bool((h >= 0).all() and (h <= 1).all())
    fraction = torch.rand(1000)
    torch.testing.assert_close(rectified_sigmoid(initial_logits(fraction)), fraction)


def test_regularizer_and_beta_schedule() -> None:
    assert rounding_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0) == 0
    assert rounding_regularizer(torch.tensor([0.5]), 2.0) == 1
    config = AdaRoundConfig(iterations=1000)
    assert beta_schedule(0, config) is None and beta_schedule(199, config) is None
    assert beta_schedule(200, config) == pytest.approx(20)
    assert beta_schedule(999, config) == pytest.approx(2, abs=1e-3)


def _weights_only(model, batch) -> qpp.QuantizedModel:
    qmodel = qpp.prepare(model, batch, W4)
    qmodel.set_enabled(False, kind="activation")
    qmodel.compute_weight_encodings()
    return qmodel


def test_adaround_beats_nearest_and_writes_on_grid_weights(depthwise_net, images) -> None:
    qmodel = _weights_only(depthwise_net, images[0])
    reference = qpp.run(depthwise_net, images)
    nearest_error = float((qpp.run(qmodel, images) - reference).pow(2).mean())
    originals = {n: qmodel.weight(n).detach().clone() for n in qmodel.names if "weight" in n}
    report = adaround(qmodel, images, FAST)
    assert len(report.layers) == 6 and not report.skipped
    results = list(report.layers.values())
    improved = [r for r in results if r.mse_adaround < 0.9 * r.mse_nearest]
    assert len(improved) >= 4, results
    for result in results:
        assert 0 < result.changed_fraction < 0.5
        assert result.kept == (
            "adaround" if result.mse_adaround <= result.mse_nearest else "nearest"
        )
    for name, original in originals.items():
        quantizer, weight = qmodel.quantizer(name), qmodel.weight(name)
        # The ordinary nearest-rounding quantizer reproduces the AdaRounded weight exactly...
        assert torch.equal(quantizer(weight), weight)
        # ...and every weight was rounded to floor or ceil of its original grid position.
        position = original / quantizer.scale.reshape(-1, *[1] * (original.ndim - 1))
        integer = weight / quantizer.scale.reshape(-1, *[1] * (original.ndim - 1))
        assert bool(((integer - position.floor()).round().abs() <= 1).all())
    adaround_error = float((qpp.run(qmodel, images) - reference).pow(2).mean())
    assert adaround_error < nearest_error


def test_adaround_resumes_from_its_state_folder(depthwise_net, images, tmp_path) -> None:
    config = AdaRoundConfig(iterations=50, rows=512, batch_rows=64, state_dir=str(tmp_path))
    first = _weights_only(depthwise_net, images[0])
    adaround(first, images, config)
    saved = json.loads((tmp_path / "adaround.json").read_text())
    assert len(saved["layers"]) == 6
    # Forget the last two layers, as if the run had been stopped there.
    for name in list(saved["layers"])[4:]:
        del saved["layers"][name]
    (tmp_path / "adaround.json").write_text(json.dumps(saved))
    second = _weights_only(depthwise_net, images[0])
    report = adaround(second, images, config)
    assert [r.resumed for r in report.layers.values()] == [True] * 4 + [False] * 2
    for name in first.names:
        if first.quantizer(name).kind.value == "weight":
            assert torch.equal(first.weight(name), second.weight(name))
    with pytest.raises(ConfigError, match="other settings"):
        adaround(
            second,
            images,
            AdaRoundConfig(iterations=51, rows=512, batch_rows=64, state_dir=str(tmp_path)),
        )


def test_calibration_keeps_adarounded_weight_encodings(depthwise_net, images) -> None:
    qmodel = _weights_only(depthwise_net, images[0])
    adaround(qmodel, images, AdaRoundConfig(iterations=20, rows=256, batch_rows=32))
    scales = {n: qmodel.quantizer(n).scale.clone() for n in qmodel.names}
    qmodel.set_enabled(True)
    qpp.calibrate(qmodel, images, weights=False)
    for name in qmodel.names:
        if qmodel.quantizer(name).kind.value == "weight":
            assert torch.equal(qmodel.quantizer(name).scale, scales[name])
            assert torch.equal(qmodel.quantizer(name)(qmodel.weight(name)), qmodel.weight(name))


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="iterations"):
        AdaRoundConfig(iterations=0)
    with pytest.raises(ConfigError, match="inputs"):
        AdaRoundConfig(inputs="fp32")
    with pytest.raises(ConfigError, match="batch_rows"):
        AdaRoundConfig(rows=10, batch_rows=20)


class _TokenModel(torch.nn.Module):
    """``(input_ids, attention_mask) -> hidden``, like qpp's Hugging Face wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.linear = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.embed.weight[0] = 100.0  # the padding token: easy to spot in the rows

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embed(input_ids)) * attention_mask.unsqueeze(-1)


def test_linear_rows_come_from_real_tokens_only() -> None:
    ids = torch.randint(1, 10, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.int64)
    ids[0, 4:], mask[0, 4:] = 0, 0
    ids[2, 1:], mask[2, 1:] = 0, 0
    batch = (ids, mask)
    assert torch.equal(data_positions(batch), mask.bool())
    assert data_positions((torch.randn(3, 6), torch.randn(3, 6))) is None
    qmodel = qpp.prepare(_TokenModel(), batch, W4)
    layer = next(iter(weight_layers(qmodel.graph_module)))
    rows = _sample_rows(qmodel, layer, [batch], rows_per_batch=100, seed=0)
    assert rows.shape == (int(mask.sum()), 8)
    assert bool((rows != 100.0).all())


def test_float_inputs_fit_the_rounding_alone(depthwise_net, images) -> None:
    """eq. 32 form: inputs from the float model; every layer still beats nearest rounding."""
    qmodel = _weights_only(depthwise_net, images[0])
    report = adaround(qmodel, images, AdaRoundConfig(**{**FAST.settings(), "inputs": "float"}))
    results = list(report.layers.values())
    assert len(results) == 6
    assert sum(r.mse_adaround < 0.9 * r.mse_nearest for r in results) >= 4, results
