"""A run folder: what ``qpp quantize`` writes and ``qpp eval`` reads back.

- ``qpp.json``: where the model and data come from, and the quantization config;
- ``encodings.json``: every quantizer's spec and QPs (readable, diffable);
- ``weights.safetensors``: the float weights of the captured graph (after BN folding and any
  weight-changing algorithm), so a reload reproduces the metrics exactly;
- ``report.json``: metrics, sizes and timings.

Nothing is pickled; an existing folder is never overwritten without ``force``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qpp.errors import ConfigError, EncodingsError, OutputExistsError
from qpp.sim.config import QuantConfig
from qpp.sim.model import QUANTIZER_ROOT, QuantizedModel
from qpp.sources import SourceSpec

RUN_FORMAT = "qpp-run"
RUN_VERSION = 1
FILES = ("qpp.json", "encodings.json", "weights.safetensors", "report.json")


@dataclass(frozen=True)
class RunRecord:
    source: SourceSpec
    config: QuantConfig
    encodings: dict[str, dict[str, Any]]
    report: dict[str, Any]
    folder: Path


def prepare_output(folder: Path, force: bool) -> Path | None:
    """Refuse an existing non-empty ``folder`` unless ``force``, and any path that is not a
    folder; then create it. Returns the outermost folder this created (``None`` if ``folder``
    existed), for ``remove_unused_output`` after a failed run.

    Nothing is deleted here: with ``force`` the old files stay until ``save_run`` writes the
    new ones over them, so a run that fails on bad input loses nothing.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} exists and is not a folder; choose another --out")
    if folder.exists() and any(folder.iterdir()) and not force:
        raise OutputExistsError(
            f"{folder} already exists; choose another --out or pass --force to replace it"
        )
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create output folder {folder} ({error.strerror or error}); "
            "choose an --out you can write to"
        ) from None
    return created


def remove_unused_output(folder: Path, created: Path) -> None:
    """Remove ``folder`` and its parents up to ``created`` (what ``prepare_output`` made),
    as long as they are empty."""
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()
        except OSError:
            return
        if path == created:
            return


def default_run_folder(model: str, root: Path = Path("runs")) -> Path:
    """``runs/<model>-<n>``: the first free number, so earlier runs are never touched."""
    stem = Path(model.rsplit(":", 1)[0]).stem if not model.isidentifier() else model
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem) or "model"
    index = 1
    while (root / f"{stem}-{index}").exists():
        index += 1
    return root / f"{stem}-{index}"


def graph_weights(model: QuantizedModel) -> dict[str, torch.Tensor]:
    """The captured graph's float parameters and buffers, without quantizer state."""
    state = model.graph_module.state_dict()
    return {
        key: value.contiguous()
        for key, value in state.items()
        if not key.startswith(f"{QUANTIZER_ROOT}.")
    }


def save_run(
    folder: Path,
    source: SourceSpec,
    model: QuantizedModel,
    report: dict[str, Any],
) -> None:
    manifest = {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "source": source.with_absolute_paths().to_dict(),
        "config": model.config.to_dict(),
    }
    (folder / "qpp.json").write_text(json.dumps(manifest, indent=2))
    (folder / "encodings.json").write_text(json.dumps(model.encodings(), indent=1))
    weights = graph_weights(model)
    # safetensors refuses tensors that share memory; store private copies.
    save_file({k: v.clone() for k, v in weights.items()}, str(folder / "weights.safetensors"))
    (folder / "report.json").write_text(json.dumps(report, indent=2))


def read_run(folder: Path) -> RunRecord:
    """The manifest, encodings and report of a run folder, checked."""
    if not folder.is_dir():
        raise EncodingsError(f"{folder} is not a folder; pass a folder written by qpp quantize")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise EncodingsError(
            f"{folder} lacks {', '.join(missing)}; pass a complete folder written by qpp quantize"
        )
    try:
        manifest = json.loads((folder / "qpp.json").read_text())
        encodings = json.loads((folder / "encodings.json").read_text())
        report = json.loads((folder / "report.json").read_text())
    except json.JSONDecodeError as error:
        raise EncodingsError(
            f"a JSON file in {folder} is corrupt ({error}); quantize again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT:
        raise EncodingsError(
            f"{folder}/qpp.json is not a qpp run manifest; pass a folder written by qpp quantize"
        )
    if not isinstance(manifest.get("source"), dict) or not isinstance(manifest.get("config"), dict):
        raise EncodingsError(
            f"{folder}/qpp.json lacks its 'source' or 'config' object; quantize again"
        )
    if not isinstance(encodings, dict) or not all(isinstance(v, dict) for v in encodings.values()):
        raise EncodingsError(
            f"{folder}/encodings.json is not an object of quantizer encodings; quantize again"
        )
    if "model" not in manifest["source"]:
        raise EncodingsError(f"{folder}/qpp.json names no model; quantize again")
    try:
        config = QuantConfig.from_dict(manifest["config"])
    except (TypeError, AttributeError) as error:
        raise EncodingsError(
            f"{folder}/qpp.json holds a config value of the wrong type ({error}); quantize again"
        ) from None
    return RunRecord(
        SourceSpec.from_dict(manifest["source"]),
        config,
        encodings,
        report if isinstance(report, dict) else {},
        folder,
    )


def load_weights(model: QuantizedModel, folder: Path) -> None:
    """Load ``weights.safetensors`` into the graph; every name and shape must match."""
    try:
        weights = load_file(str(folder / "weights.safetensors"))
    except Exception as error:  # safetensors raises its own unexported error type
        raise EncodingsError(
            f"{folder}/weights.safetensors is not readable ({error}); quantize again"
        ) from None
    expected = graph_weights(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise EncodingsError(
            f"weights in {folder} belong to another model ({len(missing)} missing, {len(extra)} "
            "unknown tensors); evaluate the folder with the model it was made from"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise EncodingsError(
                f"weight '{key}' has shape {tuple(value.shape)} in {folder} but "
                f"{tuple(expected[key].shape)} in the model; evaluate the folder with the model "
                "it was made from"
            )
    model.graph_module.load_state_dict(weights, strict=False)
