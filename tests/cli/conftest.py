"""Shared fixtures of the CLI tests: a digits-cnn run folder, a user ONNX classifier with npz data,
and the checks every "bad input" case must pass."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from qpp.cli import app


def qpp_command(*args: str | Path) -> Result:
    """Run ``qpp ARGS`` in this process (stdout and stderr kept apart)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def qpp_process(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``qpp ARGS`` as a separate process, exactly as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "qpp.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit status 2, no traceback, and stderr one ``qpp: error:`` line holding ``fragments``
    (the problem and the fix). Returns the message."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}"
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qpp: error: ")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@dataclass(frozen=True)
class DigitsRun:
    folder: Path
    stdout: str
    stderr: str
    returncode: int

    @property
    def result(self) -> dict[str, Any]:
        return json.loads(self.stdout)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    """``qpp quantize digits-cnn --json --out DIR`` with the default config, run as a process."""
    folder = tmp_path_factory.mktemp("digits") / "run"
    process = qpp_process("quantize", "digits-cnn", "--json", "--out", folder)
    return DigitsRun(folder, process.stdout, process.stderr, process.returncode)


@dataclass(frozen=True)
class UserClassifier:
    """A user's ONNX digits classifier with calibration and evaluation npz files."""

    folder: Path
    model: Path
    calibration: Path
    evaluation: Path
    images: np.ndarray  # float32, N x 1 x 8 x 8, the evaluation images
    labels: np.ndarray

    def args(self, **replace: Path) -> list[str]:
        """``MODEL --calib C --eval E``, with any of them replaced."""
        return [
            str(replace.get("model", self.model)),
            "--calib",
            str(replace.get("calibration", self.calibration)),
            "--eval",
            str(replace.get("evaluation", self.evaluation)),
        ]


@pytest.fixture(scope="session")
def user_classifier(tmp_path_factory: pytest.TempPathFactory) -> UserClassifier:
    """A small MLP trained on scikit-learn's digits (deterministically), exported to ONNX with
    ``torch.onnx.export``, plus ``calib.npz`` (images) and ``eval.npz`` (images, labels)."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("user-classifier")
    digits = load_digits()
    images = (digits.images[:, None] / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train, held_out = slice(0, 1400), slice(1400, None)
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.1, 0.1, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    for _ in range(80):  # full-batch steps: a few seconds, about 90 % held-out accuracy
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    path = folder / "classifier.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(images[:2]),),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    np.savez(folder / "calib.npz", images=images[:128])
    np.savez(folder / "eval.npz", images=images[held_out], y=labels[held_out])
    return UserClassifier(
        folder,
        path,
        folder / "calib.npz",
        folder / "eval.npz",
        images[held_out],
        labels[held_out],
    )


def file_tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _in_an_empty_folder(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run every command from an empty folder, so a default ``runs/`` never lands in the repo."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


# Test modules reach the helpers above through these fixtures.


@pytest.fixture
def qpp() -> Callable[..., Result]:
    return qpp_command


@pytest.fixture
def qpp_as_process() -> Callable[..., subprocess.CompletedProcess[str]]:
    return qpp_process


@pytest.fixture
def user_error() -> Callable[..., str]:
    return assert_user_error


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, bytes]]:
    return file_tree
