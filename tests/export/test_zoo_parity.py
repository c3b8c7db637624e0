"""ORT reproduces the simulation of a real zoo model within one step (slow: PP-OCR)."""

from __future__ import annotations

from pathlib import Path

import pytest

import qpp
from qpp.export.job import export_run, fp32_onnx
from qpp.zoo.ppocr import PPOCRClassification


@pytest.mark.slow
def test_ppocr_cls_export_matches_the_simulation_within_one_step(tmp_path: Path) -> None:
    """Biases on the int32 grid and Paddle's separate bias Adds folded: without either, ORT's
    softmax output differed from the simulation by up to 46 steps (docs/benchmarks.md)."""
    entry = PPOCRClassification(num_eval=8, num_calib=8)
    fp32 = entry.load_model()
    model = qpp.quantize(fp32, entry.calibration_set())
    _, kernels, parity = export_run(model, entry, tmp_path / "cls.onnx", False, True, fp32)
    assert parity is not None
    assert kernels.integer == {"QLinearConv": 53, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1}
    assert parity.passed, parity.as_dict()
    assert [output.max_steps <= 1.0 for output in parity.outputs] == [True]
    assert parity.metric_difference <= 0.1
    assert parity.teacher is not None and parity.teacher.max_steps <= 1


@pytest.mark.slow
def test_ppocr_cls_eltwise_export_is_integer_and_small(tmp_path: Path) -> None:
    """W7A8 with runtime-int8-eltwise: the SE gates run as QLinearMul, every quantized tensor
    is within one step teacher-forced, and the file is at most 0.3x the FP32 ONNX."""
    entry = PPOCRClassification(num_eval=8, num_calib=8)
    fp32 = entry.load_model()
    config = qpp.QuantConfig(weight_bits=7, policy="runtime-int8-eltwise")
    model = qpp.quantize(fp32, entry.calibration_set(), config)
    path = tmp_path / "cls.onnx"
    report, kernels, parity = export_run(model, entry, path, False, True, fp32)
    assert parity is not None and parity.teacher is not None
    assert kernels.integer["QLinearMul"] == 9 and kernels.integer["QLinearConv"] == 53
    assert parity.teacher.max_steps <= 1, parity.teacher.as_dict()
    assert parity.metric_difference <= 0.1
    example = entry.calibration_set()[0]
    fp32_onnx(entry, fp32, example, tmp_path / "fp32.onnx")
    assert report.bytes <= 0.3 * (tmp_path / "fp32.onnx").stat().st_size
