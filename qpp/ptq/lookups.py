"""Lookup tables (embeddings) at low bit-widths: per-row asymmetric ranges, constant rows absorbed.

A lookup reads whole rows of its table, one per token, so each row is a channel of its own:
quantizing per row (axis 0) with an asymmetric grid and an MSE range per row (white paper
§3.1, eq. 6 on each row) fits each token's vector instead of the table's worst row. AdaRound
does not apply (a lookup has no input to reconstruct), so the range is all there is.

A lookup whose indices are constant and all equal (BERT's token-type embedding of a
single-segment model: row 0 for every token) adds the same vector to every position. When it
is summed with an input-dependent lookup (the word embedding), that vector is added to every
row of the word table and its own row set to zero, which quantizes exactly: the float model's
output is unchanged (the same additions in the same order) and one quantization error is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from qpp.graph.patterns import Lookup, get_attr, lookup_sums, lookups, used_once
from qpp.ptq.activations import Batch, Recorder
from qpp.sim.model import QuantizedModel


@dataclass(frozen=True)
class LookupConfig:
    """``absorb_constant``: fold constant lookups into their summed input-dependent lookup;
    ``symmetric`` / ``estimator``: the per-row grid of every lookup table's quantizer."""

    absorb_constant: bool = True
    symmetric: bool = False
    estimator: str = "mse"


@dataclass
class LookupReport:
    """``absorbed``: constant table -> the table its row was added to; ``per_row``: the
    quantizers set to per-row ranges."""

    absorbed: dict[str, str] = field(default_factory=dict)
    per_row: list[str] = field(default_factory=list)


def constant_row(qmodel: QuantizedModel, lookup: Lookup, batch: Batch) -> int | None:
    """The one row ``lookup`` reads for every position, or ``None`` when its indices vary.

    The indices do not depend on the input's values (``lookup.input_dependent`` is false), so
    one batch shows them all."""
    seen: list[torch.Tensor] = []

    def watch(node: Node, args: tuple[object, ...], output: object) -> None:
        seen.append(args[1])  # type: ignore[arg-type]

    Recorder(qmodel.graph_module, {lookup.name: watch}).run_batches([batch])
    if not seen or seen[0].numel() == 0:
        return None
    indices = seen[0]
    first = int(indices.reshape(-1)[0])
    return first if bool((indices == first).all()) else None


def absorb_constant_lookups(qmodel: QuantizedModel, batch: Batch) -> dict[str, str]:
    """Add each constant lookup's row to every row of an input-dependent lookup it is summed
    with (the one it is added to directly when there is one), then zero that row.

    Tables used by more than one op (tied weights) are left alone."""
    graph_module = qmodel.graph_module
    absorbed: dict[str, str] = {}
    for group in lookup_sums(graph_module):
        targets = [lookup for lookup in group.lookups if lookup.input_dependent]
        for lookup in group.lookups:
            if lookup.input_dependent or not targets or not used_once(graph_module, lookup.table):
                continue
            partners = {
                a if b == lookup.name else b for a, b in group.pairs if lookup.name in (a, b)
            }
            target = next((t for t in targets if t.name in partners), targets[0])
            if not used_once(graph_module, target.table):
                continue
            row = constant_row(qmodel, lookup, batch)
            if row is None:
                continue
            table, into = get_attr(graph_module, lookup.table), get_attr(graph_module, target.table)
            if table.shape[1:] != into.shape[1:]:
                continue
            with torch.no_grad():
                into.add_(table[row])
                table[row] = 0.0
            absorbed[lookup.table] = target.table
    return absorbed


def quantize_lookups(
    qmodel: QuantizedModel, data: Sequence[Batch], config: LookupConfig | None = None
) -> LookupReport:
    """Absorb constant lookups (needs one batch of ``data``) and give every lookup table's
    weight quantizer a per-row grid; the encodings are computed with the other weights."""
    config = config or LookupConfig()
    report = LookupReport()
    if config.absorb_constant and data:
        report.absorbed = absorb_constant_lookups(qmodel, data[0])
    tables = {lookup.table for lookup in lookups(qmodel.graph_module)}
    for quantizer, _ in qmodel.weight_quantizers():
        if qmodel.weight_target(quantizer.name) not in tables:
            continue
        quantizer.set_spec(
            quantizer.spec.with_changes(
                granularity="per-channel",
                axis=0,
                symmetric=config.symmetric,
                estimator=config.estimator,
            )
        )
        report.per_row.append(quantizer.name)
    return report
