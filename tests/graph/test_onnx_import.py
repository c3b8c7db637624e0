"""ONNX → torch loading: parity with onnxruntime, export with a dynamic batch, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qpp.errors import ModelLoadError, UnsupportedOpError
from qpp.graph.onnx_import import AnyRankBatchNorm, load_onnx
from qpp.zoo.ppocr import CLS_FILE, DET_FILE, REC_FILE, model_path

# ONNX file and the input shape (batch 2) the parity checks use
PPOCR_CASES = {
    "rec": (REC_FILE, (2, 3, 48, 320)),
    "cls": (CLS_FILE, (2, 3, 48, 192)),
    "det": (DET_FILE, (2, 3, 160, 224)),
}


def run_onnxruntime(path: Path | str, *inputs: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs, strict=True)))[0]


def assert_close_to_onnxruntime(module: torch.nn.Module, path: Path | str, x: torch.Tensor) -> None:
    expected = run_onnxruntime(path, x.numpy())
    with torch.no_grad():
        actual = module(x).numpy()
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


@pytest.fixture(scope="module")
def ppocr_modules() -> dict[str, torch.nn.Module]:
    return {
        key: load_onnx(model_path(file), input_shapes=[shape])
        for key, (file, shape) in PPOCR_CASES.items()
    }


@pytest.mark.parametrize("key", list(PPOCR_CASES))
def test_ppocr_matches_onnxruntime(ppocr_modules: dict[str, torch.nn.Module], key: str) -> None:
    file, shape = PPOCR_CASES[key]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert_close_to_onnxruntime(ppocr_modules[key], model_path(file), x)


def test_symbolic_dims_still_convert() -> None:
    """Without input_shapes the rec model keeps a dynamic width (and unknown-rank batch norms)."""
    module = load_onnx(model_path(REC_FILE))
    assert any(isinstance(m, AnyRankBatchNorm) for m in module.modules())
    x = torch.rand((1, 3, 48, 160), generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_close_to_onnxruntime(module, model_path(REC_FILE), x)


def test_cls_exports_with_dynamic_batch(ppocr_modules: dict[str, torch.nn.Module]) -> None:
    module = ppocr_modules["cls"]
    x = torch.rand(PPOCR_CASES["cls"][1]) * 2 - 1
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
    x5 = torch.rand((5, *x.shape[1:])) * 2 - 1
    assert_close_to_onnxruntime(exported.module(), model_path(CLS_FILE), x5)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def flatten_model() -> onnx.ModelProto:
    """x (N x 4 x 3) → Reshape(x, Concat(Shape(x)[0:1], [-1])) → Relu: a batch-size flatten."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["y"]),
    ]
    constants = [
        numpy_helper.from_array(np.array([value], dtype=np.int64), name)
        for name, value in (("zero", 0), ("one", 1), ("minus_one", -1))
    ]
    graph = helper.make_graph(
        nodes,
        "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
        constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_shape_computation_folds_to_plain_reshape(tmp_path: Path) -> None:
    path = save(flatten_model(), tmp_path / "flatten.onnx")
    module = load_onnx(path)
    targets = {str(node.target) for node in module.graph.nodes if node.op == "call_module"}
    assert not any("Shape" in target or "Concat" in target for target in targets)
    x = torch.randn(2, 4, 3)
    exported = torch.export.export(
        module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},), strict=False
    )
    assert_close_to_onnxruntime(exported.module(), path, torch.randn(7, 4, 3))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_onnx(tmp_path / "nowhere.onnx")


def test_text_file_renamed_onnx(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("these are not the weights you are looking for\n")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_onnx(path)


def test_truncated_onnx(tmp_path: Path) -> None:
    data = model_path(CLS_FILE).read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_onnx(path)


def test_op_without_converter_is_named(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Hardmax", ["x"], ["y"], name="pick_max")],
        "hardmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedOpError, match=r"Hardmax.*pick_max.*replace Hardmax"):
        load_onnx(save(model, tmp_path / "hardmax.onnx"))


def test_op_at_unconverted_opset_suggests_one(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Split", ["x"], ["a", "b"], name="halves", axis=1, num_outputs=2)],
        "split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedOpError, match=r"Split at opset 18 .*re-export with opset 13"):
        load_onnx(save(model, tmp_path / "split.onnx"))


def test_converter_failure_names_node(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="keep_zeros", allowzero=1)],
        "allowzero",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    with pytest.raises(UnsupportedOpError, match=r"Reshape \(node 'keep_zeros'\).*allowzero"):
        load_onnx(save(model, tmp_path / "allowzero.onnx"))


def test_input_shapes_must_match_inputs(tmp_path: Path) -> None:
    path = save(flatten_model(), tmp_path / "flatten.onnx")
    with pytest.raises(ModelLoadError, match="one shape per input"):
        load_onnx(path, input_shapes=[(1, 4, 3), (1, 2)])
    with pytest.raises(ModelLoadError, match="size 4 on dim 1"):
        load_onnx(path, input_shapes=[(1, 5, 3)])


@pytest.mark.parametrize("shape", [(4, 3, 7), (4, 3, 5, 6)])
def test_any_rank_batch_norm_matches_functional(shape: tuple[int, ...]) -> None:
    norm = AnyRankBatchNorm(3).eval()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        norm.running_var.copy_(torch.tensor([1.5, 0.25, 4.0]))
        norm.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
    x = torch.randn(shape)
    expected = torch.nn.functional.batch_norm(
        x, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps
    )
    torch.testing.assert_close(norm(x), expected)


def test_file_from_torch_dynamo_exporter_converts(tmp_path: Path) -> None:
    """torch's default exporter writes opset 18+ and Reshape(allowzero=1): both handled."""
    import qpp

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10)
    ).eval()
    x = torch.randn(3, 1, 8, 8)
    path = tmp_path / "dynamo.onnx"
    torch.onnx.export(
        model, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    converted = load_onnx(path, input_shapes=[(3, 1, 8, 8)])
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    quantized = qpp.quantize(converted, [(x,)])
    assert quantized(torch.randn(5, 1, 8, 8)).shape == (5, 10)
