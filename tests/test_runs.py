"""Run folders: never overwritten without force, saved and read back exactly, checked on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qpp.api import prepare, quantize
from qpp.errors import ConfigError, EncodingsError, OutputExistsError, QppError
from qpp.runs import (
    FILES,
    default_run_folder,
    load_weights,
    prepare_output,
    read_run,
    remove_unused_output,
    save_run,
)
from qpp.sim.config import QuantConfig
from qpp.sim.model import QuantizedModel
from qpp.sources import SourceSpec


def _net(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten()
    ).eval()


def _batches() -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(4, 1, 6, 6, generator=generator),) for _ in range(2)]


FAST = QuantConfig(weight_estimator="minmax", activation_estimator="minmax")


def _quantized(width: int = 4, config: QuantConfig = FAST) -> QuantizedModel:
    return quantize(_net(width), _batches(), config)


@pytest.fixture(scope="module")
def small() -> QuantizedModel:
    return _quantized()


@pytest.fixture(scope="module")
def wider() -> QuantizedModel:
    """The same architecture with twice the channels."""
    return _quantized(width=8)


def _save(folder: Path, model: QuantizedModel, source: SourceSpec | None = None) -> None:
    folder.mkdir(exist_ok=True)
    save_run(folder, source or SourceSpec("digits-cnn"), model, {"metrics": {"fp32": {"a": 1.0}}})


# --- the output folder ------------------------------------------------------------------------


def test_prepare_output_creates_a_new_folder(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "net-1"
    assert prepare_output(folder, force=False) == tmp_path / "runs"  # the outermost it made
    assert folder.is_dir()
    assert prepare_output(folder, force=False) is None  # an empty folder is fine


def test_remove_unused_output_removes_only_what_was_made(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "net-1"
    created = prepare_output(folder, force=False)
    assert created is not None
    remove_unused_output(folder, created)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "net-0").mkdir()
    created = prepare_output(folder, force=False)
    assert created == folder
    remove_unused_output(folder, created)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["net-0"]

    assert prepare_output(folder, force=False) == folder
    (folder / "qpp.json").write_text("{}")  # not empty: kept
    remove_unused_output(folder, folder)
    assert (folder / "qpp.json").is_file()


def test_prepare_output_refuses_a_used_folder_and_keeps_it(tmp_path: Path) -> None:
    (tmp_path / "qpp.json").write_text("old run")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"already exists; .* pass --force"):
        prepare_output(tmp_path, force=False)
    # force accepts it, but deletes nothing before the new run is saved over the old one
    assert prepare_output(tmp_path, force=True) is None
    assert (tmp_path / "qpp.json").read_text() == "old run"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_prepare_output_refuses_a_file_even_with_force(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"precious")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="is not a folder"):
            prepare_output(path, force=force)
    assert path.read_bytes() == b"precious"


def test_prepare_output_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot create output folder .*; choose an --out"):
        prepare_output(tmp_path / "file" / "run", force=False)


def test_default_run_folder_takes_the_first_free_number(tmp_path: Path) -> None:
    assert default_run_folder("digits-cnn", tmp_path) == tmp_path / "digits-cnn-1"
    (tmp_path / "digits-cnn-1").mkdir()
    (tmp_path / "digits-cnn-2").mkdir()
    assert default_run_folder("digits-cnn", tmp_path) == tmp_path / "digits-cnn-3"
    assert default_run_folder("models/my net.py:build", tmp_path) == tmp_path / "my-net-1"
    assert default_run_folder("/data/resnet.v2.onnx", tmp_path) == tmp_path / "resnet-v2-1"


# --- save and read back -----------------------------------------------------------------------


def test_save_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text("")
    (tmp_path / "calib.npz").write_bytes(b"")
    config = QuantConfig(weight_bits=6, weight_estimator="minmax", activation_estimator="minmax")
    model = _quantized(config=config)
    _save(tmp_path / "run", model, SourceSpec("net.py:build", "calib.npz", "eval.npz"))

    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(FILES)
    record = read_run(tmp_path / "run")
    assert record.config == config
    assert record.encodings == json.loads(json.dumps(model.encodings()))
    assert record.report == {"metrics": {"fp32": {"a": 1.0}}}
    # relative paths are stored absolute, so the folder evaluates from any directory
    assert record.source == SourceSpec(
        f"{tmp_path / 'net.py'}:build", str(tmp_path / "calib.npz"), str(tmp_path / "eval.npz")
    )


def test_reloaded_model_reproduces_outputs_exactly(tmp_path: Path) -> None:
    model = _quantized()
    with torch.no_grad():
        for parameter in model.parameters():  # as an algorithm that changes weights would
            parameter.mul_(1.5)
    _save(tmp_path, model)
    record = read_run(tmp_path)

    rebuilt = prepare(_net(), _batches()[0], record.config)
    load_weights(rebuilt, tmp_path)
    rebuilt.load_encodings(record.encodings)
    x = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_save_is_deterministic(tmp_path: Path) -> None:
    _save(tmp_path / "a", _quantized())
    _save(tmp_path / "b", _quantized())
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --- damaged or foreign folders ---------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path, small: QuantizedModel) -> Path:
    _save(tmp_path, small)
    return tmp_path


def _rewrite(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda f: (f / "weights.safetensors").unlink(), "lacks weights.safetensors"),
        (lambda f: (f / "report.json").write_text("{"), "is corrupt .*; quantize again"),
        (lambda f: _rewrite(f / "qpp.json", {"format": "other"}), "is not a qpp run manifest"),
        (lambda f: _rewrite(f / "qpp.json", "text"), "is not a qpp run manifest"),
        (
            lambda f: _rewrite(f / "qpp.json", {"format": "qpp-run", "config": {}}),
            "lacks its 'source' or 'config' object",
        ),
        (
            lambda f: _rewrite(f / "qpp.json", {"format": "qpp-run", "source": {}, "config": {}}),
            "names no model",
        ),
        (lambda f: _rewrite(f / "encodings.json", [1]), "not an object of quantizer encodings"),
        (lambda f: _rewrite(f / "encodings.json", {"a": 1}), "not an object of quantizer"),
    ],
)
def test_read_run_refuses_a_damaged_folder(saved: Path, damage, match: str) -> None:
    damage(saved)
    with pytest.raises(EncodingsError, match=match):
        read_run(saved)


@pytest.mark.parametrize("config", [{"weight_bits": [8]}, {"calibration_samples": "all"}])
def test_read_run_refuses_config_values_of_the_wrong_type(saved: Path, config: dict) -> None:
    manifest = json.loads((saved / "qpp.json").read_text())
    _rewrite(saved / "qpp.json", {**manifest, "config": config})
    with pytest.raises(QppError):  # a user error, whichever layer notices it
        read_run(saved)


def test_read_run_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(EncodingsError, match="is not a folder; pass a folder written by qpp"):
        read_run(tmp_path / "nothing")


def test_load_weights_refuses_foreign_or_broken_weights(saved: Path, wider: QuantizedModel) -> None:
    model = prepare(_net(), _batches()[0], FAST)
    save_file({"other": torch.zeros(2)}, str(saved / "weights.safetensors"))
    with pytest.raises(EncodingsError, match="belong to another model"):
        load_weights(model, saved)

    _save(saved, wider)
    with pytest.raises(EncodingsError, match=r"has shape \(8.*\) in .* but \(4.*\) in the model"):
        load_weights(model, saved)

    (saved / "weights.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(EncodingsError, match="is not readable"):
        load_weights(model, saved)


def test_load_encodings_checks_sizes(saved: Path, wider: QuantizedModel) -> None:
    """Encodings of a model with other widths are refused by name."""
    record = read_run(saved)
    model = prepare(_net(), _batches()[0], record.config)
    model.load_encodings(record.encodings)  # its own encodings fit
    weight_name = next(n for n in model.names if model.quantizer(n).kind.value == "weight")
    activation_name = next(n for n in model.names if model.quantizer(n).kind.value != "weight")

    with pytest.raises(EncodingsError, match=f"'{weight_name}' has 8 scales .* needs 4"):
        model.load_encodings(wider.encodings())

    two_scales = json.loads(json.dumps(record.encodings))
    two_scales[activation_name]["scale"] *= 2
    two_scales[activation_name]["zero_point"] *= 2
    with pytest.raises(EncodingsError, match=f"'{activation_name}' has 2 scales .* needs 1"):
        model.load_encodings(two_scales)

    bad_axis = json.loads(json.dumps(record.encodings))
    bad_axis[weight_name]["spec"]["axis"] = 5
    with pytest.raises(EncodingsError, match="channel axis 5"):
        model.load_encodings(bad_axis)
