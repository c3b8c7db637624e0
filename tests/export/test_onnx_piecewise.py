"""ONNX export of PWLQ weights: integer branches (ORT runs each in integers) or dequantized."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qpp
from qpp.errors import ConfigError
from qpp.export.onnx import export_onnx, output_scales
from qpp.export.ort import KernelReport, check_parity, optimized_op_counts, run_session
from qpp.export.piecewise import EXACT_BRANCH_LIMIT, weight_branches
from qpp.quant.spec import PiecewiseSpec
from qpp.sim.config import QuantConfig
from qpp.sim.piecewise import PiecewiseQuantizer
from qpp.zoo.digits import DigitsCNN


class SmallNet(torch.nn.Module):
    """Conv, max pool, depthwise conv, linear on a 3-D input (MatMul) and on a 2-D one (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.tokens = torch.nn.Linear(16, 24)
        self.head = torch.nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        x = torch.relu(self.depthwise(x)).flatten(2).transpose(1, 2)
        return self.head(torch.relu(self.tokens(x)).mean(dim=1))


def _session(path: Path, disabled: list[str] | None = None) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or []
    )


def _pwlq(bias_correction: bool = False, bits: int = 4) -> QuantConfig:
    spec = PiecewiseSpec(bias_correction=bias_correction)
    return QuantConfig(weight_bits=bits, weight_quantizer="pwlq", piecewise=spec)


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, list[tuple[torch.Tensor]], list[tuple[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    fp32 = SmallNet().eval()
    calibration = [(torch.randn(8, 3, 12, 12, generator=generator),) for _ in range(4)]
    evaluation = [(torch.randn(16, 3, 12, 12, generator=generator),) for _ in range(2)]
    return fp32, calibration, evaluation


@pytest.mark.parametrize(
    ("bias_correction", "granularity"),
    [(False, "per-channel"), (True, "per-channel"), (False, "per-tensor")],
)
def test_branches_sum_to_the_simulated_weight(
    small, bias_correction: bool, granularity: str
) -> None:
    fp32, calibration, _ = small
    config = dataclasses.replace(_pwlq(bias_correction), weight_granularity=granularity)
    model = qpp.quantize(fp32, calibration, config)
    for quantizer, weight in model.weight_quantizers():
        assert isinstance(quantizer, PiecewiseQuantizer)
        branches = weight_branches(quantizer, weight)
        # Centre and tail (the offset p is 7.5 centre steps: it joins the centre at half its
        # step); bias correction adds its constant shift as a third branch.
        assert len(branches) == (3 if bias_correction else 2)
        shape = [-1] + [1] * (weight.ndim - 1)
        total = sum(b.values.double() * b.scale.double().reshape(shape) for b in branches)
        expected = quantizer(weight).detach().double()
        assert torch.allclose(total, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
        assert all(int(b.values.abs().max()) <= EXACT_BRANCH_LIMIT for b in branches)


def test_ort_runs_every_branch_in_integers_and_matches_the_simulation(small, tmp_path) -> None:
    fp32, calibration, evaluation = small
    model = qpp.quantize(fp32, calibration, _pwlq())
    path = tmp_path / "small.onnx"
    report = export_onnx(model, calibration[0], path)
    assert report.piecewise_branches == {name: 2 for name in report.piecewise_branches}
    assert len(report.piecewise_branches) == 4
    kernels = KernelReport.from_counts(optimized_op_counts(path, tmp_path))
    # Two branches per layer: ConvInteger for convs, QGemm / MatMulIntegerToFloat for linears.
    assert kernels.integer.get("ConvInteger") == 4
    assert sum(kernels.integer.values()) == 8
    assert kernels.float_compute == {}
    simulated = qpp.run(model, evaluation)
    deployed = run_session(_session(path), evaluation)[0]
    step = float((simulated.max() - simulated.min()) / 255)
    difference = np.abs(deployed - simulated.numpy())
    # The integer products are exact; what differs is float32 rounding of the branch sum,
    # which now and then moves an intermediate activation across a rounding boundary.
    assert difference.max() <= step
    assert (difference <= 1e-3 * step).mean() >= 0.5
    assert (deployed.argmax(1) == simulated.argmax(1).numpy()).all()


def test_digits_parity_and_size_of_both_forms(tmp_path: Path) -> None:
    entry = DigitsCNN(num_calibration=32)
    fp32 = entry.load_model()
    model = qpp.quantize(fp32, entry.calibration_set(), _pwlq())
    evaluation = entry.evaluation_set()
    reference = qpp.run(fp32, evaluation.batches)
    simulated = qpp.run(model, evaluation.batches)
    example = entry.calibration_set()[0]
    paths = {form: tmp_path / f"{form}.onnx" for form in ("branches", "dequantized")}
    reports = {f: export_onnx(model, example, p, piecewise=f) for f, p in paths.items()}

    def parity(session: object) -> object:
        return check_parity(
            [simulated],
            run_session(session, evaluation.batches),
            output_scales(model),
            lambda outputs: entry.metrics(outputs, reference, evaluation),
            entry.primary_metric,
        )

    branches = parity(_session(paths["branches"]))
    assert branches.metric_difference == 0 and branches.outputs[0].max_steps < 0.5
    # Dequantized: ORT's WeightBiasQuantization re-quantizes the float weights of a conv
    # between QDQ activations to its own int8 grid, so the file is exact only without it.
    exact = parity(_session(paths["dequantized"], ["WeightBiasQuantization"]))
    assert exact.metric_difference == 0 and exact.outputs[0].max_steps < 0.5
    requantized = parity(_session(paths["dequantized"]))
    assert requantized.outputs[0].max_steps > 10 * exact.outputs[0].max_steps
    # Two int8 branches per weight against one float32.
    weights = sum(w.numel() for _, w in model.weight_quantizers())
    stored = {}
    for form, path in paths.items():
        proto = onnx.load(str(path))
        arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer]
        stored[form] = sum(a.nbytes for a in arrays if a.size >= 64)
    assert reports["branches"].bytes < reports["dequantized"].bytes
    assert stored["branches"] < 2.2 * weights < 4 * weights <= stored["dequantized"]


def test_refuses_piecewise_activations_and_unknown_forms(small, tmp_path: Path) -> None:
    fp32, calibration, _ = small
    config = QuantConfig(activation_bits=8, activation_quantizer="pwlq")
    model = qpp.quantize(fp32, calibration, config)
    with pytest.raises(ConfigError, match="--activation-quantizer uniform"):
        export_onnx(model, calibration[0], tmp_path / "refused.onnx")
    weights = qpp.quantize(fp32, calibration, _pwlq())
    with pytest.raises(ConfigError, match="branches, dequantized"):
        export_onnx(weights, calibration[0], tmp_path / "odd.onnx", piecewise="float")
    assert not list(tmp_path.glob("*.onnx"))


def test_wide_grids_export_dequantized(small, tmp_path: Path) -> None:
    """At 8 bits the centre's integers reach 128 > EXACT_BRANCH_LIMIT: float weights."""
    fp32, calibration, _ = small
    model = qpp.quantize(fp32, calibration, _pwlq(bits=8))
    report = export_onnx(model, calibration[0], tmp_path / "w8.onnx")
    assert set(report.piecewise_branches.values()) == {0}
