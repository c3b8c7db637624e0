"""``qpp quantize --weight-quantizer pwlq``: the flags, the storage cost, exact reproduction."""

from __future__ import annotations

import json
from pathlib import Path


def reproduce_and_export(qpp, folder: Path, onnx: Path) -> dict:
    """``qpp eval`` reproduces the saved run and ``qpp export --check`` passes with the same
    metric in ORT; returns the export report."""
    evaluated = qpp("eval", folder, "--json", "--quiet")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["reproduced"] is True
    exported = qpp("export", folder, "--onnx", onnx, "--check", "--json", "--quiet")
    assert exported.exit_code == 0, exported.output
    export = json.loads(exported.stdout)
    assert export["parity"]["passed"] and export["parity"]["metric_difference"] == 0
    return export


def test_pwlq_run_reports_storage_and_reproduces(qpp, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    result = qpp(
        "quantize", "digits-cnn", "--weights", "4", "--weight-quantizer", "pwlq",
        "--breakpoint-search", "bisection", "--bias-correction", "--json", "--quiet",
        "--out", folder,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["weight_bits_per_element"] == 5  # 4 bits and the region bit
    assert report["config"]["weight_quantizer"] == "pwlq"
    assert report["config"]["piecewise"]["bias_correction"] is True
    assert report["metrics"]["quantized"]["top1"] >= report["metrics"]["fp32"]["top1"] - 2
    fp32_bytes, quantized_bytes = report["size_bytes"]["fp32"], report["size_bytes"]["quantized"]
    # 5 of 32 bits per weight, plus float biases and per-channel scales and offsets.
    assert fp32_bytes * 5 / 32 < quantized_bytes < fp32_bytes * 8 / 32
    encodings = json.loads((folder / "encodings.json").read_text())
    weights = [e for e in encodings.values() if e["kind"] == "weight"]
    assert weights and all(
        len(e["piecewise"]["correction_gain"]) == len(e["scale"]) for e in weights
    )
    # The export writes PWLQ weights as integer branches that ORT sums; --check compares.
    export = reproduce_and_export(qpp, folder, tmp_path / "pwlq.onnx")
    layers = {"ConvInteger": 15, "QGemm": 3}  # 3 branches each
    assert export["kernels"]["integer"] == {
        **layers,
        "QLinearAdd": 1,
        "QLinearGlobalAveragePool": 1,
    }
    assert export["kernels"]["float_compute"] == {}
    assert set(export["export"]["piecewise_branches"].values()) == {3}
    odd = qpp("export", folder, "--onnx", tmp_path / "odd.onnx", "--pwlq-export", "float")
    assert odd.exit_code != 0 and "branches, dequantized" in odd.output


def test_pwlq_flags_without_pwlq_are_user_errors(qpp, user_error) -> None:
    user_error(qpp("quantize", "digits-cnn", "--breakpoints", "2"), "--breakpoints", "pwlq")
    user_error(
        qpp("quantize", "digits-cnn", "--bias-correction", "--activation-quantizer", "pwlq"),
        "--bias-correction",
        "--weight-quantizer pwlq",
    )
    user_error(
        qpp("quantize", "digits-cnn", "--weight-quantizer", "pwlq", "--pwlq-form", "zigzag"),
        "zigzag",
        "non-overlapping",
    )
    user_error(qpp("quantize", "digits-cnn", "--weight-quantizer", "pwl"), "pwl", "uniform")
    user_error(qpp("quantize", "digits-cnn", "--split-above", "0.01"), "--split-above", "pwlq")
    user_error(
        qpp("quantize", "digits-cnn", "--weight-quantizer", "pwlq", "--split-above", "2"),
        "split_above",
        "0.015",
    )


def test_split_layers_pay_their_region_bits_and_export_with_parity(qpp, tmp_path: Path) -> None:
    """``--split-above``: the default search is auto; layers split to more breakpoints store
    more region bits, and their extra branches still sum to the simulation in ORT."""
    folder = tmp_path / "split"
    result = qpp(
        "quantize", "digits-cnn", "--weights", "3", "--weight-quantizer", "pwlq",
        "--split-above", "0.002", "--json", "--quiet", "--out", folder,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["piecewise"]["search"] == "auto"
    encodings = json.loads((folder / "encodings.json").read_text())
    counts = [
        len(e["piecewise"]["breakpoints"][0]) for e in encodings.values() if e["kind"] == "weight"
    ]
    assert max(counts) >= 2
    assert 4 < report["weight_bits_per_element"] <= 5
    exported = qpp(
        "export", folder, "--onnx", tmp_path / "split.onnx", "--check", "--json", "--quiet"
    )
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["parity"]["passed"]


def test_empirical_bias_correction_flag_corrects_biases_and_reproduces(
    qpp, user_error, tmp_path: Path
) -> None:
    """``--empirical-bias-correction`` (white paper eq. 19 on the calibration data, here on top
    of PWLQ's +BC) reports each corrected layer, and the saved run, corrected biases included,
    reproduces and exports with parity."""
    folder = tmp_path / "run"
    result = qpp(
        "quantize", "digits-cnn", "--weights", "3", "--weight-quantizer", "pwlq",
        "--bias-correction", "--empirical-bias-correction", "--json", "--quiet", "--out", folder,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["empirical_bias_correction"] is True
    corrected = report["empirical_bias_correction"]["corrected"]
    assert len(corrected) == 6 and all(shift > 0 for shift in corrected.values()), corrected
    # The corrected biases go into the ONNX graph's int32 biases: ORT matches the simulation.
    reproduce_and_export(qpp, folder, tmp_path / "corrected.onnx")
    user_error(
        qpp("quantize", "digits-cnn", "--empirical-bias-correction", "--recipe", "wp-ptq"),
        "empirical_bias_correction",
        "recipe",
    )


def test_output_objective_flag_saves_and_reproduces(qpp, user_error, tmp_path: Path) -> None:
    """``--breakpoint-objective output``: breakpoints on each layer's output error (calibration
    data), and +BC's per-channel shift fitted to it (gain 1); the setting is saved, and the run
    reproduces and exports with parity."""
    folder = tmp_path / "run"
    result = qpp(
        "quantize", "digits-cnn", "--weights", "3", "--weight-quantizer", "pwlq",
        "--breakpoint-objective", "output", "--bias-correction", "--json", "--quiet",
        "--out", folder,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["piecewise"]["objective"] == "output"
    encodings = json.loads((folder / "encodings.json").read_text())
    corrections = [e["piecewise"] for e in encodings.values() if e["kind"] == "weight"]
    assert all(set(c["correction_gain"]) == {1.0} for c in corrections)
    assert any(any(shift != 0 for shift in c["correction_shift"]) for c in corrections)
    assert report["metrics"]["quantized"]["top1"] >= report["metrics"]["fp32"]["top1"] - 3
    reproduce_and_export(qpp, folder, tmp_path / "output.onnx")
    user_error(
        qpp("quantize", "digits-cnn", "--breakpoint-objective", "output"),
        "--breakpoint-objective",
        "--weight-quantizer pwlq",
    )
    unknown = qpp(
        "quantize", "digits-cnn", "--weight-quantizer", "pwlq", "--breakpoint-objective", "loss"
    )
    user_error(unknown, "loss", "weight, output")
