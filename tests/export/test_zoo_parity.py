"""ORT reproduces the simulation of every zoo model within one step (slow: real models)."""

from __future__ import annotations

from pathlib import Path

import pytest

import qpp
from qpp.export.job import export_run, fp32_onnx
from qpp.zoo.base import ZooEntry
from qpp.zoo.minilm import MiniLM
from qpp.zoo.ppocr import PPOCRClassification, PPOCRDetection, PPOCRRecognition


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


def _small_entry(name: str) -> ZooEntry:
    if name == "minilm":
        return MiniLM(num_calibration=8, num_evaluation=8, batch_size=8)
    if name == "ppocr-rec":
        return PPOCRRecognition(num_eval=8, num_calib=8)
    return PPOCRDetection(num_eval=2, num_calib=4)


#: The integer kernels ORT's optimizer makes of each model's W7A8 ``runtime`` export.
ZOO_KERNELS = {
    "minilm": {"MatMulIntegerToFloat": 42, "QLinearMatMul": 6},
    "ppocr-rec": {"MatMulIntegerToFloat": 11, "QLinearConv": 38, "QLinearMatMul": 2},
    "ppocr-det": {"QLinearConv": 62, "QLinearGlobalAveragePool": 9},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO_KERNELS))
def test_zoo_model_exports_to_integer_kernels_within_one_step(name: str, tmp_path: Path) -> None:
    """The rest of the zoo (digits-cnn: tests/export/test_onnx.py): every conv and linear runs
    as an integer kernel in ORT's optimized graph, every quantized tensor is within one step of
    the simulation teacher-forced, and the task metric of ORT equals the simulation's."""
    entry = _small_entry(name)
    fp32 = entry.load_model()
    model = qpp.quantize(fp32, entry.calibration_set(), qpp.QuantConfig(weight_bits=7))
    _, kernels, parity = export_run(model, entry, tmp_path / f"{name}.onnx", False, True, fp32)
    assert kernels.integer == ZOO_KERNELS[name]
    assert parity is not None and parity.teacher is not None
    assert parity.teacher.max_steps <= 1, parity.teacher.as_dict()
    assert parity.metric_difference <= 0.1, parity.as_dict()
