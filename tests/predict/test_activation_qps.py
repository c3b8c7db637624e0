"""QPP: static, dynamic and predicted activation QPs on small models (methods.md §1.4)."""

import math
from dataclasses import replace
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
from qpp.predict.activation_qps import (
    budget_sources,
    execution_order,
    sample_sizes,
    spaced_in_run_order,
)
from qpp.predict.cost import model_flops
from qpp.predict.predictor import DEFAULT_FEATURES
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


#: Feature maps of 2 x 24 x 24 = 1152 elements per sample: enough for a 1 % Dense+Sparse tail
#: (qpp.quant.dense_sparse.min_dense_sparse_elements).
SIDE = 24


#: The paper's basic QPP: one predictor, reading the whole network input.
INPUT_ONLY = {"source_count": 1, "feature_elements": None}


def scaled_batches(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    """Inputs whose per-sample scale varies over two orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        scale = torch.exp(torch.randn(8, 1, 1, 1, generator=generator) * 1.5)
        batches.append((scale * torch.randn(8, 2, SIDE, SIDE, generator=generator),))
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
        ActivationQPSettings(
            mode="predicted", scheme="dense-sparse", features=("q0.99",), **INPUT_ONLY
        ),
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
        ActivationQPSettings(
            mode="predicted", scheme="dense-sparse", outlier_fraction=0.02, **INPUT_ONLY
        ),
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
            assert abs(layers[0].mean - 0.02) <= 1 / (2 * SIDE * SIDE) + 1e-6 and layers[0].std == 0
            assert all(layer.mean <= 0.02 + 1e-6 for layer in layers)
    assert spread["predicted"] <= 0.5 * spread["static"]
    assert spread["dynamic"] <= spread["predicted"]


def test_dynamic_and_predicted_beat_static_on_varying_scales(net: nn.Module) -> None:
    model = _quantized(net, bits=4)
    handle = configure_activation_qps(
        model, scaled_batches(8, 0), ActivationQPSettings(mode="predicted", **INPUT_ONLY)
    )
    x = torch.cat([b[0] for b in scaled_batches(4, 5)])
    with torch.no_grad():
        reference = net(x)
        errors = {}
        for mode in ("static", "predicted", "dynamic"):
            handle.set_mode(mode)
            errors[mode] = float((model(x) - reference).square().mean())
    # Per-layer MSE ranges do not order the output error of dynamic and predicted; both adapt
    # to the 100-fold input scale and beat the static range by far.
    assert max(errors["dynamic"], errors["predicted"]) < 0.5 * errors["static"], errors


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


class HardswishNet(nn.Module):
    """A conv and hardswish (output >= -0.375), then a conv whose output is unbounded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.hardswish(self.conv(x)))


def test_dense_sparse_keeps_the_floor_of_bounded_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = HardswishNet().eval()
    model = quantize(net, scaled_batches(4, 0), QuantConfig(activation_bits=4))
    settings = ActivationQPSettings(mode="dynamic", scheme="dense-sparse")
    handle = configure_activation_qps(model, scaled_batches(4, 0), settings)
    floors = {name: sampler.floor for name, sampler in handle.samplers.items()}
    bounded = [name for name, floor in floors.items() if math.isfinite(floor)]
    assert len(bounded) == 1 and -0.375 - 1e-6 <= floors[bounded[0]] < 0  # hardswish's floor
    assert len(floors) > 1  # the network input and the head's output reach -t: no floor
    x = scaled_batches(1, 3)[0]
    with torch.no_grad(), handle.tracking_density() as layers:
        dynamic = model(*x)
    assert all(layer.mean <= 0.01 + 1e-6 for layer in layers)  # no value fell below a floor
    handle.save(tmp_path)
    rebuilt = prepare(net, x, QuantConfig(activation_bits=4))
    rebuilt.graph_module.load_state_dict(graph_weights(model), strict=False)
    rebuilt.load_encodings(model.encodings())
    loaded = load_activation_qps(rebuilt, tmp_path, settings)
    assert {name: s.floor for name, s in loaded.samplers.items()} == floors
    with torch.no_grad():
        assert torch.equal(rebuilt(*x), dynamic)


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
        model, scaled_batches(2, 0), ActivationQPSettings(mode="predicted", **INPUT_ONLY)
    )
    cost = handle.overhead_flops(scaled_batches(1, 0)[0])
    elements = 2 * SIDE * SIDE  # the source is the network input, one sample
    # mean + max: one pass each; three quantiles: two passes each
    assert cost["predictor"] >= 8 * elements
    # min + max over the four quantized activations (2, 2, 6 and 4 channels of SIDE x SIDE)
    assert cost["dynamic"] == 2 * (2 + 2 + 6 + 4) * SIDE * SIDE


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"activation_ranges": "adaptive"}, "unknown activation-range mode 'adaptive'"),
        ({"activation_scheme": "sparse"}, "unknown scheme 'sparse'"),
        ({"outlier_fraction": 1.0}, "must be in \\[0, 1\\)"),
        ({"dynamic_estimator": "entropy"}, "cannot run per sample"),
        ({"predictor_features": "mean,median"}, "unknown predictor feature 'median'"),
        ({"predictor_features": "pos_mean"}, "after 'pos_' use max or a quantile"),
        ({"predictor_features": "max,q0.99,max"}, "repeat a name"),
        ({"predictor_sources": "auto:many"}, "must be auto, auto:N"),
        ({"predictor_sources": "auto:0"}, "at least one source"),
        ({"predictor_elements": 4}, "at least 16 elements"),
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


def test_auto_sources_are_evenly_spaced(net: nn.Module) -> None:
    model = _quantized(net)
    names = [q.name for q in execution_order(model)]
    settings = settings_from_config(
        QuantConfig(activation_ranges="predicted", predictor_sources="auto:2")
    )
    handle = configure_activation_qps(model, scaled_batches(4, 0), settings)
    assert [p.source for p in handle.predictors] == [names[0], names[len(names) // 2]]
    many = ActivationQPSettings(mode="predicted", source_count=50)  # capped at every quantizer
    handle.detach()
    handle = configure_activation_qps(model, scaled_batches(4, 0), many)
    assert [p.source for p in handle.predictors] == names


def test_subsampled_features_cost_less_and_still_predict(net: nn.Module) -> None:
    model = _quantized(net)
    settings = ActivationQPSettings(
        mode="predicted",
        scheme="dense-sparse",
        features=("q0.99",),
        source_count=1,
        feature_elements=256,
    )
    handle = configure_activation_qps(model, scaled_batches(8, 0), settings)
    second = [q.name for q in execution_order(model)][1]
    # The input's scale varies 100-fold: 256 of its 1152 values still tell it apart.
    assert handle.fit_r_squared[f"{second}:threshold"] > 0.95
    cost = handle.overhead_flops(scaled_batches(1, 0)[0])
    assert 2 * 256 <= cost["predictor"] < 2 * 2 * SIDE * SIDE


def test_threshold_margin_raises_predicted_thresholds(net: nn.Module) -> None:
    model = _quantized(net)
    x = scaled_batches(1, 4)[0]
    thresholds = {}
    for margin in (0.0, 1.0):
        settings = ActivationQPSettings(
            mode="predicted",
            scheme="dense-sparse",
            threshold_margin=margin,
            fit_offsets=False,
            **INPUT_ONLY,
        )
        handle = configure_activation_qps(model, scaled_batches(4, 0), settings)
        with torch.no_grad(), handle.pairing_qps() as pairs:
            model(*x)
        thresholds[margin] = {name: predicted for name, (predicted, _) in pairs.items()}
        residual = dict(
            zip(
                [n for n, _ in handle.predictors[0].targets],
                handle.predictors[0].residual_std.tolist(),
                strict=True,
            )
        )
        handle.detach()
    for name, raised in thresholds[1.0].items():
        ratio = raised / thresholds[0.0][name]
        assert torch.allclose(ratio, torch.full_like(ratio, math.exp(residual[name])), rtol=1e-4)


class PooledNet(nn.Module):
    """A conv map (plenty of elements) and a pooled 4-vector (too few for a 1 % tail)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_dense_sparse_skips_tensors_too_small_for_the_outlier_fraction(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = PooledNet().eval()
    batches = scaled_batches(4, 0)
    model = quantize(net, batches, QuantConfig())
    settings = ActivationQPSettings(mode="predicted", scheme="dense-sparse")
    handle = configure_activation_qps(model, batches, settings)
    schemes = {name: s.scheme.value for name, s in handle.samplers.items()}
    sizes = {name: size for name, size in sample_sizes(model, batches[0]).items()}
    assert {schemes[n] for n in schemes if sizes[n] >= 1000} == {"dense-sparse"}
    assert {schemes[n] for n in schemes if sizes[n] < 1000} == {"uniform"}
    handle.save(tmp_path)
    handle.detach()
    loaded = load_activation_qps(model, tmp_path, settings)
    assert {name: s.scheme.value for name, s in loaded.samplers.items()} == schemes


def test_auto_sources_spend_the_overhead_budget(net: nn.Module) -> None:
    model = _quantized(net)
    names = [q.name for q in execution_order(model)]
    batch = scaled_batches(1, 0)[0]
    counts, costs = {}, {}
    for budget, features in ((1e-9, ("max",)), (1.0, ("max",)), (1.0, DEFAULT_FEATURES)):
        settings = ActivationQPSettings(
            mode="predicted", overhead_budget=budget, features=features, feature_elements=16
        )
        handle = configure_activation_qps(model, scaled_batches(2, 0), settings)
        counts[budget, len(features)] = len(handle.predictors)
        costs[budget, len(features)] = handle.overhead_flops(batch)
        handle.detach()
    assert counts[1e-9, 1] == 1 and counts[1.0, 1] == len(names)
    # Never dearer than the dynamic reductions, whatever the budget.
    assert all(cost["predictor"] <= cost["dynamic"] for cost in costs.values())


def test_auto_reads_fewer_elements_to_afford_more_sources(net: nn.Module) -> None:
    """Dense+Sparse sources sit on the Dense+Sparse layers; a budget that 2048-element
    features cannot meet for all of them buys them with 512 (the floor), never fewer."""
    model = _quantized(net)
    batch = scaled_batches(1, 0)[0]
    sizes = sample_sizes(model, batch)
    flops = model_flops(model, batch)
    settings = ActivationQPSettings(
        mode="predicted", scheme="dense-sparse", features=("q0.99",), feature_elements=2048
    )
    dense_sparse = [n for n, size in sizes.items() if size >= 1000]
    features = len(settings.features)
    linear = 2 * features * (2 * len(sizes) + len(dense_sparse))
    needed = sum(2 * min(sizes[n], 512) for n in dense_sparse) + linear  # a quantile: 2 passes
    roomy = sum(2 * min(sizes[n], 2048) for n in dense_sparse) + linear
    assert needed < roomy < 2 * sum(sizes.values()), "sources must exceed 512 elements"
    count, elements = budget_sources(
        dense_sparse, sizes, replace(settings, overhead_budget=(needed + 0.5) / flops), flops
    )
    assert (count, elements) == (len(dense_sparse), 512)
    count, elements = budget_sources(
        dense_sparse, sizes, replace(settings, overhead_budget=(roomy + 0.5) / flops), flops
    )
    assert (count, elements) == (len(dense_sparse), 2048)
    handle = configure_activation_qps(model, scaled_batches(2, 0), settings)
    assert {p.source for p in handle.predictors} <= set(dense_sparse)


class StackedNet(nn.Module):
    """A fused projection stacked as ``[3, N, T, 8]`` before a linear layer: that tensor's first
    dimension is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 8).permute(2, 0, 1, 3)
        return self.out(torch.relu(stacked)).sum(dim=0)


def test_tensors_without_a_leading_batch_keep_static_qps() -> None:
    torch.manual_seed(0)
    net = StackedNet().eval()
    batches = [(torch.randn(4, 6, 8) * scale,) for scale in (0.5, 1.0, 2.0, 4.0)]
    model = quantize(net, batches, QuantConfig(activation_bits=8))
    handle = configure_activation_qps(model, batches, ActivationQPSettings(mode="predicted"))
    batch_first = sample_sizes(model, batches[0])
    names = {q.name for q in execution_order(model) if q.enabled}
    assert names - set(batch_first), "the stacked tensor should not count as batch-first"
    assert set(handle.samplers) == set(batch_first) & names
    for mode in ("predicted", "dynamic", "static"):
        handle.set_mode(mode)
        with torch.no_grad():
            assert model(*batches[0]).shape == (4, 6, 4)


def test_dense_sparse_sources_are_spaced_in_run_order() -> None:
    """Candidates at run places 1, 2 and 6: two sources go to 1 and 6 (the run order's ends),
    not to the first two candidates; all of them when the count allows."""
    positions = {"a": 1, "b": 2, "c": 6}
    names = ["a", "b", "c"]
    assert spaced_in_run_order(names, 2, positions) == ["a", "c"]
    assert spaced_in_run_order(names, 1, positions) == ["a"]
    assert spaced_in_run_order(names, 5, positions) == names
    places = {f"q{i}": 3 * i for i in range(10)}
    chosen = spaced_in_run_order(list(places), 4, places)
    assert chosen == ["q0", "q3", "q6", "q9"] and len(set(chosen)) == 4
