"""Rewrites of the exported graph: faster ops and a smaller file, same function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import qpp
from qpp.export.ort import KernelReport, make_session, optimized_op_counts, run_session


class SqueezeExcite(torch.nn.Module):
    """conv -> ReLU -> spatial mean -> conv -> sigmoid gate, as in MobileNetV3 / PP-OCR."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.excite = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return y * torch.sigmoid(self.excite(y.mean((2, 3), keepdim=True)))


def test_spatial_means_run_as_integer_global_average_pools(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    fp32 = SqueezeExcite().eval()
    data = [(torch.randn(4, 3, 12, 12, generator=generator),) for _ in range(3)]
    model = qpp.quantize(fp32, data)
    path = tmp_path / "se.onnx"
    model.export_onnx(path, data[0], ["x"])
    proto = onnx.load(str(path))
    ops = [node.op_type for node in proto.graph.node]
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") == 1
    counts = optimized_op_counts(path, tmp_path)
    assert counts.get("QLinearGlobalAveragePool") == 1
    assert KernelReport.from_counts(counts).integer == {
        "QLinearConv": 2,
        "QLinearGlobalAveragePool": 1,
    }
    deployed = run_session(make_session(path), data)[0]
    simulated = qpp.run(model, data).numpy()
    assert np.abs(deployed - simulated).max() <= (simulated.max() - simulated.min()) / 255


def test_all_zero_conv_zero_points_are_left_out_and_names_are_short(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    fp32 = SqueezeExcite().eval()
    data = [(torch.randn(4, 3, 12, 12, generator=generator),) for _ in range(2)]
    model = qpp.quantize(fp32, data, qpp.QuantConfig(weight_bits=7))  # int8 weights
    path = tmp_path / "se7.onnx"
    model.export_onnx(path, data[0], ["x"])
    proto = onnx.load(str(path))
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    casts = {node.output[0] for node in proto.graph.node if node.op_type == "Cast"}
    weights_and_biases = [
        node
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear"
        and (node.input[0] in initializers or node.input[0] in casts)
    ]
    # two int8 weights, two biases (narrowed, cast back to int32)
    assert len(weights_and_biases) == 4
    assert all(len(node.input) == 2 for node in weights_and_biases)
    assert all(not node.name for node in proto.graph.node)
    graph_outputs = {value.name for value in proto.graph.output}
    values = [name for node in proto.graph.node for name in node.output]
    assert max(len(name) for name in values if name not in graph_outputs) <= 4


class DecomposedHardSwish(torch.nn.Module):
    """conv -> x * clip(x + 3, 0, 6) / 6 -> conv, hardswish as Paddle's ONNX files write it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y * torch.clamp(y + 3, 0, 6) / 6)


def test_decomposed_hardswish_exports_as_one_op_with_the_same_outputs(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    fp32 = DecomposedHardSwish().eval()
    data = [(3 * torch.randn(4, 3, 10, 10, generator=generator),) for _ in range(3)]
    model = qpp.quantize(fp32, data)
    path = tmp_path / "hardswish.onnx"
    model.export_onnx(path, data[0], ["x"])
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("HardSwish") == 1
    assert not {"Clip", "Div"} & set(ops)
    deployed = run_session(make_session(path), data)[0]
    simulated = qpp.run(model, data).numpy()
    assert np.abs(deployed - simulated).max() <= (simulated.max() - simulated.min()) / 255


def test_hardswish_rewrite_reads_constants_of_any_rank() -> None:
    """Paddle's files hold the 3 and 6 as one-element vectors, torch's as scalars."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qpp.export.compact import hard_swishes

    constants = [
        numpy_helper.from_array(np.array([3.0], np.float32), "three"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),  # Clip takes scalars only
        numpy_helper.from_array(np.array([[6.0]], np.float32), "six_again"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "three"], ["shifted"]),
        helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"]),
        helper.make_node("Mul", ["x", "clipped"], ["product"]),
        helper.make_node("Div", ["product", "six_again"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "hardswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        constants,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = np.linspace(-5, 5, 10, dtype=np.float32).reshape(2, 5)
    before = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert hard_swishes(proto) == 1
    assert [node.op_type for node in proto.graph.node] == ["HardSwish"]
    after = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7)


class TokenNet(torch.nn.Module):
    """An embedding table (per-row scales) into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(50, 8)
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embedding(tokens))


def test_embedding_rows_are_gathered_before_they_are_dequantized(tmp_path: Path) -> None:
    """Dequantizing MiniLM's whole 30,522-row table on every run cost 23 ms; the rewrite
    gathers the int8 rows and their scales, then computes the same (q - z) * s."""
    generator = torch.Generator().manual_seed(2)
    fp32 = TokenNet().eval()
    data = [(torch.randint(0, 50, (3, 7), generator=generator),) for _ in range(2)]
    model = qpp.quantize(fp32, data)
    path = tmp_path / "tokens.onnx"
    model.export_onnx(path, data[0], ["tokens"])
    proto = onnx.load(str(path))
    producers = {name: node for node in proto.graph.node for name in node.output}
    initializers = {t.name for t in proto.graph.initializer}
    gathers = [node for node in proto.graph.node if node.op_type == "Gather"]
    table = next(g for g in gathers if g.input[1] == "tokens" and g.input[0] in initializers)
    assert producers.get(table.input[0]) is None  # the integer table itself, no dequantize
    deployed = run_session(make_session(path), data)[0]
    simulated = qpp.run(model, data).numpy()
    assert np.abs(deployed - simulated).max() <= 1e-5 * np.abs(simulated).max()
