"""``qpp quantize`` / ``qpp eval`` / ``qpp models`` on good input: the JSON object, the run
folder, exact reproduction, determinism, user ONNX models, the fx fallback, per-layer changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from qpp.predict.predictor import DEFAULT_FEATURES, SIGNED_FEATURES
from qpp.runs import FILES
from qpp.zoo import zoo_names


@pytest.fixture(scope="module")
def digits_result(digits_run) -> dict:
    assert digits_run.returncode == 0, digits_run.stderr
    return digits_run.result


def test_json_is_one_object_with_the_documented_keys(digits_run, digits_result: dict) -> None:
    assert digits_run.stdout.count("\n") == 1 and digits_run.stdout.endswith("}\n")
    assert "Traceback" not in digits_run.stderr
    assert digits_result["model"] == "digits-cnn"
    assert digits_result["output_dir"] == str(digits_run.folder)
    assert digits_result["config"]["weight_bits"] == digits_result["config"]["activation_bits"] == 8
    for key, parts in {
        "metrics": {"fp32", "quantized"},
        "size_bytes": {"fp32", "quantized"},
        "seconds": {"calibrate", "evaluate", "total"},
    }.items():
        assert set(digits_result[key]) == parts, key
    assert digits_result["metrics"]["fp32"]["top1"] > 90
    assert (
        digits_result["metrics"]["quantized"]["top1"]
        >= digits_result["metrics"]["fp32"]["top1"] - 1
    )
    assert 0 < digits_result["size_bytes"]["quantized"] < digits_result["size_bytes"]["fp32"] / 3
    seconds = digits_result["seconds"]
    assert 0 < seconds["calibrate"] + seconds["evaluate"] <= seconds["total"]


def test_run_folder_holds_the_four_files(digits_run, digits_result: dict) -> None:
    assert sorted(p.name for p in digits_run.folder.iterdir()) == sorted(FILES)
    manifest = json.loads((digits_run.folder / "qpp.json").read_text())
    assert manifest["source"]["model"] == "digits-cnn"
    assert manifest["config"] == digits_result["config"]
    report = json.loads((digits_run.folder / "report.json").read_text())
    assert report["metrics"] == digits_result["metrics"]
    encodings = json.loads((digits_run.folder / "encodings.json").read_text())
    assert len(encodings) == digits_result["quantizers"]
    assert all(e["calibrated"] and e["enabled"] for e in encodings.values())


def test_eval_reproduces_the_metrics_exactly(qpp, digits_run, digits_result: dict) -> None:
    result = qpp("eval", digits_run.folder, "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["reproduced"] is True
    assert evaluated["metrics"] == digits_result["metrics"]
    assert evaluated["config"] == digits_result["config"]


def test_same_config_gives_identical_files(qpp, digits_run, tmp_path: Path) -> None:
    result = qpp("quantize", "digits-cnn", "--json", "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    for name in ("encodings.json", "weights.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (
            digits_run.folder / name
        ).read_bytes(), name


def test_models_lists_the_zoo(qpp) -> None:
    result = qpp("models")
    assert result.exit_code == 0, result.output
    assert len(zoo_names()) == 5
    for name in zoo_names():
        assert name in result.stdout


def test_user_onnx_classifier(
    qpp, user_classifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's ONNX model with npz data, given by relative paths; W8A8 keeps top-1."""
    monkeypatch.chdir(user_classifier.folder)
    relative = [
        "classifier.onnx",
        "--calib",
        "calib.npz",
        "--eval",
        "eval.npz",
    ]
    result = qpp("quantize", *relative, "--json", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    fp32, quantized = data["metrics"]["fp32"], data["metrics"]["quantized"]
    assert set(fp32) == set(quantized) == {"top1", "output_cosine"}
    assert data["primary_metric"] == "top1"
    assert fp32["top1"] > 80 and fp32["output_cosine"] == pytest.approx(1.0)
    assert abs(quantized["top1"] - fp32["top1"]) <= 1.0
    assert quantized["output_cosine"] > 0.99

    # The folder records absolute paths, so it evaluates from anywhere.
    monkeypatch.chdir(tmp_path)
    evaluated = qpp("eval", tmp_path / "run", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["reproduced"] is True


FX_ONLY_MODEL = '''
import numpy as np
import torch


@torch.fx.wrap
def numpy_tanh(x):
    """numpy in the forward: torch.export cannot trace it, torch.fx keeps it as a call."""
    return torch.from_numpy(np.tanh(x.detach().numpy()))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(numpy_tanh(self.conv(x)).flatten(1))


def build():
    torch.manual_seed(0)
    return Net()
'''


def test_fx_fallback_from_the_command_line(qpp, tmp_path: Path) -> None:
    (tmp_path / "fx_only.py").write_text(FX_ONLY_MODEL)
    images = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "data.npz", x=images)
    data = tmp_path / "data.npz"
    result = qpp(
        "quantize",
        f"{tmp_path / 'fx_only.py'}:build",
        "--calib",
        data,
        "--eval",
        data,
        "--json",
        "--out",
        tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)
    assert output["metrics"]["quantized"]["output_cosine"] > 0.99
    encodings = json.loads((tmp_path / "run" / "encodings.json").read_text())
    assert {"conv.weight", "fc.weight"} <= set(encodings)


def test_override_and_disable_change_the_encodings(qpp, digits_run, tmp_path: Path) -> None:
    """A 4-bit first conv, per-tensor last conv weights, a float classifier input: only those
    quantizers change."""
    result = qpp(
        "quantize", "digits-cnn", "--json", "--out", tmp_path / "run",
        "--override", "features.0.0.weight:bits=4",
        "--override", "features.4.*.weight:granularity=per-tensor",
        "--disable", "classifier.input",
        "--calib-samples", "64", "--activation-estimator", "minmax",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    changed = json.loads((tmp_path / "run" / "encodings.json").read_text())
    default = json.loads((digits_run.folder / "encodings.json").read_text())
    assert changed.keys() == default.keys()

    first = changed["features.0.0.weight"]
    assert first["spec"]["bits"] == 4 and default["features.0.0.weight"]["spec"]["bits"] == 8
    assert first["enabled"]
    # symmetric signed 4-bit: the largest weight of each channel lands near ±7, not ±127
    assert all(
        s4 > 8 * s8
        for s4, s8 in zip(first["scale"], default["features.0.0.weight"]["scale"], strict=True)
    )

    last = changed["features.4.0.weight"]
    assert last["spec"]["granularity"] == "per-tensor" and len(last["scale"]) == 1
    assert len(default["features.4.0.weight"]["scale"]) == 64

    assert changed["classifier.input"]["enabled"] is False
    assert sum(not e["enabled"] for e in changed.values()) == 1

    # Weight encodings do not depend on data: untouched weights keep theirs exactly.
    for name, encoding in changed.items():
        if encoding["kind"] == "weight" and name not in (
            "features.0.0.weight",
            "features.4.0.weight",
        ):
            assert encoding == default[name], name

    config = json.loads((tmp_path / "run" / "qpp.json").read_text())["config"]
    assert config["overrides"] == {
        "features.0.0.weight": {"bits": 4},
        "features.4.*.weight": {"granularity": "per-tensor"},
        "classifier.input": {"enabled": False},
    }


def test_list_quantizers(qpp) -> None:
    result = qpp("quantize", "digits-cnn", "--list-quantizers")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "weight     features.0.0.weight" in lines
    assert "activation classifier.input" in lines


def test_default_out_is_a_new_folder_under_runs(
    qpp, user_classifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "classifier-1").mkdir(parents=True)
    (tmp_path / "runs" / "classifier-1" / "keep.txt").write_text("earlier run")
    result = qpp(
        "quantize", *user_classifier.args(), "--json", "--quiet",
        "--weight-estimator", "minmax", "--activation-estimator", "minmax",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output_dir"] == os.path.join("runs", "classifier-2")
    assert sorted(p.name for p in (tmp_path / "runs" / "classifier-2").iterdir()) == sorted(FILES)
    assert (tmp_path / "runs" / "classifier-1" / "keep.txt").read_text() == "earlier run"


def test_predicted_dense_sparse_with_compare(qpp, user_classifier, tmp_path: Path) -> None:
    """QPP from the command line: one table of static, predicted and dynamic, a saved
    predictor, and an eval that reproduces the metrics."""
    run = tmp_path / "qpp-run"
    result = qpp(
        "quantize",
        *user_classifier.args(),
        "--activations",
        "4",
        "--activation-ranges",
        "predicted",
        "--scheme",
        "dense-sparse",
        "--outlier-fraction",
        "0.2",  # Dense+Sparse needs 10 / 0.2 = 50 elements per sample: the 64 inputs qualify
        "--compare",
        "--json",
        "--out",
        run,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    modes = data["compare"]["modes"]
    assert list(modes) == ["static", "predicted", "dynamic"]
    assert data["compare"]["output_error_on"] == "outputs"  # logits, not probabilities
    for row in modes.values():
        assert set(row["metrics"]) == {"top1", "output_cosine"}
        assert 0.0 <= row["outlier_density"]["mean"] <= 1.0
        assert 0.0 < row["output_error"] < 1.0  # A4 moves the outputs, and not to noise
    assert modes["dynamic"]["outlier_density"]["mean"] <= 0.2 + 1e-6  # exact thresholds
    assert modes["static"]["overhead_flops"] == 0
    # on a 64-input MLP the features cost more than min/max reductions; both are counted
    assert modes["predicted"]["overhead_percent"] > 0 and modes["dynamic"]["overhead_flops"] > 0
    assert data["metrics"]["quantized"] == modes["predicted"]["metrics"]
    assert data["outlier_density"]["target"] == 0.2
    assert (run / "activation_qps.json").is_file()
    assert (run / "activation_qps.safetensors").is_file()
    saved = json.loads((run / "activation_qps.json").read_text())
    assert saved["settings"]["features"] == list(DEFAULT_FEATURES)  # |x| for thresholds
    assert data["plots"] == ["qps_predicted.png", "outlier_density.png"]
    for name in data["plots"]:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    evaluated = qpp("eval", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["reproduced"] is True


def test_uniform_predictors_read_signed_features_by_default(
    qpp, user_classifier, tmp_path: Path
) -> None:
    run = tmp_path / "uniform-run"
    result = qpp(
        "quantize", *user_classifier.args(), "--activation-ranges", "predicted",
        "--json", "--out", run,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "activation_qps.json").read_text())
    assert saved["settings"]["features"] == list(SIGNED_FEATURES)
    assert all(p["features"] == list(SIGNED_FEATURES) for p in saved["predictors"])


@pytest.mark.parametrize("mode", ["dynamic", "predicted"])
def test_per_layer_ranges_are_reported_and_reproduced(
    qpp, user_classifier, tmp_path: Path, mode: str
) -> None:
    run = tmp_path / "per-layer-run"
    result = qpp(
        "quantize", *user_classifier.args(), "--activations", "4", "--activation-ranges",
        mode, "--dynamic-estimator", "per-layer", "--json", "--out", run,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    choice = json.loads(result.stdout)["dynamic_estimator"]
    per_layer = choice["per_layer"]
    assert per_layer["output_error_after"] <= per_layer["output_error_before"]
    saved = json.loads((run / "activation_qps.json").read_text())
    assert {n: layer["estimator"] for n, layer in saved["layers"].items()} == (
        per_layer["estimators"]
    )
    if mode == "predicted":  # the fits' columns were chosen layer by layer too
        targets = choice["per_layer_targets"]
        assert targets["output_error_after"] <= targets["output_error_before"]
        assert targets["label"].startswith("per-layer (")
        saved_targets = {n: layer["target"] for n, layer in saved["layers"].items()}
        assert saved_targets == targets["targets"]
        mix = choice["dynamic_mix"]  # dynamic mode runs the candidate with the least error
        best = min(mix["errors"], key=mix["errors"].__getitem__)
        assert mix["changed"] is (mix["adopted"] != "per-layer choice")
        assert mix["adopted"] in (best, "per-layer choice")
        saved_offsets = {
            n: layer["dynamic_offset"]
            for n, layer in saved["layers"].items()
            if "dynamic_offset" in layer
        }
        assert saved_offsets == mix["offsets"]
        second = choice["dynamic_second_sweep"]  # then the estimators again, on its batches
        assert second["output_error_before"] == pytest.approx(mix["errors"][mix["adopted"]])
        assert second["output_error_after"] <= second["output_error_before"]
        assert second["estimators"] == per_layer["estimators"]
    else:
        assert "per_layer_targets" not in choice and "dynamic_mix" not in choice
        assert "dynamic_second_sweep" not in choice
    evaluated = qpp("eval", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["reproduced"] is True


def test_dense_sparse_on_tensors_too_small_for_the_fraction_stays_uniform(
    qpp, user_classifier
) -> None:
    """At 1 % a 64-value tensor has no outlier tail: every layer keeps the uniform scheme and
    the report has no density rows instead of failing."""
    result = qpp(
        "quantize", *user_classifier.args(), "--activation-ranges", "predicted",
        "--scheme", "dense-sparse", "--compare", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "outlier_density" not in data
    assert all("outlier_density" not in row for row in data["compare"]["modes"].values())


def test_bad_activation_range_mode_is_a_user_error(qpp, user_error, user_classifier) -> None:
    result = qpp("quantize", *user_classifier.args(), "--activation-ranges", "adaptive")
    user_error(result, "unknown activation-range mode 'adaptive'", "static, dynamic or predicted")
