"""Predicted ranges chosen layer by layer among fits (``qpp.predict.target_choice``)."""

import copy
import math

import pytest
import torch
from torch import nn

from qpp.api import quantize
from qpp.errors import ConfigError
from qpp.predict import ActivationQPSettings, configure_activation_qps, load_activation_qps
from qpp.predict.activation_qps import _choose_dynamic_mix
from qpp.predict.estimator_choice import mix_errors, quantization_off, relative_output_error
from qpp.predict.predictor import LinearQPPredictor
from qpp.predict.qps import STATIC_ESTIMATOR, QPMode
from qpp.predict.target_choice import (
    STATIC_FIT,
    TARGET_SWEEP_BATCHES,
    columns_in_basis,
    refine_targets_per_layer,
    static_columns,
)
from qpp.quant.affine import choose_qparams
from qpp.sim.config import QuantConfig


def test_columns_move_between_fits_exactly() -> None:
    """A fit's columns, rewritten for another fit's feature standardization, predict what they
    predicted in their own fit, on features neither was fitted to."""
    generator = torch.Generator().manual_seed(0)
    names = ("mean", "max", "q0.99")
    targets = [("a", "lo"), ("a", "hi"), ("b", "hi")]
    fits = []
    for shift in (0.0, 3.0):
        features = torch.randn(64, 3, generator=generator) * (1.0 + shift) + shift
        log_qps = features @ torch.randn(3, 3, generator=generator) + shift
        fits.append(LinearQPPredictor.fit("src", names, targets, features, log_qps))
    base, other = fits
    features = torch.randn(16, 3, generator=generator) * 2.0
    moved = copy.deepcopy(base)
    moved.weight[:, [2, 0]] = columns_in_basis(base, other, [2, 0])
    expected = other.predict_log(features)[:, [2, 0]]
    torch.testing.assert_close(moved.predict_log(features)[:, [2, 0]], expected)
    # The column left alone still predicts what the base fit does.
    torch.testing.assert_close(moved.predict_log(features)[:, 1], base.predict_log(features)[:, 1])
    elsewhere = copy.deepcopy(other)
    elsewhere.source = "another"
    with pytest.raises(ConfigError, match="same sources"):
        columns_in_basis(base, elsewhere, [0])


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _batches(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    # Inputs of very different scales, so that per-input ranges matter.
    return [
        (torch.randn(16, 64, generator=generator) * torch.rand(16, 1, generator=generator) * 4,)
        for _ in range(count)
    ]


def _predicted(source_count: int | None = None) -> tuple[object, object, list, list]:
    torch.manual_seed(0)
    net = Deep().eval()
    batches = _batches(4, 0)
    model = quantize(net, batches, QuantConfig(activation_bits=4))
    settings = ActivationQPSettings(
        mode="predicted", estimator="percentile:99.9", source_count=source_count
    )
    handle = configure_activation_qps(model, batches, settings)
    with quantization_off(model), torch.no_grad():  # type: ignore[arg-type]
        reference = [[model(*b)] for b in batches]  # type: ignore[operator]
    return model, handle, batches, reference


@pytest.mark.parametrize("source_count", [1, 5])
def test_the_sweep_gives_a_layer_the_fit_that_predicts_it_well(source_count: int) -> None:
    """One layer's columns are spoiled (its ranges predicted 8 times too wide): the sweep takes
    that layer's columns from the intact fit, leaves every other layer on the base fit, and
    the error it reports is what a full run of the result gives. With one source, the
    predictor runs before the cut of every layer it predicts, so a try rewrites the layer's
    recorded QPs; with a source per layer, the layer's own predictor runs in the try."""
    model, handle, batches, reference = _predicted(source_count)
    assert len(handle.predictors) == source_count  # type: ignore[attr-defined]
    assert len(handle.samplers) == 5  # type: ignore[attr-defined]
    intact = copy.deepcopy(handle.predictors)  # type: ignore[attr-defined]
    layers = sorted({n for p in intact for n, _ in p.targets}, key=list(handle.samplers).index)  # type: ignore[attr-defined]
    assert len(layers) >= 4
    spoiled = layers[len(layers) // 2]
    for predictor in handle.predictors:  # type: ignore[attr-defined]
        for column, (name, _) in enumerate(predictor.targets):
            if name == spoiled:
                predictor.weight[0, column] += math.log(8.0)
    used = batches[:TARGET_SWEEP_BATCHES]
    spoiled_error = relative_output_error(model, used, reference[: len(used)])  # type: ignore[arg-type]
    choice = refine_targets_per_layer(
        model,  # type: ignore[arg-type]
        handle.samplers,  # type: ignore[attr-defined]
        handle.predictors,  # type: ignore[attr-defined]
        {"intact": intact},
        "spoiled",
        batches,
        reference,
    )
    assert choice.fits[spoiled] == "intact"
    assert all(fit == "spoiled" for name, fit in choice.fits.items() if name != spoiled)
    assert choice.start_error == pytest.approx(spoiled_error, abs=1e-6)
    assert choice.error < 0.8 * choice.start_error
    assert relative_output_error(model, used, reference[: len(used)]) == pytest.approx(  # type: ignore[arg-type]
        choice.error, abs=1e-6
    )


def test_fits_with_other_sources_are_refused() -> None:
    model, handle, batches, reference = _predicted()
    other = copy.deepcopy(handle.predictors)  # type: ignore[attr-defined]
    other.reverse()
    if [p.source for p in other] == [p.source for p in handle.predictors]:  # type: ignore[attr-defined]
        other = other[1:]
    with pytest.raises(ConfigError, match="other predictor sources"):
        refine_targets_per_layer(
            model,  # type: ignore[arg-type]
            handle.samplers,  # type: ignore[attr-defined]
            handle.predictors,  # type: ignore[attr-defined]
            {"other": other},
            "base",
            batches,
            reference,
        )


def _spoil(predictors: list, layer: str, factor: float) -> None:
    for predictor in predictors:
        for column, (name, _) in enumerate(predictor.targets):
            if name == layer:
                predictor.weight[0, column] += math.log(factor)


def test_static_columns_predict_the_calibrated_range_for_any_input() -> None:
    """Every uniform predicted layer's static columns give its static grid's ends, to the
    log-range grid, whatever the features: the sampler's per-input grid is then the static
    one."""
    _, handle, _, _ = _predicted(5)
    static = static_columns(handle.predictors, handle.samplers)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(3)
    checked = 0
    for predictor in static:
        features = torch.randn(7, len(predictor.feature_names), generator=generator) * 5
        qps = predictor.predict_qps(features)
        for column, (name, kind) in enumerate(predictor.targets):
            quantizer = handle.samplers[name].quantizer  # type: ignore[attr-defined]
            qmin, qmax = quantizer.integer_range
            zero_point, scale = float(quantizer.zero_point), float(quantizer.scale)
            end = (zero_point - qmin) * scale if kind == "lo" else (qmax - zero_point) * scale
            torch.testing.assert_close(qps[:, column], torch.full((7,), end), rtol=4e-3, atol=0)
            checked += 1
    assert checked >= 5
    # The fitted predictors are left as they were: the static fit is a copy.
    assert any(p.weight[1:].abs().sum() > 0 for p in handle.predictors)  # type: ignore[attr-defined]


def test_a_layer_whose_prediction_is_spoiled_everywhere_takes_its_static_range() -> None:
    """When every fit predicts one layer's ranges 8 times too wide, the sweep gives that layer
    the static columns, and the sweep's error is what the model then runs."""
    model, handle, batches, reference = _predicted(1)
    layers = [n for p in handle.predictors for n, _ in p.targets]  # type: ignore[attr-defined]
    spoiled = layers[len(layers) // 2]
    _spoil(handle.predictors, spoiled, 8.0)  # type: ignore[attr-defined]
    other = copy.deepcopy(handle.predictors)  # type: ignore[attr-defined]
    static = static_columns(handle.predictors, handle.samplers)  # type: ignore[attr-defined]
    choice = refine_targets_per_layer(
        model,  # type: ignore[arg-type]
        handle.samplers,  # type: ignore[attr-defined]
        handle.predictors,  # type: ignore[attr-defined]
        {"also spoiled": other, STATIC_FIT: static},
        "spoiled",
        batches,
        reference,
    )
    assert choice.fits[spoiled] == STATIC_FIT
    assert choice.error < 0.8 * choice.start_error
    used = batches[:TARGET_SWEEP_BATCHES]
    assert relative_output_error(model, used, reference[: len(used)]) == pytest.approx(  # type: ignore[arg-type]
        choice.error, abs=1e-6
    )


def test_static_layer_targets_save_and_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A run whose per-layer choice kept some layers static saves, loads and labels them."""
    model, _, settings, handle = _per_layer_predicted()
    assert handle.layer_targets
    first = next(iter(handle.layer_targets))
    handle.layer_targets[first] = STATIC_FIT
    assert "static 1" in str(handle.target_label)
    assert handle.target_assignment()[first] == handle.samplers[first].estimator
    handle.save(tmp_path)
    handle.detach()
    loaded = load_activation_qps(model, tmp_path, settings)
    assert loaded.layer_targets == handle.layer_targets


def test_the_static_layer_estimator_runs_the_calibrated_grid_exactly() -> None:
    """``dynamic`` mode with a layer on ``STATIC_ESTIMATOR`` gives the outputs of that layer
    in static mode; its per-input QPs are the static grid's ends, which give back the grid's
    scale and zero point; it costs no run-time reduction; a user cannot ask for it."""
    model, handle, batches, _ = _predicted()
    samplers = handle.samplers  # type: ignore[attr-defined]
    name = list(samplers)[2]
    sampler = samplers[name]
    handle.set_mode("dynamic")  # type: ignore[attr-defined]
    x = batches[1]
    with torch.no_grad():
        sampler.mode = QPMode.STATIC
        expected = model(*x)  # type: ignore[operator]
        dynamic_before = handle.overhead_flops(x)["dynamic"]  # type: ignore[attr-defined]
        sampler.mode, sampler.estimator = QPMode.DYNAMIC, STATIC_ESTIMATOR
        assert torch.equal(model(*x), expected)  # type: ignore[operator]
        dynamic_after = handle.overhead_flops(x)["dynamic"]  # type: ignore[attr-defined]
    quantizer = sampler.quantizer
    qps = sampler.exact_qps(torch.randn(5, 64) * 100)
    spec = quantizer.spec
    scale, zero_point = choose_qparams(qps.lo, qps.hi, spec.bits, spec.symmetric, spec.is_signed)
    torch.testing.assert_close(scale, quantizer.scale.expand(5), rtol=1e-6, atol=0)
    torch.testing.assert_close(zero_point, quantizer.zero_point.expand(5))
    assert 0 < dynamic_after < dynamic_before
    with pytest.raises(ConfigError, match="not a per-input range"):
        ActivationQPSettings(mode="dynamic", estimator=STATIC_ESTIMATOR)


def test_dynamic_mode_keeps_the_static_layers_of_the_predictors_mix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The predictors' mix that ``dynamic`` mode may run keeps a layer that predicted mode
    runs on its static range static (the exact counterpart of predicted mode), and its
    recorded error is that model's; a save with a static layer estimator reloads it."""
    model, batches, settings, handle = _per_layer_predicted()
    first = next(iter(handle.layer_targets))
    handle.layer_targets[first] = STATIC_FIT
    used = batches[:TARGET_SWEEP_BATCHES]
    targets = {
        n: STATIC_ESTIMATOR if t == STATIC_FIT else t for n, t in handle.layer_targets.items()
    }
    reference = _float_outputs(model, batches)
    expected = mix_errors(model, handle.samplers, {"targets": targets}, used, reference)
    _choose_dynamic_mix(handle, batches, reference)
    assert handle.dynamic_mix_errors["targets"] == pytest.approx(expected["targets"], abs=1e-6)
    # Whatever mix won, a static layer estimator saves, reloads and is named in the label.
    handle.layer_estimators[first] = STATIC_ESTIMATOR
    handle.samplers[first].estimator = STATIC_ESTIMATOR
    assert "static 1" in handle.dynamic_estimator_label
    handle.set_mode("dynamic")
    with torch.no_grad():
        expected_dynamic = model(*batches[3])  # type: ignore[operator]
    handle.save(tmp_path)
    handle.detach()
    loaded = load_activation_qps(model, tmp_path, settings)
    assert loaded.layer_estimators[first] == STATIC_ESTIMATOR
    loaded.set_mode("dynamic")
    with torch.no_grad():
        assert torch.equal(model(*batches[3]), expected_dynamic)  # type: ignore[operator]


def _per_layer_predicted() -> tuple[object, list, ActivationQPSettings, object]:
    """``Deep`` at W8A4 with ``per-layer`` predicted ranges: model, batches, settings, QPs."""
    torch.manual_seed(0)
    net = Deep().eval()
    batches = _batches(4, 0)
    model = quantize(net, batches, QuantConfig(activation_bits=4))
    settings = ActivationQPSettings(mode="predicted", estimator="per-layer")
    return model, batches, settings, configure_activation_qps(model, batches, settings)


def _float_outputs(model: object, batches: list) -> list[list[torch.Tensor]]:
    with quantization_off(model), torch.no_grad():  # type: ignore[arg-type]
        return [[model(*b)] for b in batches]  # type: ignore[operator]
