"""Load a Hugging Face model folder as a plain module: ``(input_ids, attention_mask) -> hidden``.

``transformers`` models take keyword arguments and return ``ModelOutput`` objects; capture
(torch.export) and quantization want positional tensors in and one tensor out, so the loaded
model is wrapped in ``HFEncoder``. Loading is offline: only files in the folder are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from qpp.errors import ModelLoadError

#: Weight files ``from_pretrained`` reads (sharded checkpoints come with an index file).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class HFEncoder(torch.nn.Module):
    """A ``transformers`` model called positionally, returning ``last_hidden_state`` (N x L x H)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def looks_like_hf_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a ``config.json`` (a ``save_pretrained`` folder)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the per-load progress bar of ``transformers``, restoring the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_hf_pretrained(path: str | Path, attn_implementation: str = "eager") -> torch.nn.Module:
    """The ``AutoModel`` saved in folder ``path``, in eval mode, with every weight loaded.

    ``attn_implementation="eager"`` keeps attention as matmul → softmax → matmul, so each of
    those gets its own quantizer; "sdpa" fuses them into one ``scaled_dot_product_attention``.
    Raises ``ModelLoadError`` for a missing folder, a missing ``config.json``, missing or
    unreadable weights, or weights that do not cover the architecture in ``config.json``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"Hugging Face folder {path} does not exist; check the path")
    if not path.is_dir():
        raise ModelLoadError(
            f"{path} is a file, not a Hugging Face model folder; pass the folder holding "
            "config.json and the weights"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json, so it is not a Hugging Face model folder; pass a folder "
            "written by save_pretrained (config.json plus model.safetensors)"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{path} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); copy the "
            "weight file into the folder"
        )

    from transformers import AutoModel

    try:
        with _quiet_transformers():
            model, info = AutoModel.from_pretrained(
                path,
                local_files_only=True,
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ...
        message = str(error).strip()
        reason = message.splitlines()[0].rstrip(".") if message else type(error).__name__
        raise ModelLoadError(
            f"cannot load the Hugging Face model in {path}: {reason}; check that config.json and "
            "the weight files are complete and saved by the same model"
        ) from error

    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelLoadError(
            f"the weights in {path} lack {len(missing)} parameters of the model in config.json "
            f"({shown}); save the weights and config.json from the same model"
        )
    return model.eval()


def load_hf_folder(path: str | Path, attn_implementation: str = "eager") -> torch.nn.Module:
    """The model in Hugging Face folder ``path`` as ``HFEncoder``: positional
    ``(input_ids, attention_mask)`` in, ``last_hidden_state`` out, in eval mode."""
    return HFEncoder(load_hf_pretrained(path, attn_implementation)).eval()
