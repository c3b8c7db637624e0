"""Cross-layer equalization keeps FP32 outputs and evens out channel ranges (white paper §3.2)."""

import torch

import qpp
from qpp.graph.patterns import equalization_pairs, get_attr
from qpp.ptq.cle import (
    CLEConfig,
    cross_layer_equalization,
    input_channel_ranges,
    output_channel_ranges,
)
from qpp.sim.config import QuantConfig


def _fp32(qmodel: qpp.QuantizedModel, batches: list) -> torch.Tensor:
    qmodel.set_enabled(False)
    try:
        return qpp.run(qmodel, batches)
    finally:
        qmodel.set_enabled(True)


def test_pairs_found_through_relu_depthwise_and_channel_affine(depthwise_net, images) -> None:
    qmodel = qpp.prepare(depthwise_net, images[0], QuantConfig())
    pairs = {
        (p.producer.weight, p.consumer.weight): p.ops
        for p in equalization_pairs(qmodel.graph_module)
    }
    assert pairs == {
        ("conv1.weight", "depthwise.weight"): ("relu",),
        ("depthwise.weight", "pointwise.weight"): ("relu",),
        ("pointwise.weight", "conv3.weight"): ("mul", "add"),
        ("fc1.weight", "fc2.weight"): ("relu",),
    }


def test_cle_keeps_fp32_outputs_and_lowers_range_spread(depthwise_net, images) -> None:
    qmodel = qpp.prepare(depthwise_net, images[0], QuantConfig())
    before = _fp32(qmodel, images)
    report = cross_layer_equalization(qmodel, None, CLEConfig(absorb_high_bias=False))
    after = _fp32(qmodel, images)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    assert report.converged and report.sweeps > 1
    assert report.range_spread_after < 0.75 * report.range_spread_before
    # At convergence each pair's ranges meet: r1_i == r2_i (= sqrt(r1 r2) of eq. 13).
    for pair in equalization_pairs(qmodel.graph_module):
        w1 = get_attr(qmodel.graph_module, pair.producer.weight)
        w2 = get_attr(qmodel.graph_module, pair.consumer.weight)
        torch.testing.assert_close(
            output_channel_ranges(w1), input_channel_ranges(w2, pair.consumer), rtol=1e-4, atol=0
        )
    # Applying CLE again is (nearly) the identity.
    again = cross_layer_equalization(qmodel, None, CLEConfig(absorb_high_bias=False))
    assert again.sweeps == 1


def test_cle_helps_per_tensor_weight_quantization(depthwise_net, images) -> None:
    config = QuantConfig(weight_granularity="per-tensor", weight_estimator="minmax")
    reference = qpp.run(depthwise_net, images)
    errors = []
    for equalize in (False, True):
        qmodel = qpp.prepare(depthwise_net, images[0], config)
        if equalize:
            cross_layer_equalization(qmodel, images)
        qmodel.set_enabled(False, kind="activation")
        qmodel.compute_weight_encodings()
        errors.append(float((qpp.run(qmodel, images) - reference).pow(2).mean()))
    assert errors[1] < 0.5 * errors[0], errors


def test_high_bias_absorption_from_data_is_exact_on_that_data(depthwise_net, images) -> None:
    qmodel = qpp.prepare(depthwise_net, images[0], QuantConfig())
    before = _fp32(qmodel, images)
    report = cross_layer_equalization(qmodel, images)
    assert report.absorption_source == "calibration data"
    assert "fc1" in "".join(report.absorbed) or report.absorbed
    after = _fp32(qmodel, images)
    # fc1 -> ReLU -> fc2 is exact; conv pairs are exact away from zero-padded borders.
    assert (after - before).abs().max() <= 0.05 * before.abs().max()


def test_high_bias_absorption_data_free_uses_batch_norm(depthwise_net, images) -> None:
    qmodel = qpp.prepare(depthwise_net, images[0], QuantConfig())
    report = cross_layer_equalization(qmodel, None)
    assert report.absorption_source == "batch-norm statistics"
    assert set(report.absorbed) <= {"conv2d", "conv2d_1"}


class TiedLinear(torch.nn.Module):
    """fc -> ReLU -> fc (the same weights twice) -> ReLU -> head: no pair may be rescaled."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.relu(self.fc(x)))))


def test_tied_weights_are_not_equalized() -> None:
    x = torch.randn(4, 8)
    qmodel = qpp.prepare(TiedLinear().eval(), (x,), QuantConfig())
    pairs = equalization_pairs(qmodel.graph_module)
    assert all("fc" not in p.producer.weight and "fc" not in p.consumer.weight for p in pairs)
