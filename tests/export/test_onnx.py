"""The QDQ export: what the file holds, which kernels ORT runs, and parity with the simulation."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qpp
from qpp.errors import ConfigError, OutputExistsError
from qpp.export.isa import WeightFormat, detect_isa
from qpp.export.onnx import choose_weight_format, export_onnx, lower_quantizers, output_scales
from qpp.export.ort import (
    KernelReport,
    check_parity,
    make_session,
    optimized_op_counts,
    run_session,
)
from qpp.zoo.digits import DigitsCNN


@dataclass
class Exported:
    model: qpp.QuantizedModel
    fp32: torch.nn.Module
    batches: list[tuple[torch.Tensor, ...]]
    path: Path
    kernels: KernelReport


def _export(model: qpp.QuantizedModel, example, path: Path, fmt: WeightFormat | None = None):
    export_onnx(model, example, path, fmt, ["x"] if len(example) == 1 else None)
    return KernelReport.from_counts(optimized_op_counts(path, path.parent))


def _folded_constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers, and the Cast / Mul of constants ORT folds when it loads the file (the
    export stores narrowed biases and bias scales that way)."""
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if not all(name in values for name in node.input):
            continue
        if node.op_type == "Cast":
            dtype = onnx.helper.tensor_dtype_to_np_dtype(node.attribute[0].i)
            values[node.output[0]] = values[node.input[0]].astype(dtype)
        elif node.op_type == "Mul":
            values[node.output[0]] = values[node.input[0]] * values[node.input[1]]
    return values


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    entry = DigitsCNN(num_calibration=32)
    fp32 = entry.load_model()
    model = qpp.quantize(fp32, entry.calibration_set())
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    model.export_onnx(path, entry.calibration_set()[0], ["x"])
    kernels = KernelReport.from_counts(optimized_op_counts(path, path.parent))
    return Exported(model, fp32, entry.evaluation_set().batches, path, kernels)


def test_orts_optimizer_runs_every_conv_and_linear_in_integers(digits: Exported) -> None:
    assert digits.kernels.integer == {
        "QLinearConv": 5,
        "QGemm": 1,
        "QLinearAdd": 1,  # the residual add: its inputs and output are quantized
        "QLinearGlobalAveragePool": 1,
    }
    assert digits.kernels.float_compute == {}


def test_weights_are_stored_as_bytes_on_the_simulated_grid(digits: Exported) -> None:
    proto = onnx.load(str(digits.path))
    initializers = _folded_constants(proto)
    expected_dtype = np.uint8 if detect_isa().u8s8_saturates else np.int8
    dequantized = []
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        values = initializers[node.input[0]]
        if values.dtype == np.int32:  # a bias
            continue
        assert values.dtype == expected_dtype
        scale = initializers[node.input[1]]
        zero_point = initializers[node.input[2]] if len(node.input) > 2 else np.zeros(1)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * values.ndim
        shape[axis] = -1
        dequantized.append(
            (values.astype(np.float64) - zero_point.reshape(shape)) * scale.reshape(shape)
        )
    simulated = [q(w).detach().double().numpy() for q, w in digits.model.weight_quantizers()]
    assert len(dequantized) == len(simulated) == 6
    for weight in simulated:
        assert any(
            w.shape == weight.shape and np.allclose(w, weight, rtol=1e-6, atol=0)
            for w in dequantized
        )


def test_int32_biases_are_the_simulated_ones(digits: Exported) -> None:
    """The simulation puts each bias on the accumulator grid s_x s_w; the file stores exactly
    those integers, which ORT's QLinearConv / QGemm add to their int32 accumulators."""
    from qpp.graph.patterns import get_attr

    proto = onnx.load(str(digits.path))
    initializers = _folded_constants(proto)
    stored = [
        (initializers[node.input[0]], initializers[node.input[1]])
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in initializers
        and initializers[node.input[0]].dtype == np.int32
    ]
    biases = digits.model.bias_quantizers()
    assert len(stored) == len(biases) == 6
    for bias_quantizer in biases:
        simulated = bias_quantizer(get_attr(digits.model.graph_module, bias_quantizer.name))
        step = (bias_quantizer.activation.scale * bias_quantizer.weight.scale).numpy()
        matches = [
            (values, scale)
            for values, scale in stored
            if values.shape == simulated.shape and np.allclose(scale, step, rtol=1e-6)
        ]
        assert len(matches) == 1
        values, scale = matches[0]
        np.testing.assert_allclose(
            values * scale.astype(np.float64), simulated.detach().numpy(), rtol=1e-6
        )


def test_file_is_a_fraction_of_float(digits: Exported) -> None:
    float_bytes = 4 * sum(p.numel() for p in digits.fp32.parameters())
    # digits-cnn has 42 k weights, so per-channel scales, int32 biases and the graph weigh in;
    # the zoo's larger models land near a quarter of their FP32 ONNX (docs/benchmarks.md).
    assert digits.path.stat().st_size <= 0.35 * float_bytes


def test_ort_reproduces_the_simulation(digits: Exported) -> None:
    simulated = qpp.run(digits.model, digits.batches)
    reference = qpp.run(digits.fp32, digits.batches)
    deployed = run_session(make_session(digits.path), digits.batches)
    lowered = qpp.run(
        lower_quantizers(digits.model, choose_weight_format(digits.model, detect_isa())),
        digits.batches,
    )
    report = check_parity(
        [simulated],
        deployed,
        output_scales(digits.model),
        lambda outputs: {"cosine": float(torch.cosine_similarity(outputs, reference).mean())},
        "cosine",
    )
    assert report.outputs[0].max_steps <= 1.0
    assert report.metric_difference <= 0.1
    assert report.passed
    # ORT computes what the lowered torch graph computes (same integer biases, same grids);
    # torch's quantize multiplies by 1/s where ORT divides, so a rare value lands one step off.
    difference = np.abs(deployed[0] - lowered.numpy())
    assert difference.max() <= report.outputs[0].step
    assert (difference <= 1e-5).mean() >= 0.95
    assert (deployed[0].argmax(1) == simulated.argmax(1).numpy()).all()


def test_signed_int8_weights_saturate_ort_on_cpus_without_vnni(
    digits: Exported, tmp_path: Path
) -> None:
    """Why the export shifts 8-bit weights to uint8 here: int8 weights drift from the sim."""
    path = tmp_path / "int8.onnx"
    _export(digits.model, digits.batches[0], path, WeightFormat.INT8)
    lowered = qpp.run(lower_quantizers(digits.model, WeightFormat.INT8), digits.batches)
    deployed = run_session(make_session(path), digits.batches)[0]
    absolute = np.abs(deployed - lowered.numpy())
    difference = absolute.max() / np.abs(lowered.numpy()).max()
    if detect_isa().u8s8_saturates:
        assert difference > 1e-3
    else:
        # VNNI/AMX sum in int32: int8 weights are exact up to the rare one-step rounding tie of
        # an intermediate activation (torch multiplies by 1/s where ORT divides), as for uint8.
        assert (absolute <= 1e-5).mean() >= 0.95
        assert difference <= 5e-3


def test_seven_bit_weights_export_as_int8_and_stay_exact(digits: Exported, tmp_path: Path) -> None:
    entry = DigitsCNN(num_calibration=32)
    model = qpp.quantize(digits.fp32, entry.calibration_set(), qpp.QuantConfig(weight_bits=7))
    assert choose_weight_format(model, detect_isa()) is WeightFormat.INT8
    path = tmp_path / "w7.onnx"
    kernels = _export(model, digits.batches[0], path)
    assert kernels.integer == digits.kernels.integer
    lowered = qpp.run(lower_quantizers(model, WeightFormat.INT8), digits.batches).numpy()
    deployed = run_session(make_session(path), digits.batches)[0]
    difference = np.abs(deployed - lowered)
    assert difference.max() <= (lowered.max() - lowered.min()) / 255
    assert (difference <= 1e-5).mean() >= 0.95


def test_four_bit_weights_live_in_an_int8_container(digits: Exported, tmp_path: Path) -> None:
    """ORT's integer kernels take 8-bit operands only, so 4-bit weights are stored as int8 on
    their own 16-value grid: the same integer kernels run, and ORT computes what the sim does."""
    entry = DigitsCNN(num_calibration=32)
    model = qpp.quantize(digits.fp32, entry.calibration_set(), qpp.QuantConfig(weight_bits=4))
    path = tmp_path / "w4.onnx"
    kernels = _export(model, digits.batches[0], path)
    assert kernels.integer == digits.kernels.integer
    proto = onnx.load(str(path))
    initializers = _folded_constants(proto)
    weights = [
        initializers[node.input[0]]
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in initializers
        and initializers[node.input[0]].dtype != np.int32
    ]
    assert len(weights) == 6
    for values in weights:
        assert values.dtype == np.int8 and values.min() >= -8 and values.max() <= 7
    simulated = qpp.run(model, digits.batches)
    deployed = run_session(make_session(path), digits.batches)
    report = check_parity(
        [simulated],
        deployed,
        output_scales(model),
        lambda outputs: {"top1": float((outputs.argmax(1) == simulated.argmax(1)).float().mean())},
        "top1",
    )
    assert report.outputs[0].max_steps <= 1.0 and report.metric_difference <= 0.1


def test_refuses_existing_files_and_wide_encodings(digits: Exported, tmp_path: Path) -> None:
    with pytest.raises(OutputExistsError, match="--force"):
        export_onnx(digits.model, digits.batches[0], digits.path)
    wide = copy.deepcopy(digits.model)
    quantizer = wide.quantizer("classifier.weight")
    quantizer.set_spec(quantizer.spec.with_changes(bits=12))
    quantizer.compute_weight_encoding(wide.weight("classifier.weight"))
    with pytest.raises(ConfigError, match=r"12-bit.*classifier\.weight"):
        export_onnx(wide, digits.batches[0], tmp_path / "wide.onnx")


def test_refuses_what_onnx_qdq_cannot_express(digits: Exported, tmp_path: Path) -> None:
    """Per-input QPs (QPP) and piecewise activations would export silently wrong as QDQ."""
    from qpp.sim.config import QuantConfig
    from qpp.zoo.digits import DigitsCNN

    calibration = DigitsCNN(num_calibration=16).calibration_set()
    for settings, message in (
        ({"activation_scheme": "dense-sparse"}, "float side tensor"),
        ({"activation_quantizer": "pwlq"}, "piecewise linear"),
    ):
        model = qpp.quantize(digits.fp32, calibration, QuantConfig(**settings))
        with pytest.raises(ConfigError, match=message):
            export_onnx(model, digits.batches[0], tmp_path / "refused.onnx")
        assert not (tmp_path / "refused.onnx").exists()


# --- a transformer block -----------------------------------------------------------------------


class TinyEncoder(torch.nn.Module):
    """Two pre-norm attention + MLP layers on N x 16 x 32 token features."""

    def __init__(self, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "norm1": torch.nn.LayerNorm(width),
                    "qkv": torch.nn.Linear(width, 3 * width),
                    "proj": torch.nn.Linear(width, width),
                    "norm2": torch.nn.LayerNorm(width),
                    "up": torch.nn.Linear(width, 2 * width),
                    "down": torch.nn.Linear(2 * width, width),
                }
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).chunk(3, dim=-1)
            attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            x = x + block["proj"](attention @ v)
            x = x + block["down"](torch.nn.functional.gelu(block["up"](block["norm2"](x))))
        return x


def test_attention_block_runs_on_integer_matmuls(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    fp32 = TinyEncoder().eval()
    calibration = [(torch.randn(8, 16, 32, generator=generator),) for _ in range(4)]
    evaluation = [(torch.randn(8, 16, 32, generator=generator),) for _ in range(2)]
    model = qpp.quantize(fp32, calibration)
    path = tmp_path / "encoder.onnx"
    kernels = _export(model, calibration[0], path)
    # 4 linears per layer, and QK^T and attention @ V with both operands quantized.
    assert sum(kernels.integer.values()) == 12
    assert "MatMulIntegerToFloat" in kernels.integer or "QLinearMatMul" in kernels.integer
    assert kernels.float_compute == {}
    reference = qpp.run(fp32, evaluation)
    simulated = qpp.run(model, evaluation)
    deployed = run_session(make_session(path), evaluation)
    report = check_parity(
        [simulated],
        deployed,
        output_scales(model),
        lambda out: {"cosine": float(torch.cosine_similarity(out, reference, dim=-1).mean())},
        "cosine",
    )
    assert report.passed, report.as_dict()
    assert report.outputs[0].max_steps <= 1.0
