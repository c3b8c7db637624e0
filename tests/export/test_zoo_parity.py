"""ORT reproduces the simulation of a real zoo model within one output step (slow: PP-OCR)."""

from __future__ import annotations

from pathlib import Path

import pytest

import qpp
from qpp.export.job import export_run
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
    assert kernels.integer == {"QLinearConv": 53}
    assert parity.passed, parity.as_dict()
    assert [output.max_steps <= 1.0 for output in parity.outputs] == [True]
    assert parity.metric_difference <= 0.1
