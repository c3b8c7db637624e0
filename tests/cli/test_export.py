"""``qpp export`` and ``qpp bench``: good runs (zoo and user ONNX models) and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest


@pytest.fixture
def digits_folder(digits_run, tmp_path: Path) -> Path:
    assert digits_run.returncode == 0, digits_run.stderr
    folder = tmp_path / "run"
    shutil.copytree(digits_run.folder, folder)
    return folder


def _export_json(qpp, folder: Path, path: Path, *extra: str) -> dict:
    result = qpp("export", folder, "--onnx", path, "--json", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    return json.loads(result.stdout)


def test_digits_run_exports_with_integer_kernels_and_parity(
    qpp, digits_folder: Path, tmp_path: Path
) -> None:
    path = tmp_path / "digits.onnx"
    result = _export_json(qpp, digits_folder, path, "--check")
    onnx.checker.check_model(str(path))
    integer = {"QGemm": 1, "QLinearConv": 5, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1}
    assert result["kernels"] == {"integer": integer, "float_compute": {}}
    assert result["export"]["float_quantizers"] == []
    parity = result["parity"]
    assert parity["passed"]
    assert parity["metric_difference"] <= 0.1
    assert parity["onnxruntime_metrics"]["top1"] == pytest.approx(
        parity["simulated_metrics"]["top1"], abs=0.1
    )
    assert result["isa"]["u8s8_saturates"] == (result["export"]["weight_format"] != "int8")


def test_user_onnx_classifier_exports_and_passes_parity(
    qpp, user_classifier, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    quantized = qpp("quantize", *user_classifier.args(), "--out", folder, "--json", "--quiet")
    assert quantized.exit_code == 0, quantized.output
    path = tmp_path / "classifier.int8.onnx"
    result = _export_json(qpp, folder, path, "--check")
    assert sum(result["kernels"]["integer"].values()) == 2  # both linear layers
    assert result["kernels"]["float_compute"] == {}
    assert result["parity"]["passed"], result["parity"]
    assert [o["max_steps"] <= 1.0 for o in result["parity"]["outputs"]] == [True]
    # The exported file takes the user's input name, so the same npz feeds it.
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    logits = session.run(None, {"images": user_classifier.images})[0]
    accuracy = float((logits.argmax(1) == user_classifier.labels).mean() * 100)
    assert accuracy == pytest.approx(result["parity"]["onnxruntime_metrics"]["top1"])
    # 4.8 k weights: the graph's names and per-channel scales weigh as much as the weights.
    assert path.stat().st_size <= 0.55 * user_classifier.model.stat().st_size


def test_bench_reports_every_model_against_fp32(qpp, user_classifier, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    assert qpp("quantize", *user_classifier.args(), "--out", folder, "--quiet").exit_code == 0
    result = qpp("bench", folder, "--json", "--seconds", "0.5")
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    labels = {
        "FP32",
        "qpp int8",
        "ORT quantize_static int8",
        "ORT quantize_static int8 reduce_range",
    }
    assert set(bench["latency_ms"]) == labels
    for label in labels:
        assert set(bench["latency_ms"][label]) == {"1", "32"}
        assert bench["latency_ms"][label]["32"]["median_ms"] > 0
    assert bench["ratios_vs_fp32"]["FP32"] == {"1": 1.0, "32": 1.0}
    assert bench["kernels"]["qpp int8"]["integer"]
    assert bench["size_bytes"]["qpp int8"] <= 0.55 * bench["size_bytes"]["FP32"]
    assert bench["size_bytes"]["qpp int8"] <= 1.1 * bench["size_bytes"]["ORT quantize_static int8"]
    assert set(bench["isa"]["flags"]) >= {"avx2", "avx512_vnni"}


# --- bad input ---------------------------------------------------------------------------------


def test_folder_without_encodings(qpp, user_error, digits_folder: Path, tmp_path: Path) -> None:
    (digits_folder / "encodings.json").unlink()
    user_error(
        qpp("export", digits_folder, "--onnx", tmp_path / "m.onnx"),
        "lacks encodings.json",
        "qpp quantize",
    )
    assert not (tmp_path / "m.onnx").exists()


def test_existing_file_without_force(qpp, user_error, digits_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    user_error(qpp("export", digits_folder, "--onnx", path), "already exists", "--force")
    assert path.read_bytes() == b"keep me"
    user_error(qpp("export", digits_folder, "--onnx", tmp_path), "is a folder")
    result = qpp("export", digits_folder, "--onnx", path, "--force", "--quiet")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(path))


def test_bit_width_onnx_cannot_hold(qpp, user_error, digits_folder: Path, tmp_path: Path) -> None:
    encodings_path = digits_folder / "encodings.json"
    encodings = json.loads(encodings_path.read_text())
    encodings["classifier.weight"]["spec"]["bits"] = 12
    encodings_path.write_text(json.dumps(encodings))
    user_error(
        qpp("export", digits_folder, "--onnx", tmp_path / "m.onnx"),
        "'classifier.weight' has 12-bit encodings",
        "at most 8 bits",
    )
    assert not (tmp_path / "m.onnx").exists()


UNSUPPORTED = """
import torch

class Bessel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.special.bessel_j0(self.fc(x))

def build():
    return Bessel()
"""


def test_op_the_exporter_cannot_express(qpp, user_error, tmp_path: Path) -> None:
    (tmp_path / "bessel.py").write_text(UNSUPPORTED)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((8, 4), dtype=np.float32))
    data = ["--calib", tmp_path / "x.npz", "--eval", tmp_path / "x.npz"]
    folder = tmp_path / "run"
    quantized = qpp("quantize", f"{tmp_path / 'bessel.py'}:build", *data, "--out", folder)
    assert quantized.exit_code == 0, quantized.output
    user_error(
        qpp("export", folder, "--onnx", tmp_path / "m.onnx"),
        "cannot express the op prims.bessel_j0",
    )
