"""Teacher-forced parity: every quantized tensor of the ORT graph, fed the simulation's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qpp
import qpp.export.teacher as teacher
from qpp.export.ort import make_session, optimized_op_counts, run_session
from qpp.sim.quantizer import QuantizerKind
from qpp.zoo.digits import DigitsCNN


class GatedNet(torch.nn.Module):
    """conv -> (x * 0.5 + gate) -> conv, a scaled, gated residual as in PP-OCR."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.excite = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.excite(y.mean((2, 3), keepdim=True)))
        return self.head(y * 0.5 + y * gate)


@pytest.fixture(scope="module")
def gated() -> tuple[qpp.QuantizedModel, list[tuple[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 10, 10, generator=generator),) for _ in range(3)]
    config = qpp.QuantConfig(weight_bits=7, policy="runtime-int8-eltwise")
    return qpp.quantize(GatedNet().eval(), data, config), data


def test_every_quantized_tensor_is_within_one_step(gated, tmp_path: Path) -> None:
    model, data = gated
    report = teacher.teacher_forced_parity(model, data, ["x"])
    activations = [
        name
        for name in model.names
        if model.quantizer(name).kind is QuantizerKind.ACTIVATION
        and model.quantizer(name).calibrated
    ]
    assert len(report.tensors) == len(activations) and report.batches == len(data)
    assert report.passed and report.max_steps <= 1
    # the graph it checks runs the same integer kernels as the exported one
    path = tmp_path / "gated.onnx"
    model.export_onnx(path, data[0], ["x"])
    counts = optimized_op_counts(path, tmp_path)
    for op in ("QLinearConv", "QLinearMul", "QLinearAdd"):
        assert counts.get(op, 0) > 0, counts
        assert report.kernels.integer.get(op) == counts[op]


def test_a_wrong_tensor_fails_the_check(gated, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = gated
    original = teacher.simulated_integers

    def shifted(*args: object) -> list[np.ndarray]:
        values = original(*args)  # type: ignore[arg-type]
        values[0] = np.clip(values[0].astype(np.int64) + 3, 0, 255).astype(values[0].dtype)
        return values

    monkeypatch.setattr(teacher, "simulated_integers", shifted)
    report = teacher.teacher_forced_parity(model, data, ["x"])
    assert not report.passed and report.max_steps >= 2


def test_scalar_operands_are_exact_on_a_one_value_grid(gated, tmp_path: Path) -> None:
    """x * 0.5 runs as QLinearMul: the 0.5 is DequantizeLinear(1, scale 0.5, zero point 0)."""
    model, data = gated
    path = tmp_path / "gated.onnx"
    model.export_onnx(path, data[0], ["x"])
    proto = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scalars = [
        float((values[n.input[0]].astype(np.int64) - values[n.input[2]]) * values[n.input[1]])
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in values
        and values[n.input[0]].size == 1
        and values[n.input[1]].size == 1
    ]
    assert scalars == [0.5]
    deployed = run_session(make_session(path), data)[0]
    simulated = qpp.run(model, data).numpy()
    assert np.abs(deployed - simulated).max() <= (simulated.max() - simulated.min()) / 255


def test_digits_cnn_teacher_forced() -> None:
    entry = DigitsCNN(num_calibration=32)
    model = qpp.quantize(entry.load_model(), entry.calibration_set())
    report = teacher.teacher_forced_parity(model, entry.evaluation_set().batches[:2], ["x"])
    assert report.passed and len(report.tensors) == 8
