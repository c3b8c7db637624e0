"""Checking and loading user data: batches of model inputs, npz files."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qpp.errors import DataError

Batch = tuple[torch.Tensor, ...]


def check_batches(
    batches: Sequence[Sequence[torch.Tensor]] | torch.Tensor, what: str
) -> list[Batch]:
    """``batches`` as a list of tuples of tensors, refusing empty data and NaN/Inf values."""
    if isinstance(batches, torch.Tensor):
        batches = [(batches,)]
    checked: list[Batch] = []
    for index, batch in enumerate(batches):
        batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
        for position, x in enumerate(batch):
            if not isinstance(x, torch.Tensor):
                raise DataError(
                    f"{what} batch {index} input {position} is a {type(x).__name__}, "
                    "not a torch.Tensor"
                )
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise DataError(
                    f"{what} data batch {index} input {position} holds {bad} NaN/Inf "
                    "values; clean or drop those samples before quantizing"
                )
        if batch and int(batch[0].shape[0]) > 0:
            checked.append(batch)
    if not checked:
        raise DataError(f"{what} data has no samples; give at least one batch with one sample")
    return checked
