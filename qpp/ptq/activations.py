"""Run a captured graph and look at intermediate values, without keeping them all.

The PTQ algorithms need per-channel statistics of a few values (CLE's pre-activation minima,
bias correction's mean shifts) or the inputs of one layer (AdaRound). ``Recorder`` runs the
graph node by node (``torch.fx.Interpreter``) and hands each watched value to a callback, so
memory stays at one forward pass plus whatever the callbacks keep; ``stop_after`` ends the pass
early once the last watched node has run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qpp.graph.patterns import WeightLayer

Batch = Sequence[torch.Tensor]
Watcher = Callable[[Node, tuple[object, ...], object], None]


class _Stop(Exception):
    pass


class Recorder(torch.fx.Interpreter):
    """Calls ``watchers[node.name](node, args, output)`` whenever a watched node runs."""

    def __init__(
        self, graph_module: GraphModule, watchers: dict[str, Watcher], stop_early: bool = True
    ) -> None:
        super().__init__(graph_module, garbage_collect_values=True)
        self.watchers = watchers
        order = [n.name for n in graph_module.graph.nodes if n.name in watchers]
        self.last = order[-1] if (order and stop_early) else None

    def run_node(self, node: Node) -> object:
        output = super().run_node(node)
        watcher = self.watchers.get(node.name)
        if watcher is not None:
            args, _ = self.fetch_args_kwargs_from_env(node)
            watcher(node, args, output)
            if node.name == self.last:
                raise _Stop
        return output

    def run_batches(self, batches: Sequence[Batch]) -> None:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Stop):
                    self.run(*batch)


def data_positions(batch: Batch) -> torch.Tensor | None:
    """Which token positions of ``batch`` hold data (bool ``[batch, sequence]``), or ``None``
    for all. For an ``(input_ids, attention_mask, ...)`` batch of integer tensors, qpp's
    convention for transformers (``graph/hf_import.py``), it is the attention mask: padding
    positions are not samples of the data and the model's output ignores them."""
    if len(batch) < 2:
        return None
    ids, mask = batch[0], batch[1]
    if ids.ndim != 2 or mask.shape != ids.shape:
        return None
    if ids.is_floating_point() or mask.is_floating_point():
        return None
    return mask.bool()


def real_positions(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x[mask]`` for values laid out ``[batch, sequence, ...]`` like the bool ``mask``
    (``data_positions``); values of other layouts (attention scores) are kept whole."""

    def part(x: torch.Tensor) -> torch.Tensor:
        return x[mask] if x.ndim >= 2 and x.shape[:2] == mask.shape else x

    return part


def channel_axis(value: torch.Tensor, is_conv: bool) -> int:
    """Channels are dim 1 of a conv's output and the last dim of a linear's."""
    return 1 if is_conv else value.ndim - 1


def reduce_channels(value: torch.Tensor, axis: int, how: str) -> torch.Tensor:
    """``value`` reduced to one number per channel along ``axis`` (``min``, ``max``, ``sum``)."""
    flat = value.detach().movedim(axis, -1).reshape(-1, value.shape[axis])
    if how == "min":
        return flat.amin(0)
    if how == "max":
        return flat.amax(0)
    return flat.double().sum(0)


def layer_rows(layer: WeightLayer, x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """The layer input as rows that multiply the flattened weight: tokens for a linear,
    receptive-field patches (``unfold``) for a conv."""
    if not layer.is_conv:
        return x.reshape(-1, x.shape[-1])
    dims = len(kernel)
    pad, stride, dilation = (
        _per_dim(v, dims) for v in (layer.padding, layer.stride, layer.dilation)
    )
    if x.ndim == 3:  # conv1d as a conv2d of height 1
        x = x.unsqueeze(2)
        kernel, pad, stride, dilation = (1, *kernel), (0, *pad), (1, *stride), (1, *dilation)
    patches = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _per_dim(values: tuple[int, ...], dims: int) -> tuple[int, ...]:
    return values * dims if len(values) == 1 else values
