"""A model with its data and metric, whether from the zoo or from the user's files.

``resolve_source`` returns a ``ZooEntry`` either way, plus a JSON-able description from which
``qpp eval`` rebuilds the same source later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpp.errors import DataError, ModelLoadError
from qpp.graph.load import input_names, load_user_model, onnx_input_specs
from qpp.zoo import get_entry, zoo_names
from qpp.zoo.base import Batch, EvaluationSet, ZooEntry

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class SourceSpec:
    """Where a model and its data come from: a zoo name, or a model reference plus npz files."""

    model: str
    calibration: str | None = None
    evaluation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "calibration": self.calibration, "evaluation": self.evaluation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceSpec:
        return cls(data["model"], data.get("calibration"), data.get("evaluation"))

    def with_absolute_paths(self) -> SourceSpec:
        """This spec with its existing files as absolute paths (zoo names kept), so a run
        folder can be evaluated again from any working directory."""
        model = self.model
        head, sep, function = model.rpartition(":")
        if sep and head.endswith(".py") and Path(head).is_file():
            model = f"{Path(head).absolute()}:{function}"
        elif Path(model).exists():
            model = str(Path(model).absolute())
        return SourceSpec(
            model,
            None if self.calibration is None else str(Path(self.calibration).absolute()),
            None if self.evaluation is None else str(Path(self.evaluation).absolute()),
        )


def resolve_source(spec: SourceSpec) -> ZooEntry:
    """The zoo entry ``spec.model`` names, or a ``UserModel`` over the user's files."""
    if spec.model in zoo_names() and not Path(spec.model).exists():
        if spec.calibration or spec.evaluation:
            raise DataError(
                f"'{spec.model}' is a zoo model with its own data; drop --calib/--eval, or pass "
                "a model file to use your own data"
            )
        return get_entry(spec.model)
    if spec.calibration is None or spec.evaluation is None:
        if not Path(spec.model.rsplit(":", 1)[0]).exists():
            load_user_model(spec.model)  # raises the right "does not exist" error
        raise DataError(
            f"{spec.model} is not a zoo model, so it needs data: pass --calib FILE.npz and "
            "--eval FILE.npz (arrays keyed by the model's input names, or x; labels as y)"
        )
    return UserModel(spec.model, Path(spec.calibration), Path(spec.evaluation))


class UserModel(ZooEntry):
    """A user's model with npz calibration and evaluation data.

    Metrics: ``output_cosine`` (quantized vs FP32 outputs, mean over samples) always, and
    ``top1`` (percent) when the evaluation file has labels ``y``.
    """

    summary = "user model"

    def __init__(self, reference: str, calibration: Path, evaluation: Path) -> None:
        self.name = reference
        if reference.lower().endswith(".onnx") and Path(reference).is_file():
            # Read the data first: its shapes pin the ONNX file's symbolic dimensions.
            specs = onnx_input_specs(Path(reference))
            names = list(specs)
            self._calibration = load_npz(calibration, names, specs)
            self._evaluation = load_npz(evaluation, names, specs)
            shapes = [tuple(t.shape) for t in self._calibration.batches[0]]
            self.model = load_user_model(reference, input_shapes=shapes)
        else:
            self.model = load_user_model(reference)
            names = input_names(self.model)
            self._calibration = load_npz(calibration, names, None)
            self._evaluation = load_npz(evaluation, names, None)
        self.input_names = names
        check_model_runs(self.model, self._calibration.batches[0], calibration.name)
        check_model_runs(self.model, self._evaluation.batches[0], evaluation.name)
        self.labels = self._evaluation.labels
        self.primary_metric = "top1" if self.labels is not None else "output_cosine"

    def load_model(self) -> torch.nn.Module:
        return self.model

    def calibration_set(self) -> list[Batch]:
        return self._calibration.batches

    def evaluation_set(self) -> EvaluationSet:
        return EvaluationSet(self._evaluation.batches, self.labels, self.input_names)

    def metrics(
        self, outputs: torch.Tensor, reference_outputs: torch.Tensor, evaluation: EvaluationSet
    ) -> dict[str, float]:
        if isinstance(outputs, tuple):
            outputs, reference_outputs = outputs[0], reference_outputs[0]
        result: dict[str, float] = {}
        if self.labels is not None:
            predicted = outputs.reshape(outputs.shape[0], -1).argmax(dim=1)
            result["top1"] = float((predicted == self.labels).double().mean() * 100)
        cosine = torch.nn.functional.cosine_similarity(
            outputs.reshape(outputs.shape[0], -1).double(),
            reference_outputs.reshape(reference_outputs.shape[0], -1).double(),
            dim=1,
        )
        result["output_cosine"] = float(cosine.mean())
        return result


@dataclass
class NpzData:
    batches: list[Batch]
    labels: torch.Tensor | None


def load_npz(
    path: Path,
    names: list[str],
    expected: dict[str, tuple[str, list[int | None]]] | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> NpzData:
    """Arrays keyed by ``names`` (or ``x`` for one input), checked, as batches of tensors."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass an .npz written by numpy.savez")
    try:
        archive = np.load(path, allow_pickle=False)
        if isinstance(archive, np.ndarray):
            raise DataError(
                f"{path} holds one bare array (.npy), not named arrays; "
                "write it with numpy.savez(path, x=...)"
            )
        arrays = {key: archive[key] for key in archive.files}
    except DataError:
        raise
    except Exception as error:
        raise DataError(
            f"{path} is not a readable .npz file ({type(error).__name__}: {error}); "
            "write it with numpy.savez(path, x=...)"
        ) from None
    keys = names if len(names) != 1 else [names[0] if names[0] in arrays else "x"]
    missing = [k for k in keys if k not in arrays]
    if missing:
        wanted = f"'{names[0]}' (or 'x')" if len(names) == 1 else f"'{missing[0]}'"
        raise DataError(
            f"{path.name} has no array {wanted} (it has: {', '.join(arrays) or 'nothing'}); "
            f"key the inputs by the model's input names {names}"
            + (" or x" if len(names) == 1 else "")
        )
    inputs = [arrays[k] for k in keys]
    counts = {a.shape[0] if a.ndim else 0 for a in inputs}
    if counts == {0}:
        raise DataError(f"{path.name} holds no samples; give at least one sample per input")
    if len(counts) != 1:
        raise DataError(
            f"{path.name}: inputs have different sample counts {sorted(counts)}; "
            "give every input the same number of samples (first dimension)"
        )
    tensors = []
    for key, array in zip(keys, inputs, strict=True):
        tensors.append(
            _checked_tensor(path.name, key, array, expected.get(key) if expected else None)
        )
    labels = None
    if "y" in arrays:
        y = np.asarray(arrays["y"])
        if y.dtype.kind not in "iub" and not (
            y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all()
        ):
            raise DataError(
                f"{path.name}: labels y have dtype {y.dtype} with non-integer values; "
                "give class indices as integers (y.astype(numpy.int64))"
            )
        labels = torch.from_numpy(y.astype(np.int64)).reshape(-1)
        if labels.shape[0] != tensors[0].shape[0]:
            raise DataError(
                f"{path.name}: y has {labels.shape[0]} labels for "
                f"{tensors[0].shape[0]} samples; give one label per sample"
            )
    count = tensors[0].shape[0]
    batches = [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, count, batch_size)]
    return NpzData(batches, labels)


def _checked_tensor(
    file: str, key: str, array: np.ndarray, expected: tuple[str, list[int | None]] | None
) -> torch.Tensor:
    if array.dtype.kind not in "fiub":
        raise DataError(
            f"{file}: '{key}' has dtype {array.dtype}; give numbers (float32 images, "
            "int64 token ids)"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(f"{file}: '{key}' holds {bad} NaN/Inf values; clean or drop those samples")
    if expected is not None:
        dtype, shape = expected
        if dtype.startswith("float") and array.dtype.kind != "f":
            raise DataError(
                f"{file}: '{key}' has dtype {array.dtype} but the model takes {dtype}; "
                f"convert with array.astype(numpy.{dtype})"
            )
        if dtype.startswith("int") and array.dtype.kind not in "iu":
            raise DataError(f"{file}: '{key}' has dtype {array.dtype} but the model takes {dtype}")
        if len(shape) != array.ndim or any(
            d is not None and d != a for d, a in zip(shape[1:], array.shape[1:], strict=False)
        ):
            wanted = "x".join("N" if d is None else str(d) for d in shape)
            raise DataError(
                f"{file}: '{key}' has shape {'x'.join(map(str, array.shape))} but the "
                f"model takes {wanted}; reshape or resize the samples"
            )
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_floating_point():
        tensor = tensor.float()
    elif array.dtype.kind in "iu":
        tensor = tensor.long()
    return tensor


def check_model_runs(model: torch.nn.Module, batch: Batch, file: str) -> None:
    """Run one batch so a shape or dtype mismatch surfaces as a data error, not a traceback."""
    try:
        with torch.no_grad():
            model(*batch)
    except Exception as error:
        shapes = ", ".join("x".join(map(str, t.shape)) + f" {t.dtype}" for t in batch)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"the model fails on {file}'s samples ({shapes}): {message}; "
            "give inputs of the shape and dtype the model takes"
        ) from None


__all__ = ["ModelLoadError", "SourceSpec", "UserModel", "load_npz", "resolve_source"]
