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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qpp.errors import EncodingsError, OutputExistsError
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


def prepare_output(folder: Path, force: bool) -> None:
    """Refuse an existing non-empty ``folder`` unless ``force``; then create it."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        if not force:
            raise OutputExistsError(
                f"{folder} already exists; choose another --out or pass --force to replace it"
            )
        if folder.is_dir():
            for name in FILES:
                (folder / name).unlink(missing_ok=True)
        else:
            folder.unlink()
    folder.mkdir(parents=True, exist_ok=True)


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
        "source": source.to_dict(),
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
    if manifest.get("format") != RUN_FORMAT:
        raise EncodingsError(f"{folder}/qpp.json is not a qpp run manifest")
    return RunRecord(
        SourceSpec.from_dict(manifest["source"]),
        QuantConfig.from_dict(manifest["config"]),
        encodings,
        report,
        folder,
    )


def load_weights(model: QuantizedModel, folder: Path) -> None:
    """Load ``weights.safetensors`` into the graph; every name and shape must match."""
    weights = load_file(str(folder / "weights.safetensors"))
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
                f"{tuple(expected[key].shape)} in the model"
            )
    model.graph_module.load_state_dict(weights, strict=False)


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
