"""``--dynamic-estimator auto`` and ``per-layer``: the per-input range is chosen by output
error on calibration data, for the whole model or layer by layer
(``qpp.predict.estimator_choice``)."""

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from qpp.api import prepare, quantize
from qpp.errors import EncodingsError
from qpp.predict import ActivationQPSettings, configure_activation_qps, load_activation_qps
from qpp.predict.activation_qps import (
    CHOSEN_MIX,
    DYNAMIC_MIXES,
    TARGET_CANDIDATES,
    _choose_dynamic_mix,
    _dynamic_mix,
    best_dynamic_mix,
)
from qpp.predict.estimator_choice import (
    CANDIDATE_ESTIMATORS,
    CHOICE_BATCHES,
    PER_LAYER_BATCHES,
    PER_LAYER_MIN_GAIN,
    quantization_off,
    refine_per_layer,
    relative_output_error,
)
from qpp.report.tables import print_estimator_choice
from qpp.runs import graph_weights
from qpp.sim.config import QuantConfig


class TwoLayerNet(nn.Module):
    """Ignores its input's first feature (a zero weight column)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(1024, 32)
        self.second = nn.Linear(32, 8)
        with torch.no_grad():
            self.first.weight[:, 0] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def spiky_batches(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    """Gaussian rows whose first feature is huge and different in every row: a per-input
    min-max range spends the 4-bit grid on that value, which the model ignores; a clipped
    range keeps resolution for the other 1023."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(16, 1024, generator=generator)
        x[:, 0] = 20.0 + 40.0 * torch.rand(16, generator=generator)
        batches.append((x,))
    return batches


def _model() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    net = TwoLayerNet().eval()
    return net, quantize(net, spiky_batches(4, 0), QuantConfig(activation_bits=4))


def _rebuilt(net: nn.Module, model: object, x: tuple[torch.Tensor]) -> object:
    """A new quantized ``net`` with ``model``'s weights and encodings (a reloaded run)."""
    rebuilt = prepare(net, x, QuantConfig(activation_bits=4))
    rebuilt.graph_module.load_state_dict(graph_weights(model), strict=False)  # type: ignore[arg-type]
    rebuilt.load_encodings(model.encodings())  # type: ignore[attr-defined]
    return rebuilt


def _reload_reproduces(
    net: nn.Module, model: object, handle: object, folder: Path, settings: ActivationQPSettings
) -> object:
    """Reload the QPs ``handle`` saved in ``folder`` onto a rebuilt model, check that its
    outputs equal the original's in the saved mode and in dynamic mode, and return them."""
    x = spiky_batches(1, 5)[0]
    with torch.no_grad():
        expected = model(*x)  # type: ignore[operator]
        handle.set_mode("dynamic")  # type: ignore[attr-defined]
        expected_dynamic = model(*x)  # type: ignore[operator]
    rebuilt = _rebuilt(net, model, x)
    loaded = load_activation_qps(rebuilt, folder, settings)  # type: ignore[arg-type]
    with torch.no_grad():
        assert torch.equal(rebuilt(*x), expected)  # type: ignore[operator]
        loaded.set_mode("dynamic")
        assert torch.equal(rebuilt(*x), expected_dynamic)  # type: ignore[operator]
    return loaded


def _reference(model: object, batches: list) -> list[list[torch.Tensor]]:
    """The float model's outputs on ``batches`` (every quantizer passing through)."""
    with quantization_off(model), torch.no_grad():  # type: ignore[arg-type]
        return [[model(*b)] for b in batches]  # type: ignore[operator]


def _output_error(model: object, net: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - net(x)).square().mean())  # type: ignore[operator]


def test_auto_picks_a_clipping_range_where_min_max_wastes_the_grid() -> None:
    net, model = _model()
    handle = configure_activation_qps(
        model, spiky_batches(4, 0), ActivationQPSettings(mode="dynamic")
    )
    errors = handle.estimator_errors
    assert list(errors) == list(CANDIDATE_ESTIMATORS)
    chosen = handle.settings.estimator
    assert chosen == min(errors, key=errors.__getitem__) and chosen != "minmax", errors
    assert all(s.estimator == chosen for s in handle.samplers.values())
    assert all(s.mode.value == "dynamic" for s in handle.samplers.values())
    # The choice made on calibration data holds on other inputs.
    held_out = torch.cat([b[0] for b in spiky_batches(2, 9)])
    auto_error = _output_error(model, net, held_out)
    handle.detach()
    minmax = configure_activation_qps(
        model, spiky_batches(4, 0), ActivationQPSettings(mode="dynamic", estimator="minmax")
    )
    assert minmax.estimator_errors == {}  # an explicit estimator is used as given
    assert auto_error < 0.7 * _output_error(model, net, held_out)


def test_the_chosen_estimator_is_saved_and_reloaded(tmp_path: Path) -> None:
    net, model = _model()
    settings = ActivationQPSettings(mode="predicted")
    handle = configure_activation_qps(model, spiky_batches(4, 0), settings)
    handle.save(tmp_path)
    loaded = _reload_reproduces(net, model, handle, tmp_path, settings)
    assert loaded.settings.estimator == handle.settings.estimator != "auto"
    assert loaded.estimator_errors == handle.estimator_errors
    assert loaded.static_output_error == handle.static_output_error is not None


def test_the_static_ranges_error_is_measured_on_the_same_batches(tmp_path: Path) -> None:
    _, model = _model()
    batches = spiky_batches(4, 0)
    handle = configure_activation_qps(model, batches, ActivationQPSettings(mode="dynamic"))
    assert handle.static_output_error is not None
    used = batches[:CHOICE_BATCHES]
    reference = _reference(model, used)
    handle.set_mode("static")
    expected = relative_output_error(model, used, reference)  # type: ignore[arg-type]
    assert handle.static_output_error == pytest.approx(expected, rel=1e-4)
    assert handle.static_output_error > 0
    handle.save(tmp_path)
    state = json.loads((tmp_path / "activation_qps.json").read_text())
    assert state["static_output_error"] == handle.static_output_error


def _report_text(choice: dict) -> str:
    """What ``qpp quantize`` prints of a result whose ``dynamic_estimator`` is ``choice``."""
    console = Console(record=True, width=400)
    print_estimator_choice({"model": "m", "dynamic_estimator": choice}, console)
    return console.export_text()


@pytest.mark.parametrize(("static", "noted"), [(0.2, True), (0.9, False)])
def test_the_report_says_when_static_ranges_beat_every_per_input_range(
    static: float, noted: bool
) -> None:
    text = _report_text(
        {
            "chosen": "mse",
            "calibration_output_error": {"minmax": 0.9, "mse": 0.3},
            "static_output_error": static,
        }
    )
    assert f"static ranges {static:.4g}" in text
    assert ("per-input QPs may not pay" in text) is noted


def _predicted_error(model: object, handle: object, batches: list) -> float:
    used = batches[:CHOICE_BATCHES]
    reference = _reference(model, used)
    handle.set_mode("predicted")  # type: ignore[attr-defined]
    return relative_output_error(model, used, reference)  # type: ignore[arg-type]


def test_predictor_targets_are_the_candidate_best_predicted(tmp_path: Path) -> None:
    net, model = _model()
    batches = spiky_batches(4, 0)
    handle = configure_activation_qps(model, batches, ActivationQPSettings(mode="predicted"))
    dynamic = handle.estimator_errors
    ranked = sorted(dynamic, key=dynamic.__getitem__)
    assert list(handle.target_errors) == ranked[:TARGET_CANDIDATES]
    best = min(handle.target_errors, key=handle.target_errors.__getitem__)
    assert handle.target_estimator == best
    # The samplers keep the dynamic choice for dynamic mode; the kept fit is the one measured.
    assert all(s.estimator == handle.settings.estimator for s in handle.samplers.values())
    assert _predicted_error(model, handle, batches) == pytest.approx(
        handle.target_errors[best], rel=1e-4
    )
    handle.save(tmp_path)
    handle.detach()
    # Each candidate's error is what fitting to that estimator alone gives.
    for candidate, error in handle.target_errors.items():
        alone = configure_activation_qps(
            model, batches, ActivationQPSettings(mode="predicted", estimator=candidate)
        )
        assert alone.target_estimator == candidate and alone.target_errors == {}
        assert _predicted_error(model, alone, batches) == pytest.approx(error, rel=1e-4)
        alone.detach()
    rebuilt = _rebuilt(net, model, batches[0])
    loaded = load_activation_qps(rebuilt, tmp_path, ActivationQPSettings(mode="predicted"))
    assert loaded.target_estimator == best and loaded.target_errors == handle.target_errors


def test_the_report_names_the_predictor_targets() -> None:
    text = _report_text(
        {
            "chosen": "mse",
            "calibration_output_error": {"mse": 0.2, "percentile:99.9": 0.3},
            "static_output_error": 0.5,
            "predictor_targets": "percentile:99.9",
            "predicted_output_error": {"mse": 0.36, "percentile:99.9": 0.31},
        }
    )
    assert "predictor targets: percentile:99.9" in text and "mse 0.36" in text


def test_paired_exact_qps_are_the_predictor_targets() -> None:
    _, model = _model()
    batches = spiky_batches(4, 0)
    handle = configure_activation_qps(model, batches, ActivationQPSettings(mode="predicted"))
    dynamic = handle.settings.estimator
    assert dynamic != "minmax"  # min-max wastes the grid on the spike (first test)
    handle.target_estimator = "minmax"  # pair against per-input min-max ranges
    x = batches[0][0]
    with handle.pairing_qps() as pairs, torch.no_grad():
        model(x)  # type: ignore[operator]
    _, exact = pairs["first.input"]
    assert torch.allclose(exact, x.max(dim=1).values)
    assert all(s.estimator == dynamic for s in handle.samplers.values())


def test_pairing_leaves_dynamic_layers_their_own_estimator() -> None:
    """compare_modes pairs QPs around every mode's evaluation: in dynamic mode the rows must
    be the dynamic estimator's, not the predictor targets' (a bug before 2026-12-06 evening)."""
    _, model = _model()
    batches = spiky_batches(4, 0)
    handle = configure_activation_qps(model, batches, ActivationQPSettings(mode="predicted"))
    assert handle.settings.estimator != "minmax"
    handle.target_estimator = "minmax"
    handle.set_mode("dynamic")
    x = batches[0][0]
    with torch.no_grad():
        expected = model(x)  # type: ignore[operator]
        with handle.pairing_qps():
            assert torch.equal(model(x), expected)  # type: ignore[operator]
        handle.set_mode("predicted")
        with handle.pairing_qps() as pairs:
            model(x)  # type: ignore[operator]
    assert torch.allclose(pairs["first.input"][1], x.max(dim=1).values)  # predicted: targets


# --- per-layer -----------------------------------------------------------------------------


def _dynamic_with(estimator: str) -> tuple[object, object, list, list]:
    """The spiky model in dynamic mode with ``estimator`` on every layer, its calibration
    batches and the float outputs of the batches the refinement runs on."""
    _, model = _model()
    batches = spiky_batches(4, 0)
    handle = configure_activation_qps(
        model, batches, ActivationQPSettings(mode="dynamic", estimator=estimator)
    )
    return model, handle, batches, _reference(model, batches[:PER_LAYER_BATCHES])


def test_refinement_clips_only_the_layer_that_needs_it() -> None:
    """From min-max everywhere, the spiky input (a huge feature the model ignores) takes a
    clipping estimator and the output error drops; the error recorded is the model's."""
    model, handle, batches, reference = _dynamic_with("minmax")
    used = batches[:PER_LAYER_BATCHES]
    refined = refine_per_layer(model, handle.samplers, batches, reference)
    assert set(refined.estimators) == set(handle.samplers)
    assert set(refined.estimators.values()) <= set(CANDIDATE_ESTIMATORS)
    assert refined.estimators["first.input"] != "minmax"
    assert refined.error < refined.start_error
    # The samplers now hold the refined estimators, and the recorded error is theirs.
    assert relative_output_error(model, used, reference) == pytest.approx(refined.error, rel=1e-4)
    assert {n: s.estimator for n, s in handle.samplers.items()} == refined.estimators
    assert all(s.mode.value == "dynamic" for s in handle.samplers.values())


def _full_run_sweep(model, samplers, used, reference) -> dict[str, str]:
    """The refinement with a full run of the model for every try (the definition)."""
    best = relative_output_error(model, used, reference)
    for sampler in samplers.values():
        kept = sampler.estimator
        for candidate in CANDIDATE_ESTIMATORS:
            if candidate != kept:
                sampler.estimator = candidate
                error = relative_output_error(model, used, reference)
                if error < best * (1.0 - PER_LAYER_MIN_GAIN):
                    best, kept = error, candidate
        sampler.estimator = kept
    return {name: s.estimator for name, s in samplers.items()}


def test_running_from_each_layer_chooses_as_full_runs_do() -> None:
    """The sweep reruns only the graph from the layer being tried; on a model where more than
    one layer changes, it ends where a sweep of full runs ends."""
    model, handle, batches, reference = _dynamic_with("mse")
    expected = _full_run_sweep(model, handle.samplers, batches[:PER_LAYER_BATCHES], reference)
    for sampler in handle.samplers.values():
        sampler.estimator = "mse"
    refined = refine_per_layer(model, handle.samplers, batches, reference)
    assert refined.estimators == expected
    assert sum(choice != "mse" for choice in expected.values()) >= 2


def test_per_layer_is_no_worse_than_auto_and_is_saved_and_reloaded(tmp_path: Path) -> None:
    net, model = _model()
    batches = spiky_batches(4, 0)
    settings = ActivationQPSettings(mode="predicted", estimator="per-layer")
    handle = configure_activation_qps(model, batches, settings)
    assert handle.settings.estimator in CANDIDATE_ESTIMATORS  # auto's single choice first
    assert handle.per_layer_errors is not None
    before, after = handle.per_layer_errors
    assert after <= before
    assert set(handle.layer_estimators) == set(handle.samplers)
    assert handle.dynamic_estimator_label.startswith("per-layer (")
    # The predictors were fitted to the per-layer choice and to every single estimator, and
    # each layer took the columns of the fit that lowers the predicted-mode error.
    assert set(handle.target_errors) == {"per-layer", *CANDIDATE_ESTIMATORS}
    assert handle.target_estimator == "per-layer"
    assert set(handle.layer_targets) == set(handle.samplers)
    assert set(handle.layer_targets.values()) <= set(CANDIDATE_ESTIMATORS)
    assert handle.target_assignment() == handle.layer_targets
    assert handle.layer_target_errors is not None
    start, refined = handle.layer_target_errors
    assert refined <= start
    # after both target sweeps, predicted mode runs the columns they ended at
    predicted_error = relative_output_error(model, batches, _reference(model, batches))
    assert predicted_error == pytest.approx(refined, rel=1e-4)
    # Dynamic mode starts from the candidate (the sweep's estimators or the predictors' mix,
    # with or without range offsets) with the lowest output error on the target sweep's
    # batches, and sweeps the layers' estimators again on those batches.
    assert {n: s.estimator for n, s in handle.samplers.items()} == handle.layer_estimators
    assert set(handle.dynamic_mix_errors) == set(DYNAMIC_MIXES)
    assert handle.dynamic_mix == best_dynamic_mix(handle.dynamic_mix_errors)
    offsets = {n: s.range_offset for n, s in handle.samplers.items() if s.range_offset}
    assert offsets == handle.dynamic_offsets
    assert handle.dynamic_sweep_errors is not None
    swept_from, swept = handle.dynamic_sweep_errors
    assert swept_from == pytest.approx(handle.dynamic_mix_errors[handle.dynamic_mix], rel=1e-4)
    assert swept <= swept_from
    handle.set_mode("dynamic")
    dynamic_error = relative_output_error(model, batches, _reference(model, batches))
    handle.set_mode("predicted")
    assert dynamic_error == pytest.approx(swept, rel=1e-4)
    handle.save(tmp_path)
    state = json.loads((tmp_path / "activation_qps.json").read_text())
    assert {n: layer["estimator"] for n, layer in state["layers"].items()} == (
        handle.layer_estimators
    )
    assert {n: layer["target"] for n, layer in state["layers"].items()} == handle.layer_targets
    loaded = _reload_reproduces(net, model, handle, tmp_path, settings)
    assert loaded.layer_estimators == handle.layer_estimators
    assert loaded.per_layer_errors == handle.per_layer_errors
    assert loaded.target_estimator == handle.target_estimator
    assert loaded.layer_targets == handle.layer_targets
    assert loaded.layer_target_errors == handle.layer_target_errors
    assert loaded.dynamic_mix_errors == handle.dynamic_mix_errors
    assert loaded.dynamic_mix == handle.dynamic_mix
    assert loaded.dynamic_offsets == handle.dynamic_offsets
    assert loaded.dynamic_sweep_errors == handle.dynamic_sweep_errors


def test_a_saved_per_layer_estimator_that_cannot_run_is_refused(tmp_path: Path) -> None:
    net, model = _model()
    batches = spiky_batches(4, 0)
    settings = ActivationQPSettings(mode="dynamic", estimator="per-layer")
    configure_activation_qps(model, batches, settings).save(tmp_path)
    path = tmp_path / "activation_qps.json"
    state = json.loads(path.read_text())
    state["layers"]["first.input"]["estimator"] = "entropy"
    path.write_text(json.dumps(state))
    rebuilt = _rebuilt(net, model, batches[0])
    with pytest.raises(EncodingsError, match="corrupt"):
        load_activation_qps(rebuilt, tmp_path, settings)


def test_the_report_names_the_per_layer_choice() -> None:
    text = _report_text(
        {
            "chosen": "mse",
            "calibration_output_error": {"minmax": 0.9, "mse": 0.3},
            "static_output_error": 0.2,
            "per_layer": {
                "label": "per-layer (mse 3, minmax 1)",
                "output_error_before": 0.31,
                "output_error_after": 0.12,
                "estimators": {},
            },
        }
    )
    assert "then per layer: per-layer (mse 3, minmax 1)" in text and "0.31 -> 0.12" in text
    assert "per-input QPs may not pay" not in text  # the single choice's note is superseded


def test_the_report_names_the_per_layer_predictor_targets() -> None:
    text = _report_text(
        {
            "chosen": "mse",
            "calibration_output_error": {"minmax": 0.9, "mse": 0.3},
            "static_output_error": 0.2,
            "predictor_targets": "per-layer",
            "predicted_output_error": {"per-layer": 0.5, "mse": 0.4},
            "per_layer_targets": {
                "label": "per-layer (percentile:99.9 3, mse 1)",
                "output_error_before": 0.41,
                "output_error_after": 0.22,
                "targets": {},
            },
        }
    )
    assert "then predicted ranges per layer: per-layer (percentile:99.9 3, mse 1)" in text
    assert "0.41 -> 0.22" in text


@pytest.mark.parametrize("targets_better", [True, False])
def test_dynamic_runs_the_candidate_with_the_least_output_error(targets_better: bool) -> None:
    """``per-layer``, predicted: dynamic mode runs the candidate of ``DYNAMIC_MIXES`` (the
    sweep's estimators, the predictors' mix, with or without range offsets) whose exact ranges
    lower the dynamic output error most, and the sweep's choice unless one beats it."""
    _, model = _model()
    batches = spiky_batches(4, 0)
    settings = ActivationQPSettings(mode="predicted", estimator="minmax")
    handle = configure_activation_qps(model, batches, settings)
    clipped = {name: "minmax" for name in handle.samplers} | {"first.input": "percentile:99.9"}
    minmax = dict.fromkeys(handle.samplers, "minmax")
    good, bad = clipped, minmax
    handle.layer_estimators, handle.layer_targets = (bad, good) if targets_better else (good, bad)
    handle.qp_offsets = dict.fromkeys(handle.samplers, 0.5)  # wider ranges: worse here
    for name, estimator in handle.layer_estimators.items():
        handle.samplers[name].estimator = estimator
    reference = _reference(model, batches)
    _choose_dynamic_mix(handle, batches, reference)
    errors = handle.dynamic_mix_errors
    assert list(errors) == list(DYNAMIC_MIXES)
    assert (errors["targets"] < errors[CHOSEN_MIX]) is targets_better
    assert errors["targets_offsets"] > errors["targets"]  # the 0.5 log offsets widen
    assert handle.dynamic_mix == best_dynamic_mix(errors)
    assert (handle.dynamic_mix != CHOSEN_MIX) is (
        min(errors.values()) < errors[CHOSEN_MIX] * (1 - PER_LAYER_MIN_GAIN)
    )
    if targets_better:
        assert handle.dynamic_mix != CHOSEN_MIX
    uses_targets = handle.dynamic_mix.startswith("targets")
    assert handle.layer_estimators == (bad if uses_targets != targets_better else good)
    assert {n: s.estimator for n, s in handle.samplers.items()} == handle.layer_estimators
    offsets = {n: s.range_offset for n, s in handle.samplers.items() if s.range_offset}
    assert offsets == handle.dynamic_offsets
    assert bool(offsets) is ("offsets" in handle.dynamic_mix or "fitted" in handle.dynamic_mix)
    # The comparison ran in dynamic mode and left the model in predicted mode.
    assert {s.mode.value for s in handle.samplers.values()} == {"predicted"}
    handle.set_mode("dynamic")
    error = relative_output_error(model, batches, reference)
    assert error == pytest.approx(errors[handle.dynamic_mix], rel=1e-4)
    assert error <= errors[CHOSEN_MIX] * (1 + 1e-4)  # the errors are rounded


def test_the_best_dynamic_mix_must_beat_the_per_layer_choice() -> None:
    errors = dict.fromkeys(DYNAMIC_MIXES, 1.0)
    assert best_dynamic_mix(errors) == CHOSEN_MIX  # ties keep the sweep's choice
    errors["targets_fitted"] = 1.0 - PER_LAYER_MIN_GAIN / 2
    assert best_dynamic_mix(errors) == CHOSEN_MIX  # within the minimum gain
    errors["targets_fitted"] = errors["chosen_fitted"] = 0.5
    assert best_dynamic_mix(errors) == "chosen_fitted"  # ties go to the earlier candidate
    assert best_dynamic_mix({}) == CHOSEN_MIX


def test_a_save_from_before_the_offset_candidates_reloads_its_mix() -> None:
    """Older saves kept ``[per-layer choice error, predictors' mix error]``."""
    errors, mix = _dynamic_mix({"dynamic_mix_errors": [0.3, 0.2]})
    assert errors == {CHOSEN_MIX: 0.3, "targets": 0.2} and mix == "targets"
    assert _dynamic_mix({"dynamic_mix_errors": [0.2, 0.3]})[1] == CHOSEN_MIX
    assert _dynamic_mix({"dynamic_mix_errors": None}) == ({}, CHOSEN_MIX)
    with pytest.raises(ValueError, match="unknown dynamic mix"):
        _dynamic_mix({"dynamic_mix_errors": {CHOSEN_MIX: 0.1}, "dynamic_mix": "bogus"})


def test_the_report_says_which_ranges_dynamic_mode_runs() -> None:
    choice = {
        "chosen": "mse",
        "calibration_output_error": {"mse": 0.2},
        "static_output_error": 0.5,
        "dynamic_mix": {
            "errors": {"per-layer choice": 0.25, "predictors' mix, fitted offsets": 0.2},
            "adopted": "predictors' mix, fitted offsets",
            "changed": True,
            "offsets": {"first.input": -0.2},
        },
    }
    text = _report_text(choice)
    assert "dynamic ranges take the predictors' mix, fitted offsets" in text
    assert "per-layer choice 0.25" in text
    choice["dynamic_mix"] |= {"adopted": "per-layer choice", "changed": False}
    choice["dynamic_second_sweep"] = {
        "output_error_before": 0.25,
        "output_error_after": 0.125,
        "estimators": {},
    }
    text = _report_text(choice)
    assert "dynamic ranges keep their per-layer choice" in text
    assert "then dynamic ranges per layer again" in text and "0.25 -> 0.125" in text
