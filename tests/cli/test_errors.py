"""Bad input: a one-line error, exit status 2, no traceback, nothing lost.

Every case checks that stderr is a single ``qpp: error:`` line naming the problem and the fix,
that nothing reaches stdout, and that no output folder is left behind or changed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qpp.api import quantize
from qpp.runs import FILES

# --- the model argument -----------------------------------------------------------------------

PYTHON_MODELS = """
import torch


def raises():
    raise RuntimeError("checkpoint weights.pt is missing")


def not_a_module():
    return {"weights": 1}


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum().item() > 0:  # Python control flow on a tensor value
            return self.linear(x)
        return -x


def data_dependent():
    return DataDependent()
"""


@pytest.fixture
def python_models(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(PYTHON_MODELS)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((8, 4), dtype=np.float32))
    return path


def test_model_path_that_does_not_exist(qpp, user_error, user_classifier, tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    user_error(
        qpp("quantize", *user_classifier.args(model=missing), "--out", tmp_path / "out"),
        f"{missing} does not exist",
        "pass a zoo name (qpp models)",
    )
    # without data files too, and for a name that is neither a file nor a zoo model
    user_error(qpp("quantize", missing), "does not exist")
    user_error(qpp("quantize", "digits-cnnn"), "digits-cnnn does not exist", "qpp models")
    assert not (tmp_path / "out").exists()


def test_text_file_renamed_onnx(qpp, user_error, user_classifier, tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_text("this is a README, not a model\n")
    user_error(
        qpp("quantize", *user_classifier.args(model=fake), "--out", tmp_path / "out"),
        "model.onnx is not a valid ONNX model",
        "pass a file written by torch.onnx.export",
    )
    assert not (tmp_path / "out").exists()


def test_truncated_onnx(qpp, user_error, user_classifier, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    data = user_classifier.model.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    message = user_error(
        qpp("quantize", *user_classifier.args(model=truncated), "--out", tmp_path / "out"),
        "truncated.onnx is not a valid ONNX model",
    )
    assert "pass a file written by" in message or "re-export it" in message
    assert not (tmp_path / "out").exists()


def test_onnx_op_that_cannot_be_converted(qpp, user_error, tmp_path: Path) -> None:
    """MatMul then Hardmax: valid ONNX, but onnx2torch has no Hardmax converter."""
    weight = numpy_helper.from_array(np.ones((64, 10), dtype=np.float32), "weight")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["logits"], name="fc"),
            helper.make_node("Hardmax", ["logits"], ["y"], name="pick"),
        ],
        "hardmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "hardmax.onnx")
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 64), dtype=np.float32))
    data = tmp_path / "x.npz"
    message = user_error(
        qpp("quantize", tmp_path / "hardmax.onnx", "--calib", data, "--eval", data),
        "Hardmax",
        "node 'pick'",
        "replace Hardmax",
    )
    assert "cannot convert" in message


@pytest.mark.parametrize(
    ("function", "fragments"),
    [
        (
            "raises",
            [
                "models.py:raises() raised RuntimeError: checkpoint weights.pt is missing",
                "make it return a torch.nn.Module",
            ],
        ),
        (
            "not_a_module",
            [
                "models.py:not_a_module() returned dict, not a torch.nn.Module",
                "return the model object itself",
            ],
        ),
        (
            "build_model",
            [
                "has no function 'build_model'",
                "functions there: raises",
                "name a function that returns a torch.nn.Module",
            ],
        ),
    ],
)
def test_python_function_that_fails(
    qpp, user_error, python_models: Path, function: str, fragments: list[str]
) -> None:
    data = python_models.parent / "x.npz"
    out = python_models.parent / "out"
    user_error(
        qpp(
            "quantize", f"{python_models}:{function}", "--calib", data, "--eval", data, "--out", out
        ),
        *fragments,
    )
    assert not out.exists()


def test_python_file_that_does_not_exist(qpp, user_error, tmp_path: Path) -> None:
    user_error(
        qpp("quantize", f"{tmp_path / 'nets.py'}:build"),
        "nets.py does not exist",
        "pass file.py:function with an existing file",
    )


def test_python_file_that_does_not_import(qpp, user_error, tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import torch\ndef build(:\n")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((2, 4), dtype=np.float32))
    user_error(
        qpp("quantize", f"{tmp_path / 'broken.py'}:build", "--calib", data, "--eval", data),
        "importing",
        "SyntaxError",
        "fix the file so it imports",
    )


# --- capture ----------------------------------------------------------------------------------


def _line_of(text: str, code: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if code in line)


def test_model_neither_export_nor_fx_can_capture(
    qpp, user_error, capfd: pytest.CaptureFixture[str], python_models: Path, tmp_path: Path
) -> None:
    data = python_models.parent / "x.npz"
    message = user_error(
        qpp(
            "quantize",
            f"{python_models}:data_dependent",
            "--calib",
            data,
            "--eval",
            data,
            "--out",
            tmp_path / "out",
        ),
        "cannot capture the model",
        "torch.export failed",
        "torch.fx failed",
        "no .item()",  # the fix
    )
    line = _line_of(PYTHON_MODELS, "x.sum().item()")
    assert f"models.py:{line} `if x.sum().item() > 0:" in message  # the failing line
    # torch.export prints and logs its own failure reports; none may reach the terminal
    terminal = capfd.readouterr()
    assert terminal.out == "" and terminal.err == ""
    assert not (tmp_path / "out").exists()


# --- data -------------------------------------------------------------------------------------


def _replace_images(path: Path, images: np.ndarray, **extra: np.ndarray) -> None:
    np.savez(path, images=images, **extra)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as file:  # np.save(path) would add a .npy suffix
        np.save(file, array)


DATA_CASES: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray, Path], None], list[str]]] = {
    # name: (which file, writer(images, labels, path), fragments of the message)
    "missing key": (
        "calibration",
        lambda images, labels, path: np.savez(path, pixels=images),
        ["has no array 'images' (or 'x') (it has: pixels)", "key the inputs by the model's"],
    ),
    "no arrays at all": (
        "calibration",
        lambda images, labels, path: np.savez(path),
        ["has no array 'images'", "(it has: nothing)"],
    ),
    "wrong shape": (
        "calibration",
        lambda images, labels, path: _replace_images(path, images[:, :, :4, :]),
        ["has shape 397x1x4x8 but the model takes Nx1x8x8", "reshape or resize"],
    ),
    "wrong rank": (
        "evaluation",
        lambda images, labels, path: _replace_images(path, images.reshape(-1, 64), y=labels),
        ["has shape 397x64 but the model takes Nx1x8x8", "reshape or resize"],
    ),
    "integer dtype": (
        "calibration",
        lambda images, labels, path: _replace_images(path, (images * 16).astype(np.int64)),
        ["has dtype int64 but the model takes float32", "astype(numpy.float32)"],
    ),
    "string dtype": (
        "calibration",
        lambda images, labels, path: _replace_images(path, images.astype(str)),
        ["'images' has dtype <U", "give numbers"],
    ),
    "NaN": (
        "calibration",
        lambda images, labels, path: _replace_images(
            path, np.where(np.arange(images.size).reshape(images.shape) == 70, np.nan, images)
        ),
        ["'images' holds 1 NaN/Inf values", "clean or drop those samples"],
    ),
    "Inf": (
        "evaluation",
        lambda images, labels, path: _replace_images(
            path, np.where(images > 0.99, np.inf, images).astype(np.float32), y=labels
        ),
        ["NaN/Inf values", "clean or drop those samples"],
    ),
    "no samples": (
        "calibration",
        lambda images, labels, path: _replace_images(path, images[:0]),
        ["holds no samples", "give at least one sample"],
    ),
    "labels per sample": (
        "evaluation",
        lambda images, labels, path: _replace_images(path, images, y=labels[:5]),
        ["y has 5 labels for 397 samples", "give one label per sample"],
    ),
    "fractional labels": (
        "evaluation",
        lambda images, labels, path: _replace_images(path, images, y=labels + 0.5),
        ["labels y have dtype float64 with non-integer values", "astype(numpy.int64)"],
    ),
    "not an npz": (
        "calibration",
        lambda images, labels, path: path.write_text("images,label\n0.1,3\n"),
        ["is not a readable .npz file", "numpy.savez"],
    ),
    "a .npy array": (
        "calibration",
        lambda images, labels, path: _save_npy(path, images),
        ["holds one bare array (.npy)", "numpy.savez(path, x=...)"],
    ),
    "file that does not exist": (
        "evaluation",
        lambda images, labels, path: None,
        ["does not exist", "pass an .npz written by numpy.savez"],
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_npz_data(qpp, user_error, user_classifier, tmp_path: Path, case: str) -> None:
    which, write, fragments = DATA_CASES[case]
    path = tmp_path / f"{which}.npz"
    write(user_classifier.images, user_classifier.labels, path)
    out = tmp_path / "out"
    message = user_error(
        qpp("quantize", *user_classifier.args(**{which: path}), "--out", out), *fragments
    )
    if path.exists():
        assert f"{which}.npz" in message  # names the file at fault
    assert not out.exists()


def test_data_the_python_model_cannot_run(qpp, user_error, python_models: Path) -> None:
    """Without an ONNX signature the shapes are checked by running the model once."""
    data = python_models.parent / "wide.npz"
    np.savez(data, x=np.ones((8, 5), dtype=np.float32))  # the model takes 4 features
    user_error(
        qpp("quantize", f"{python_models}:data_dependent", "--calib", data, "--eval", data),
        "the model fails on wide.npz's samples (8x5 torch.float32)",
        "give inputs of the shape and dtype the model takes",
    )


def test_zoo_model_with_user_data(qpp, user_error, user_classifier) -> None:
    user_error(
        qpp("quantize", "digits-cnn", "--calib", user_classifier.calibration),
        "'digits-cnn' is a zoo model with its own data",
        "drop --calib/--eval",
    )


def test_user_model_without_data(qpp, user_error, user_classifier) -> None:
    user_error(
        qpp("quantize", user_classifier.model),
        "is not a zoo model, so it needs data",
        "pass --calib FILE.npz and --eval FILE.npz",
    )
    assert not Path("runs").exists()  # the default output folder is not left behind


# --- settings ---------------------------------------------------------------------------------

SETTING_CASES = {
    "weights 1": (["--weights", "1"], ["bit-width 1 is not supported", "from 2 to 16"]),
    "activations 17": (["--activations", "17"], ["bit-width 17 is not supported", "2 to 16"]),
    "weight estimator": (
        ["--weight-estimator", "median"],
        ["unknown range estimator 'median'", "use one of minmax"],
    ),
    "activation estimator": (
        ["--activation-estimator", "entropyy"],
        ["unknown range estimator 'entropyy'", "use one of minmax"],
    ),
    "policy": (["--policy", "tensorrt"], ["unknown placement policy 'tensorrt'", "runtime"]),
    "granularity": (
        ["--weight-granularity", "per-row"],
        ["unknown granularity 'per-row'", "use one of per-tensor, per-channel"],
    ),
    "override bits": (["--override", "*:bits=1"], ["bit-width 1", "2 to 16"]),
    "override syntax": (["--override", "features.0.0.weight"], ["must look like PATTERN:key"]),
    "override key": (["--override", "*:width=4"], ["unknown key", "use bits, granularity"]),
    "override value": (["--override", "*:bits=four"], ["bits must be an integer", "bits=4"]),
    "override flag": (["--override", "*:enabled=maybe"], ["must be true or false, got 'maybe'"]),
    "calibration samples": (["--calib-samples", "0"], ["at least 1"]),
}


@pytest.mark.parametrize("case", list(SETTING_CASES))
def test_bad_setting(qpp, user_error, tmp_path: Path, case: str) -> None:
    args, fragments = SETTING_CASES[case]
    out = tmp_path / "out"
    user_error(qpp("quantize", "digits-cnn", *args, "--out", out), *fragments)
    assert not out.exists()


def test_unknown_layer_names(qpp, user_error, tmp_path: Path) -> None:
    out = tmp_path / "out"
    user_error(
        qpp("quantize", "digits-cnn", "--override", "nope.*:bits=4", "--out", out),
        "no quantizer is named 'nope.*'",
        "--list-quantizers",
    )
    user_error(
        qpp("quantize", "digits-cnn", "--disable", "classifer.weight", "--out", out),
        "no quantizer is named 'classifer.weight' (similar: features.0.0.weight",
        "--list-quantizers",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ["does not exist", "pass a JSON file"]),
        ("{ weight_bits: 4 }", ["is not valid JSON"]),
        ("[4, 8]", ["holds no JSON object", "QuantConfig().to_json()"]),
        ('{"weight_bits": 4, "colour": "red"}', ["unknown config key(s) ['colour']", "allowed"]),
        ('{"overrides": ["x"]}', ["overrides must be an object"]),
        # a value of the wrong type: a one-line error whichever layer words it
        ('{"calibration_samples": "all"}', ["config"]),
    ],
)
def test_bad_config_file(
    qpp, user_error, tmp_path: Path, content: str | None, fragments: list[str]
) -> None:
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    user_error(qpp("quantize", "digits-cnn", "--config", path), *fragments)


# --- encodings and run folders ----------------------------------------------------------------


@pytest.fixture
def run_copy(digits_run, tmp_path: Path) -> Path:
    assert digits_run.returncode == 0, digits_run.stderr
    folder = tmp_path / "run"
    shutil.copytree(digits_run.folder, folder)
    return folder


def _edit_json(path: Path, edit: Callable[[dict], dict]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def test_encodings_with_other_quantizer_names(qpp, user_error, snapshot, run_copy: Path) -> None:
    _edit_json(
        run_copy / "encodings.json",
        lambda encodings: {k.replace("features.", "backbone."): v for k, v in encodings.items()},
    )
    before = snapshot(run_copy)
    user_error(
        qpp("eval", run_copy),
        "these encodings belong to another model",
        "missing (e.g. 'features.",
        "unknown here (e.g. 'backbone.",
        "load them into the model (and config) they were computed for",
    )
    assert snapshot(run_copy) == before


def test_encodings_saved_from_another_model(qpp, user_error, snapshot, run_copy: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    calibration = [(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)]
    encodings = quantize(other.eval(), calibration).encodings()
    (run_copy / "encodings.json").write_text(json.dumps(encodings))
    before = snapshot(run_copy)
    user_error(qpp("eval", run_copy), "these encodings belong to another model")
    assert snapshot(run_copy) == before


def test_encodings_of_a_model_with_other_widths(qpp, user_error, snapshot, run_copy) -> None:
    """Same quantizer names, but computed for a model with fewer channels."""

    def narrower(encodings: dict) -> dict:
        encoding = encodings["features.1.0.weight"]
        encoding["scale"], encoding["zero_point"] = (
            encoding["scale"][:8],
            encoding["zero_point"][:8],
        )
        return encodings

    _edit_json(run_copy / "encodings.json", narrower)
    before = snapshot(run_copy)
    user_error(
        qpp("eval", run_copy),
        "encoding of 'features.1.0.weight' has 8 scales and 8 zero points but the model needs 32",
        "evaluate the folder with) the model it was made from",
    )
    assert snapshot(run_copy) == before


def test_weights_of_another_model(qpp, user_error, run_copy: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(run_copy / "weights.safetensors"))
    user_error(qpp("eval", run_copy), "belong to another model", "with the model it was made from")
    (run_copy / "weights.safetensors").write_bytes(b"not safetensors")
    user_error(qpp("eval", run_copy), "weights.safetensors is not readable", "quantize again")


RUN_FOLDER_CASES = {
    "missing report": (lambda f: (f / "report.json").unlink(), ["lacks report.json"]),
    "corrupt encodings": (
        lambda f: (f / "encodings.json").write_text("{"),
        ["is corrupt", "quantize again"],
    ),
    "not a manifest": (
        lambda f: (f / "qpp.json").write_text("[1, 2]"),
        ["is not a qpp run manifest", "pass a folder written by qpp quantize"],
    ),
    "manifest without source": (
        lambda f: _edit_json(
            f / "qpp.json", lambda m: {k: v for k, v in m.items() if k != "source"}
        ),
        ["lacks its 'source' or 'config' object"],
    ),
    "encodings not an object": (
        lambda f: (f / "encodings.json").write_text("[]"),
        ["is not an object of quantizer encodings"],
    ),
}


@pytest.mark.parametrize("case", list(RUN_FOLDER_CASES))
def test_damaged_run_folder(qpp, user_error, run_copy: Path, case: str) -> None:
    damage, fragments = RUN_FOLDER_CASES[case]
    damage(run_copy)
    user_error(qpp("eval", run_copy), *fragments)


def test_eval_of_a_folder_that_does_not_exist(qpp, user_error, tmp_path: Path) -> None:
    user_error(
        qpp("eval", tmp_path / "runs" / "digits-cnn-7"),
        "is not a folder",
        "pass a folder written by qpp quantize",
    )


# --- the output folder ------------------------------------------------------------------------


def test_existing_out_is_refused_without_force(
    qpp, user_error, snapshot, user_classifier, run_copy: Path
) -> None:
    (run_copy / "notes.txt").write_text("mine")
    before = snapshot(run_copy)
    user_error(
        qpp("quantize", "digits-cnn", "--out", run_copy),
        f"{run_copy} already exists",
        "choose another --out or pass --force",
    )
    assert snapshot(run_copy) == before

    # --force with input that turns out bad: the old run is still there
    user_error(
        qpp(
            "quantize",
            *user_classifier.args(),
            "--override",
            "nope:bits=4",
            "--out",
            run_copy,
            "--force",
        ),
        "no quantizer is named 'nope'",
    )
    assert snapshot(run_copy) == before

    # --force with good input replaces the run; files that are not qpp's stay
    result = qpp(
        "quantize",
        *user_classifier.args(),
        "--out",
        run_copy,
        "--force",
        "--json",
        "--weight-estimator",
        "minmax",
        "--activation-estimator",
        "minmax",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output_dir"] == str(run_copy)
    manifest = json.loads((run_copy / "qpp.json").read_text())
    assert manifest["source"]["model"] == str(user_classifier.model)
    assert manifest["config"]["weight_estimator"] == "minmax"
    assert sorted(p.name for p in run_copy.iterdir()) == sorted([*FILES, "notes.txt"])
    assert (run_copy / "notes.txt").read_text() == "mine"


def test_out_that_is_a_file_is_refused_even_with_force(qpp, user_error, tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    for force in ([], ["--force"]):
        user_error(
            qpp("quantize", "digits-cnn", "--out", path, *force),
            "exists and is not a folder",
            "choose another --out",
        )
        assert path.read_text() == "a,b\n1,2\n"


def test_out_that_cannot_be_created(qpp, user_error, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    user_error(
        qpp("quantize", "digits-cnn", "--out", tmp_path / "file" / "run"),
        "cannot create output folder",
        "choose an --out you can write to",
    )


def test_error_as_a_process(qpp_as_process, tmp_path: Path) -> None:
    """End to end: the exit status and stderr a shell sees."""
    process = qpp_as_process("quantize", tmp_path / "model.onnx", "--out", tmp_path / "out")
    assert process.returncode == 2
    assert process.stdout == ""
    assert process.stderr.count("\n") == 1, process.stderr
    assert process.stderr.startswith(f"qpp: error: {tmp_path / 'model.onnx'} does not exist; ")
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "out").exists()
