"""What a model costs per sample, in floating-point operations (for QPP's overhead ratio)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


def model_flops(model: torch.nn.Module, batch: Sequence[torch.Tensor]) -> int:
    """FLOPs of one sample's forward, as torch's FLOP counter counts them (matmuls, convs,
    attention: 2 per multiply-add; element-wise ops are not counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*[x[:1] for x in batch])
    return int(counter.get_total_flops())
