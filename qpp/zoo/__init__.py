"""The zoo: real models with offline data and a task metric each (see ``base.ZooEntry``)."""

from __future__ import annotations

import importlib

from qpp.errors import ModelLoadError
from qpp.zoo.base import Batch, EvaluationSet, ZooEntry

# name -> (module, class). Imported lazily: loading transformers or onnx2torch costs seconds.
_ENTRIES: dict[str, tuple[str, str]] = {
    "minilm": ("qpp.zoo.minilm", "MiniLM"),
    "ppocr-rec": ("qpp.zoo.ppocr", "PPOCRRecognition"),
    "ppocr-cls": ("qpp.zoo.ppocr", "PPOCRClassification"),
    "ppocr-det": ("qpp.zoo.ppocr", "PPOCRDetection"),
    "digits-cnn": ("qpp.zoo.digits", "DigitsCNN"),
}


def zoo_names() -> list[str]:
    return list(_ENTRIES)


def entry_class(name: str) -> type[ZooEntry]:
    """The class of zoo entry ``name`` (imports its module)."""
    if name not in _ENTRIES:
        raise ModelLoadError(
            f"'{name}' is not a zoo model; choose one of {', '.join(_ENTRIES)} "
            "(qpp models lists them), or pass a .onnx file, a Hugging Face folder "
            "or file.py:function"
        )
    module_name, class_name = _ENTRIES[name]
    return getattr(importlib.import_module(module_name), class_name)


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``, with its default data sizes."""
    return entry_class(name)()


__all__ = ["Batch", "EvaluationSet", "ZooEntry", "entry_class", "get_entry", "zoo_names"]
