"""QPP: static, dynamic and predicted activation QPs on small models (methods.md §1.4)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from qpp.api import prepare, quantize
from qpp.errors import ConfigError
from qpp.predict import (
    ActivationQPSettings,
    configure_activation_qps,
    load_activation_qps,
    settings_from_config,
)
from qpp.predict.activation_qps import execution_order
from qpp.runs import graph_weights
from qpp.sim.config import QuantConfig


class ScaledNet(nn.Module):
    """The first layer multiplies its input by 3 (x -> 3x -> ReLU), then two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Conv2d(2, 2, 1, bias=False)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 3, padding=1)
        with torch.no_grad():
            self.scale.weight.copy_(3.0 * torch.eye(2).reshape(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.scale(x)))))


def scaled_batches(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    """Inputs whose per-sample scale varies over two orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        scale = torch.exp(torch.randn(8, 1, 1, 1, generator=generator) * 1.5)
        batches.append((scale * torch.randn(8, 2, 12, 12, generator=generator),))
    return batches


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return ScaledNet().eval()


def _quantized(net: nn.Module, bits: int = 4):  # type: ignore[no-untyped-def]
    return quantize(net, scaled_batches(4, 0), QuantConfig(activation_bits=bits))


def _oracle(handle) -> list:  # type: ignore[no-untyped-def]
    """Hooks that overwrite every predicted slot with the exact dynamic QPs."""
    hooks = []
    for sampler in handle.samplers.values():

        def exact(module, args, sampler=sampler) -> None:  # type: ignore[no-untyped-def]
            rows = args[0].detach().reshape(args[0].shape[0], -1).float()
            sampler.predicted = sampler.exact_qps(rows)

        hooks.append(sampler.quantizer.register_forward_pre_hook(exact))
    return hooks


@pytest.mark.parametrize("scheme", ["uniform", "dense-sparse"])
def test_oracle_predictor_reproduces_dynamic_exactly(net: nn.Module, scheme: str) -> None:
    model = _quantized(net)
    handle = configure_activation_qps(
        model, scaled_batches(4, 0), ActivationQPSettings(mode="predicted", scheme=scheme)
    )
    x = scaled_batches(1, 7)[0]
    handle.set_mode("dynamic")
    with torch.no_grad():
        dynamic = model(*x)
    handle.set_mode("predicted")
    hooks = _oracle(handle)
    with torch.no_grad():
        predicted = model(*x)
    for hook in hooks:
        hook.remove()
    assert torch.equal(predicted, dynamic)
    with torch.no_grad():
        assert not torch.equal(model(*x), dynamic)  # the fitted predictor is not the oracle


def test_predictor_recovers_the_input_scaling(net: nn.Module) -> None:
    """The first layer's output is 3x the input, so log t = log 3 + log q(|x|): R^2 > 0.99."""
    model = _quantized(net)
    handle = configure_activation_qps(
        model,
        scaled_batches(8, 0),
        ActivationQPSettings(mode="predicted", scheme="dense-sparse", features=("q0.99",)),
    )
    first, second = [q.name for q in execution_order(model)][:2]
    assert handle.predictors[0].source == first
    assert handle.fit_r_squared[f"{second}:threshold"] > 0.99
    # log t = log 3 + log q0.99(|relu x|): the slope on log q0.99(|x|) is 1 (x its std).
    predictor = handle.predictors[0]
    column = [name for name, _ in predictor.targets].index(second)
    slope = predictor.weight[1, column] / predictor.feature_std[0]
    assert slope == pytest.approx(1.0, abs=0.05)


def test_predicted_density_is_steadier_than_static(net: nn.Module) -> None:
    """The paper's claim on Dense+Sparse: static thresholds let the outlier density swing with
    the input's scale; predicted ones hold it near the target."""
    model = _quantized(net)
    handle = configure_activation_qps(
        model,
        scaled_batches(8, 0),
        ActivationQPSettings(mode="predicted", scheme="dense-sparse", outlier_fraction=0.02),
    )
    spread = {}
    for mode in ("static", "predicted", "dynamic"):
        handle.set_mode(mode)
        with torch.no_grad(), handle.tracking_density() as layers:
            for batch in scaled_batches(4, 9):
                model(*batch)
        spread[mode] = max(layer.std for layer in layers)
        if mode == "dynamic":
            # Exact thresholds: rho +- 1/N on the continuous input; never more than rho after
            # it (values quantized upstream tie on the dense grid, and ties are not outliers).
            assert abs(layers[0].mean - 0.02) <= 1 / 288 + 1e-6 and layers[0].std == 0
            assert all(layer.mean <= 0.02 + 1e-6 for layer in layers)
    assert spread["predicted"] <= 0.5 * spread["static"]
    assert spread["dynamic"] <= spread["predicted"]


def test_dynamic_and_predicted_beat_static_on_varying_scales(net: nn.Module) -> None:
    model = _quantized(net, bits=4)
    handle = configure_activation_qps(
        model, scaled_batches(8, 0), ActivationQPSettings(mode="predicted")
    )
    x = torch.cat([b[0] for b in scaled_batches(4, 5)])
    with torch.no_grad():
        reference = net(x)
        errors = {}
        for mode in ("static", "predicted", "dynamic"):
            handle.set_mode(mode)
            errors[mode] = float((model(x) - reference).square().mean())
    assert errors["dynamic"] <= errors["predicted"] < errors["static"]


def test_save_and_load_reproduce_outputs(net: nn.Module, tmp_path: Path) -> None:
    model = _quantized(net)
    settings = ActivationQPSettings(mode="predicted", scheme="dense-sparse")
    handle = configure_activation_qps(model, scaled_batches(4, 0), settings)
    handle.save(tmp_path)
    x = scaled_batches(1, 3)[0]
    with torch.no_grad():
        expected = model(*x)

    rebuilt = prepare(net, x, QuantConfig(activation_bits=4))
    rebuilt.graph_module.load_state_dict(graph_weights(model), strict=False)
    rebuilt.load_encodings(model.encodings())
    load_activation_qps(rebuilt, tmp_path, settings)
    with torch.no_grad():
        assert torch.equal(rebuilt(*x), expected)


def test_detach_restores_static_quantization(net: nn.Module) -> None:
    model = _quantized(net)
    x = scaled_batches(1, 3)[0]
    with torch.no_grad():
        before = model(*x)
        handle = configure_activation_qps(
            model, scaled_batches(2, 0), ActivationQPSettings(mode="dynamic")
        )
        assert not torch.equal(model(*x), before)
        handle.detach()
        assert torch.equal(model(*x), before)


def test_overhead_counts_the_predictor_and_the_dynamic_reductions(net: nn.Module) -> None:
    model = _quantized(net)
    handle = configure_activation_qps(
        model, scaled_batches(2, 0), ActivationQPSettings(mode="predicted")
    )
    cost = handle.overhead_flops(scaled_batches(1, 0)[0])
    elements = 2 * 12 * 12  # the source is the network input, one sample
    # mean + max: one pass each; three quantiles: two passes each
    assert cost["predictor"] >= 8 * elements
    # min + max over the four quantized activations (2, 2, 6 and 4 channels of 12 x 12)
    assert cost["dynamic"] == 2 * (2 + 2 + 6 + 4) * 12 * 12


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"activation_ranges": "adaptive"}, "unknown activation-range mode 'adaptive'"),
        ({"activation_scheme": "sparse"}, "unknown scheme 'sparse'"),
        ({"outlier_fraction": 1.0}, "must be in \\[0, 1\\)"),
        ({"dynamic_estimator": "entropy"}, "cannot run per sample"),
        ({"predictor_features": "mean,median"}, "unknown predictor feature 'median'"),
    ],
)
def test_bad_settings_name_the_fix(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_config(QuantConfig(**changes))


def test_unknown_predictor_source(net: nn.Module) -> None:
    model = _quantized(net)
    with pytest.raises(ConfigError, match="no quantizer is named 'nowhere'"):
        configure_activation_qps(
            model,
            scaled_batches(1, 0),
            ActivationQPSettings(mode="predicted", sources=("nowhere",)),
        )


def test_two_predictors_split_the_layers(net: nn.Module) -> None:
    model = _quantized(net)
    names = [q.name for q in execution_order(model)]
    handle = configure_activation_qps(
        model,
        scaled_batches(4, 0),
        ActivationQPSettings(mode="predicted", sources=(names[0], names[2])),
    )
    covered = [[name for name, _ in p.targets] for p in handle.predictors]
    assert [p.source for p in handle.predictors] == [names[0], names[2]]
    assert sorted({n for group in covered for n in group}) == sorted(names)
    assert not set(covered[0]) & set(covered[1])
