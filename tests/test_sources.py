"""Sources: zoo names or user models with npz data, checked before any work starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qpp.errors import DataError, ModelLoadError
from qpp.sources import DEFAULT_BATCH_SIZE, SourceSpec, UserModel, load_npz, resolve_source
from qpp.zoo.digits import DigitsCNN

IMAGE_SPEC = {"images": ("float32", [None, 1, 8, 8])}


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(count).random((count, 1, 8, 8), dtype=np.float32)


# --- SourceSpec -------------------------------------------------------------------------------


def test_source_spec_round_trips() -> None:
    spec = SourceSpec("model.onnx", "calib.npz", "eval.npz")
    assert SourceSpec.from_dict(spec.to_dict()) == spec
    assert SourceSpec.from_dict({"model": "digits-cnn"}) == SourceSpec("digits-cnn")


def test_with_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "build.py").write_text("")
    (tmp_path / "model.onnx").write_bytes(b"")
    assert SourceSpec("digits-cnn").with_absolute_paths() == SourceSpec("digits-cnn")
    assert SourceSpec("nets/build.py:small", "c.npz", "data/e.npz").with_absolute_paths() == (
        SourceSpec(
            f"{tmp_path / 'nets' / 'build.py'}:small",
            str(tmp_path / "c.npz"),
            str(tmp_path / "data" / "e.npz"),
        )
    )
    assert SourceSpec("model.onnx").with_absolute_paths().model == str(tmp_path / "model.onnx")
    absolute = SourceSpec(str(tmp_path / "model.onnx"), str(tmp_path / "c.npz"))
    assert absolute.with_absolute_paths() == absolute


# --- resolve_source ---------------------------------------------------------------------------


def test_zoo_names_resolve_to_zoo_entries() -> None:
    assert isinstance(resolve_source(SourceSpec("digits-cnn")), DigitsCNN)
    with pytest.raises(DataError, match="zoo model with its own data; drop --calib/--eval"):
        resolve_source(SourceSpec("digits-cnn", "calib.npz", None))


def test_a_missing_model_is_named(tmp_path: Path) -> None:
    for reference in ("resnet", str(tmp_path / "model.onnx")):
        with pytest.raises(ModelLoadError, match="does not exist; pass a zoo name"):
            resolve_source(SourceSpec(reference))
    with pytest.raises(ModelLoadError, match=r"does not exist; pass file.py:function"):
        resolve_source(SourceSpec(f"{tmp_path / 'net.py'}:build", "c.npz", "e.npz"))


def test_a_user_model_needs_both_data_files(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    for calibration, evaluation in ((None, None), ("c.npz", None), (None, "e.npz")):
        with pytest.raises(DataError, match=r"pass --calib FILE.npz and --eval FILE.npz"):
            resolve_source(SourceSpec(str(tmp_path / "model.onnx"), calibration, evaluation))


# --- load_npz ---------------------------------------------------------------------------------


def test_load_npz_batches_inputs_and_labels(tmp_path: Path) -> None:
    count = 2 * DEFAULT_BATCH_SIZE + 5
    images, labels = _images(count), np.arange(count) % 10
    np.savez(tmp_path / "d.npz", images=images, y=labels.astype(np.int32))
    data = load_npz(tmp_path / "d.npz", ["images"], IMAGE_SPEC)
    assert [batch[0].shape[0] for batch in data.batches] == [32, 32, 5]
    assert all(batch[0].dtype == torch.float32 for batch in data.batches)
    assert torch.equal(torch.cat([b[0] for b in data.batches]), torch.from_numpy(images))
    assert data.labels is not None and data.labels.dtype == torch.int64
    assert data.labels.tolist() == labels.tolist()


def test_load_npz_accepts_x_for_a_single_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=_images(3).astype(np.float64), y=np.array([1.0, 2.0, 3.0]))
    data = load_npz(tmp_path / "d.npz", ["images"], IMAGE_SPEC)
    assert data.batches[0][0].dtype == torch.float32  # float64 data for a float32 model
    assert data.labels is not None and data.labels.tolist() == [1, 2, 3]  # whole-number floats


def test_load_npz_several_inputs(tmp_path: Path) -> None:
    ids = np.ones((4, 6), dtype=np.int32)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=ids)
    data = load_npz(tmp_path / "d.npz", ["input_ids", "attention_mask"], None)
    assert [t.dtype for t in data.batches[0]] == [torch.int64, torch.int64]
    assert data.labels is None

    np.savez(tmp_path / "d.npz", input_ids=ids)
    with pytest.raises(DataError, match=r"has no array 'attention_mask' .*input names"):
        load_npz(tmp_path / "d.npz", ["input_ids", "attention_mask"], None)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=ids[:3])
    with pytest.raises(DataError, match=r"different sample counts \[3, 4\]; give every input"):
        load_npz(tmp_path / "d.npz", ["input_ids", "attention_mask"], None)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"pixels": _images(2)}, r"no array 'images' \(or 'x'\) \(it has: pixels\); key the"),
        ({"images": _images(2)[:, :, :, :7]}, "shape 2x1x8x7 but the model takes Nx1x8x8"),
        ({"images": _images(2)[:, 0]}, "shape 2x8x8 but the model takes Nx1x8x8; reshape"),
        ({"images": (_images(2) * 9).astype(np.uint8)}, r"astype\(numpy.float32\)"),
        ({"images": np.full((2, 1, 8, 8), "a")}, "dtype <U1; give numbers"),
        ({"images": np.full((2, 1, 8, 8), np.nan, np.float32)}, "holds 128 NaN/Inf values"),
        ({"images": np.full((2, 1, 8, 8), -np.inf, np.float32)}, "NaN/Inf values; clean or"),
        ({"images": _images(0)}, "holds no samples; give at least one"),
        ({"images": _images(3), "y": np.array([1, 2])}, "y has 2 labels for 3 samples"),
        ({"images": _images(2), "y": np.array([0.5, 1])}, "non-integer values; give class"),
        ({"images": _images(2), "y": np.array([np.nan, 1])}, "non-integer values"),
    ],
)
def test_load_npz_refuses_bad_data(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_npz(tmp_path / "d.npz", ["images"], IMAGE_SPEC)


def test_load_npz_refuses_files_that_are_not_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist; pass an .npz written by numpy.savez"):
        load_npz(tmp_path / "missing.npz", ["x"], None)
    (tmp_path / "text.npz").write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"is not a readable .npz file .*numpy.savez"):
        load_npz(tmp_path / "text.npz", ["x"], None)
    with (tmp_path / "array.npz").open("wb") as file:
        np.save(file, _images(2))
    with pytest.raises(DataError, match=r"one bare array \(.npy\), not named arrays"):
        load_npz(tmp_path / "array.npz", ["x"], None)


# --- UserModel --------------------------------------------------------------------------------

PYTHON_MODEL = """
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
"""


def test_user_python_model(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(PYTHON_MODEL)
    images = _images(40)
    np.savez(tmp_path / "c.npz", x=images)
    np.savez(tmp_path / "e.npz", x=images, y=np.arange(40) % 10)
    entry = resolve_source(
        SourceSpec(f"{tmp_path / 'net.py'}:build", str(tmp_path / "c.npz"), str(tmp_path / "e.npz"))
    )
    assert isinstance(entry, UserModel)
    assert entry.primary_metric == "top1"
    evaluation = entry.evaluation_set()
    with torch.no_grad():
        outputs = torch.cat([entry.load_model()(*batch) for batch in evaluation.batches])
    expected = float((outputs.argmax(1) == torch.arange(40) % 10).double().mean() * 100)
    metrics = entry.metrics(outputs, outputs, evaluation)
    assert metrics == {"top1": pytest.approx(expected), "output_cosine": pytest.approx(1.0)}
    assert entry.metrics(-outputs, outputs, evaluation)["output_cosine"] == pytest.approx(-1.0)

    # without labels the metric is the cosine with FP32 outputs
    entry = UserModel(f"{tmp_path / 'net.py'}:build", tmp_path / "c.npz", tmp_path / "c.npz")
    assert entry.primary_metric == "output_cosine"
    assert set(entry.metrics(outputs, outputs, entry.evaluation_set())) == {"output_cosine"}


def test_user_python_model_on_data_it_cannot_take(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(PYTHON_MODEL)
    np.savez(tmp_path / "c.npz", x=_images(4))
    np.savez(tmp_path / "e.npz", x=np.ones((4, 1, 4, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"fails on e.npz's samples \(4x1x4x4 torch.float32\)"):
        UserModel(f"{tmp_path / 'net.py'}:build", tmp_path / "c.npz", tmp_path / "e.npz")


def _onnx_mlp(path: Path) -> None:
    """x (N x 1 x 8 x 8) -> Flatten -> Gemm: an ONNX classifier with a symbolic batch."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "weight"),
        numpy_helper.from_array(np.zeros(10, dtype=np.float32), "bias"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["pixels"], ["flat"]),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_user_onnx_model_keys_data_by_input_name(tmp_path: Path) -> None:
    _onnx_mlp(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "c.npz", pixels=_images(8))
    np.savez(tmp_path / "e.npz", x=_images(6), y=np.zeros(6, dtype=np.int64))
    entry = UserModel(str(tmp_path / "mlp.onnx"), tmp_path / "c.npz", tmp_path / "e.npz")
    assert entry.input_names == ["pixels"]
    assert entry.primary_metric == "top1"
    with torch.no_grad():
        assert entry.load_model()(*entry.calibration_set()[0]).shape == (8, 10)

    np.savez(tmp_path / "e.npz", images=_images(6))
    with pytest.raises(DataError, match=r"no array 'pixels' \(or 'x'\)"):
        UserModel(str(tmp_path / "mlp.onnx"), tmp_path / "c.npz", tmp_path / "e.npz")
