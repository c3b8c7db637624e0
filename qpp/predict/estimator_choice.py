"""Choose the per-input range estimator of dynamic uniform QPs on calibration data.

Which per-input range is best depends on the model, not only on the bit-width: measured with
W8 weights, 4-bit activations on ppocr-cls (accuracy over 300 lines, static MSE ranges 71.3):
min-max 55.7, percentile 99.99 67.3, percentile 99.9 78.0, MSE 58.3; on all-MiniLM-L6-v2 (A4,
mean cosine, static 0.748): min-max 0.463, percentile 99.99 0.614, percentile 99.9 0.717, MSE
0.706 (MSE then searched a coarse grid; on the full grid, 2026-12-05: ppocr-cls 77.7 against
static 74.3 and percentile 99.9 73.7, MiniLM 0.725 against static 0.744). In both, the order
of the candidates' relative output error against the float model on the calibration batches
was the order of their task metric on held-out data. So ``auto`` runs each candidate on a few
calibration batches and keeps the one whose outputs are closest to the
float model's, the white paper's criterion for range setting (§3.1: ranges chosen by the
network's output error rather than each tensor's own error), applied to per-input ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from qpp.errors import ConfigError
from qpp.graph.outputs import compared_leaves
from qpp.graph.segments import CutValues, Segments
from qpp.predict.qps import QPMode, SampleQuantizer, Scheme
from qpp.report.progress import progress
from qpp.sim.model import QuantizedModel

Batch = Sequence[torch.Tensor]
#: The per-input estimators ``auto`` tries, in order of preference on ties.
CANDIDATE_ESTIMATORS = ("minmax", "percentile:99.99", "percentile:99.9", "mse")
#: Calibration batches the choice runs on (each candidate runs the model on all of them).
CHOICE_BATCHES = 4
#: Calibration batches the per-layer refinement runs on: it runs the model from each layer
#: on ``len(candidates) - 1`` times.
PER_LAYER_BATCHES = 1
#: A layer takes another estimator when it lowers the output error by more than this share.
PER_LAYER_MIN_GAIN = 1e-3


@dataclass(frozen=True)
class EstimatorChoice:
    """The chosen estimator and every candidate's relative output error
    ``sum ||y_q - y||^2 / sum ||y||^2`` against the float model on the calibration batches,
    and the static (calibrated) ranges' error on the same batches for reference: where it is
    the lowest, per-input ranges do not pay on this model (measured: MiniLM at A4, static 0.51
    against 0.56 for the best per-input estimator, and a mean cosine of 0.748 against 0.717)."""

    chosen: str
    errors: dict[str, float]
    static_error: float
    #: The float model's outputs on ``batches[:CHOICE_BATCHES]``, for later comparisons.
    reference: list[list[torch.Tensor]] = field(default_factory=list, repr=False)


def _outputs(model: QuantizedModel, batch: Batch) -> list[torch.Tensor]:
    return compared_leaves(model.graph_module, model(*batch))


@contextmanager
def quantization_off(model: QuantizedModel) -> Iterator[None]:
    """Within the block, every quantizer of ``model`` passes its input through (the float
    model, BN folded)."""
    quantizers = [model.quantizer(name) for name in model.names]
    saved = [q.enabled for q in quantizers]
    try:
        for quantizer in quantizers:
            quantizer.enabled = False
        yield
    finally:
        for quantizer, enabled in zip(quantizers, saved, strict=True):
            quantizer.enabled = enabled


def relative_output_error(
    model: QuantizedModel, batches: Sequence[Batch], reference: Sequence[list[torch.Tensor]]
) -> float:
    """``sum ||y_q - y||^2 / sum ||y||^2`` over every output of ``batches``, softmax outputs
    as log-probabilities (``compared_leaves``)."""
    with torch.no_grad():
        return relative_error((_outputs(model, batch) for batch in batches), reference)


def relative_error(
    outputs: Iterable[list[torch.Tensor]], reference: Sequence[list[torch.Tensor]]
) -> float:
    """``sum ||y_q - y||^2 / sum ||y||^2`` over the batches' output tensors (each batch a list
    of tensors, in the same order in ``outputs`` and ``reference``)."""
    error = energy = 0.0
    for actual, expected in zip(outputs, reference, strict=True):
        for value, target in zip(actual, expected, strict=True):
            error += float((value - target).square().sum())
            energy += float(target.square().sum())
    return error / max(energy, 1e-30)


def choose_dynamic_estimator(
    model: QuantizedModel,
    samplers: Iterable[SampleQuantizer],
    batches: Sequence[Batch],
    candidates: Sequence[str] = CANDIDATE_ESTIMATORS,
    show_progress: bool = False,
) -> EstimatorChoice:
    """Run ``model`` with each candidate estimator on the uniform ``samplers`` (dynamic mode)
    and keep the one with the lowest relative output error on ``batches[:CHOICE_BATCHES]``.

    Leaves every sampler with the chosen estimator and its mode as it found it.
    """
    uniform = [s for s in samplers if s.scheme is Scheme.UNIFORM]
    if not uniform or not candidates:
        raise ConfigError("choosing a per-input estimator needs uniform activation quantizers")
    used = list(batches[:CHOICE_BATCHES])
    with quantization_off(model), torch.no_grad():
        reference = [_outputs(model, batch) for batch in used]
    modes = [s.mode for s in uniform]
    try:
        for sampler in uniform:
            sampler.mode = QPMode.STATIC
        static_error = relative_output_error(model, used, reference)
    finally:
        for sampler, mode in zip(uniform, modes, strict=True):
            sampler.mode = mode
    named = {sampler.quantizer.name: sampler for sampler in uniform}
    mixes = {candidate: dict.fromkeys(named, candidate) for candidate in candidates}
    errors = mix_errors(
        model, named, mixes, used, reference, show_progress, "choose per-input ranges"
    )
    chosen = min(errors, key=lambda name: (errors[name], list(errors).index(name)))
    for sampler in uniform:
        sampler.estimator = chosen
    return EstimatorChoice(
        chosen,
        {name: round(value, 6) for name, value in errors.items()},
        round(static_error, 6),
        reference,
    )


@dataclass(frozen=True)
class LayerChoice:
    """Each layer's per-input estimator after ``refine_per_layer``, and the relative output
    error on the batches it ran on before (``auto``'s single choice) and after."""

    estimators: dict[str, str]
    start_error: float
    error: float


def refine_per_layer(
    model: QuantizedModel,
    samplers: Mapping[str, SampleQuantizer],
    batches: Sequence[Batch],
    reference: Sequence[list[torch.Tensor]],
    candidates: Sequence[str] = CANDIDATE_ESTIMATORS,
    show_progress: bool = False,
    sweep_batches: int = PER_LAYER_BATCHES,
) -> LayerChoice:
    """One sweep of coordinate descent on each layer's per-input estimator, in graph order
    (the order the layers run): with every other layer fixed, each uniform layer tries the
    ``candidates`` and keeps the one that lowers the relative output error
    ``sum ||y_q - y||^2 / sum ||y||^2`` on ``batches[:sweep_batches]`` (``reference``: the
    float outputs of those batches) by more than ``PER_LAYER_MIN_GAIN``.

    The white paper's output-error criterion for ranges (§3.1) chosen per layer, where
    ``choose_dynamic_estimator`` chooses one estimator for the whole model: the best clipping
    differs between layers (measured on MiniLM at A4, 2026-12-06: relative output error
    0.394 after the refinement on its one batch, where MSE everywhere had 0.556 and the static
    ranges 0.510 on four; held-out mean cosine 0.799 against 0.726 and 0.746). Starts from
    the samplers' current estimators (``auto``'s choice); the samplers keep the refined
    estimators and their modes.

    Layers are tried in graph order, and each try runs only the graph from that layer's
    quantizer on (``qpp.graph.segments``): nothing before it changes, so the values crossing
    that point are computed once per layer and the sweep costs about half the full runs.
    """
    uniform = {name: s for name, s in samplers.items() if s.scheme is Scheme.UNIFORM}
    used = list(batches[:sweep_batches])
    expected = list(reference[: len(used)])
    segments = Segments(model.graph_module)
    cuts = {name: segments.cut_of(model.module_target(name)) for name in uniform}
    in_graph_order = sorted(uniform, key=cuts.__getitem__)
    modes = {name: s.mode for name, s in uniform.items()}
    try:
        for sampler in uniform.values():
            sampler.mode = QPMode.DYNAMIC
        start = best = relative_output_error(model, used, expected)
        first = cuts[in_graph_order[0]] if in_graph_order else 0
        crossing = [segments.prefix(batch, first) for batch in used]
        for index, name in enumerate(
            progress(in_graph_order, "choose ranges per layer", show_progress)
        ):
            sampler, cut = uniform[name], cuts[name]
            kept = sampler.estimator
            for candidate in candidates:
                if candidate == kept:
                    continue
                sampler.estimator = candidate
                error = suffix_error(segments, crossing, cut, expected)
                if error < best * (1.0 - PER_LAYER_MIN_GAIN):
                    best, kept = error, candidate
            sampler.estimator = kept
            if index + 1 < len(in_graph_order):
                following = cuts[in_graph_order[index + 1]]
                crossing = [segments.advance(values, cut, following) for values in crossing]
    finally:
        for name, sampler in uniform.items():
            sampler.mode = modes[name]
    estimators = {name: s.estimator for name, s in uniform.items()}
    return LayerChoice(estimators, round(start, 6), round(best, 6))


def mix_errors(
    model: QuantizedModel,
    samplers: Mapping[str, SampleQuantizer],
    mixes: Mapping[str, Mapping[str, str]],
    batches: Sequence[Batch],
    reference: Sequence[list[torch.Tensor]],
    show_progress: bool = False,
    label: str = "compare per-input ranges",
    offsets: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """The dynamic-mode relative output error of each per-layer estimator assignment in
    ``mixes`` (by name; each maps sampler names to estimators) on ``batches`` (``reference``:
    their float outputs), unrounded. ``offsets``, by mix name: the layers' range offsets
    (``SampleQuantizer.range_offset``) that mix runs with. Leaves every sampler's mode,
    estimator and offset as it found them."""
    used = list(batches)
    expected = list(reference[: len(used)])
    saved = {name: (s.mode, s.estimator, s.range_offset) for name, s in samplers.items()}
    errors: dict[str, float] = {}
    try:
        for name, mix in progress(list(mixes.items()), label, show_progress):
            shifts = (offsets or {}).get(name, {})
            for layer, sampler in samplers.items():
                sampler.mode = QPMode.DYNAMIC
                sampler.estimator = mix.get(layer, saved[layer][1])
                sampler.range_offset = shifts.get(layer, saved[layer][2])
            errors[name] = relative_output_error(model, used, expected)
    finally:
        for layer, (mode, estimator, offset) in saved.items():
            samplers[layer].mode, samplers[layer].estimator = mode, estimator
            samplers[layer].range_offset = offset
    return errors


def suffix_error(
    segments: Segments,
    crossing: Sequence[CutValues],
    cut: int,
    reference: Sequence[list[torch.Tensor]],
    before: Callable[[int], None] | None = None,
) -> float:
    """``relative_output_error`` of the batches whose values crossing ``cut`` are ``crossing``,
    running only the graph from ``cut`` on; ``before(i)`` runs before batch ``i``'s run."""

    def outputs() -> Iterator[list[torch.Tensor]]:
        for index, values in enumerate(crossing):
            if before is not None:
                before(index)
            yield compared_leaves(segments.graph_module, segments.outputs(values, cut))

    return relative_error(outputs(), reference)
