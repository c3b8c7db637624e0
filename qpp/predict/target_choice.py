"""Choose, layer by layer, which fit's predicted ranges each uniform layer runs.

``per-layer`` chooses each layer's per-input estimator by the model's output error in
*dynamic* mode, but the deployed model runs *predicted* ranges, and a range that is best per
input is not always one that the input's cheap statistics predict: on ppocr-det at W8A4
(2026-12-06) the per-layer choice lowers the dynamic output error on its calibration batch from
0.518 to 0.173, yet predictors fitted to it give 0.689 in predicted mode, against 0.581 for
predictors fitted to one estimator (percentile 99.9) everywhere (static ranges: 0.646).

So after the predictors have been fitted to each candidate estimator's ranges (each fit a set
of ``LinearQPPredictor`` with the same sources and targets), this module runs one sweep of
coordinate descent over the uniform predicted layers, in graph order: each layer tries the
predictor columns of every other fit, with every other layer fixed, and keeps those that lower
the model's relative output error ``sum ||y_q - y||^2 / sum ||y||^2`` against the float model
by more than ``PER_LAYER_MIN_GAIN``: the white paper's output-error criterion for ranges (§3.1)
applied to what the deployed model runs. The chosen columns are written into one set of
predictors (the base fit's), so the result saves, loads and exports like any fit. One of the
alternatives is ``static_columns``: the layer's calibrated range, for every input.

A fit's features are standardized with its own calibration mean ``μ`` and spread ``σ`` (the
source's values depend on the ranges upstream); columns move between fits exactly, since
``w_0 + ((φ - μ_c) / σ_c) · w = w_0 + ((μ_b - μ_c) / σ_c) · w + ((φ - μ_b) / σ_b) · (σ_b / σ_c) w``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from qpp.errors import ConfigError
from qpp.graph.segments import CutValues, Segments
from qpp.predict.estimator_choice import (
    PER_LAYER_MIN_GAIN,
    Batch,
    relative_output_error,
    suffix_error,
)
from qpp.predict.predictor import LinearQPPredictor
from qpp.predict.qps import (
    QPMode,
    SampleQPs,
    SampleQuantizer,
    Scheme,
    predicted_slots,
    static_range,
)
from qpp.report.progress import progress
from qpp.sim.model import QuantizedModel

#: Calibration batches the sweep runs on (``CHOICE_BATCHES`` at most: the float reference
#: outputs are kept for those).
TARGET_SWEEP_BATCHES = 4
#: The fit name of ``static_columns`` in the sweep and in ``layer_targets``.
STATIC_FIT = "static"
#: The least range end a static column holds (a grid end at 0: a side without values).
RANGE_FLOOR = 1e-12


@dataclass(frozen=True)
class TargetChoice:
    """Which fit each uniform predicted layer's columns came from after
    ``refine_targets_per_layer``, and the relative output error on the batches the sweep
    ran on before (every layer from the base fit) and after."""

    fits: dict[str, str]
    start_error: float
    error: float


def columns_in_basis(
    base: LinearQPPredictor, other: LinearQPPredictor, columns: Sequence[int]
) -> torch.Tensor:
    """``other``'s weight columns ``columns`` (``[1 + F, len(columns)]``) rewritten for
    ``base``'s feature standardization, so that ``base`` with them predicts exactly what
    ``other`` does (module docstring)."""
    if base.feature_names != other.feature_names or base.source != other.source:
        raise ConfigError(
            f"predictors of '{base.source}' and '{other.source}' read different features; "
            "only fits with the same sources and features can share columns"
        )
    weight = other.weight[:, list(columns)].double()
    base_mean, base_std = base.feature_mean.double(), base.feature_std.double()
    mean, std = other.feature_mean.double(), other.feature_std.double()
    slopes = weight[1:] * (base_std / std)[:, None]
    intercept = weight[0] + ((base_mean - mean) / std) @ weight[1:]
    return torch.cat([intercept[None, :], slopes]).to(base.weight.dtype)


def static_columns(
    predictors: Sequence[LinearQPPredictor], samplers: Mapping[str, SampleQuantizer]
) -> list[LinearQPPredictor]:
    """A fit that predicts each uniform predicted layer's calibrated (static) range for every
    input: copies of ``predictors`` whose columns of those layers hold ``log(-lo)`` or
    ``log(hi)`` of the quantizer's static grid as intercept and no slopes (on the
    ``LOG_RANGE_STEP`` grid once predicted, within 0.4 % of the static range).

    As an alternative in the sweep it lets a layer whose per-input range the cheap features
    do not predict keep the static range in predicted mode: the per-layer choice then spans
    static, predicted and mixed models, and a layer takes it only where the model's output
    error drops."""
    static = copy.deepcopy(list(predictors))
    for predictor in static:
        for column, (name, kind) in enumerate(predictor.targets):
            sampler = samplers[name]
            quantizer = sampler.quantizer
            if sampler.scheme is not Scheme.UNIFORM or sampler.mode is not QPMode.PREDICTED:
                continue
            if quantizer.axis is not None:
                continue  # a per-channel static grid has no single range; the column stays
            low, high = static_range(quantizer)
            end = -low if kind == "lo" else high
            predictor.weight[0, column] = math.log(max(end, RANGE_FLOOR))
            predictor.weight[1:, column] = 0.0
    return static


def _columns(predictor: LinearQPPredictor, name: str) -> dict[str, int]:
    return {kind: index for index, (target, kind) in enumerate(predictor.targets) if target == name}


def refine_targets_per_layer(
    model: QuantizedModel,
    samplers: Mapping[str, SampleQuantizer],
    predictors: Sequence[LinearQPPredictor],
    alternatives: Mapping[str, Sequence[LinearQPPredictor]],
    base_name: str,
    batches: Sequence[Batch],
    reference: Sequence[list[torch.Tensor]],
    show_progress: bool = False,
) -> TargetChoice:
    """One sweep over the uniform predicted layers in graph order (module docstring).

    ``predictors``: the installed fit (named ``base_name``), changed in place; ``alternatives``:
    the other fits by name, each with the same sources in the same order. ``reference``: the
    float model's outputs on ``batches[:TARGET_SWEEP_BATCHES]``. The model must be in
    ``predicted`` mode with ``predictors``' hooks installed.
    """
    used = list(batches[:TARGET_SWEEP_BATCHES])
    expected = list(reference[: len(used)])
    owner: dict[str, int] = {}
    for index, predictor in enumerate(predictors):
        for name, _ in predictor.targets:
            sampler = samplers[name]
            if sampler.scheme is Scheme.UNIFORM and sampler.mode is QPMode.PREDICTED:
                owner[name] = index
    for fit, others in alternatives.items():
        if [p.source for p in others] != [p.source for p in predictors]:
            raise ConfigError(f"fit '{fit}' has other predictor sources than '{base_name}'")
    chosen = dict.fromkeys(owner, base_name)
    if not owner or not alternatives:
        error = relative_output_error(model, used, expected)
        return TargetChoice(chosen, round(error, 6), round(error, 6))

    segments = Segments(model.graph_module)
    cuts = {name: segments.cut_of(model.module_target(name)) for name in owner}
    in_graph_order = sorted(owner, key=cuts.__getitem__)
    # Each batch's predicted QPs and source features, recorded while the prefix runs: a try
    # reruns the graph from its layer's cut only, after the sources before it have fired.
    slots: list[dict[str, SampleQPs]] = [{} for _ in used]
    features: list[dict[int, torch.Tensor]] = [{} for _ in used]
    recording: list[int | None] = [None]

    def record(index: int):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            batch = recording[0]
            if batch is None:
                return
            predictor = predictors[index]
            features[batch][index] = predictor.features(args[0])
            for name, _ in predictor.targets:
                if samplers[name].predicted is not None:
                    slots[batch][name] = samplers[name].predicted  # type: ignore[assignment]

        return hook

    hooks = [
        model.quantizer(p.source).register_forward_pre_hook(record(i))
        for i, p in enumerate(predictors)
    ]

    def restore(batch_index: int) -> None:
        for name, slot in slots[batch_index].items():
            samplers[name].predicted = slot

    def advance(values: list[CutValues] | None, start: int, stop: int) -> list[CutValues]:
        result = []
        for batch_index, batch in enumerate(used):
            restore(batch_index)  # the QPs of sources before ``start`` for this batch
            recording[0] = batch_index
            if values is None:
                result.append(segments.prefix(batch, stop))
            else:
                result.append(segments.advance(values[batch_index], start, stop))
        recording[0] = None
        return result

    try:
        first = cuts[in_graph_order[0]]
        crossing = advance(None, 0, first)
        start = best = suffix_error(segments, crossing, first, expected, before=restore)
        for position, name in enumerate(
            progress(in_graph_order, "choose predicted ranges per layer", show_progress)
        ):
            index, cut = owner[name], cuts[name]
            predictor = predictors[index]
            columns = list(_columns(predictor, name).items())
            positions = [column for _, column in columns]
            kept_weight = predictor.weight[:, positions].clone()
            kept_slots = [batch_slots.get(name) for batch_slots in slots]
            for fit, others in alternatives.items():
                other = others[index]
                other_columns = _columns(other, name)
                if set(other_columns) != {kind for kind, _ in columns}:
                    continue  # the fits disagree on the layer's sign; its columns differ
                ordered = [other_columns[kind] for kind, _ in columns]
                predictor.weight[:, positions] = columns_in_basis(predictor, other, ordered)
                for batch_slots, batch_features in zip(slots, features, strict=True):
                    if index in batch_features:  # its source ran before the cut: rewrite
                        qps = predictor.predict_qps(batch_features[index])
                        batch_slots[name] = predicted_slots(predictor.targets, qps)[name]
                error = suffix_error(segments, crossing, cut, expected, before=restore)
                if error < best * (1.0 - PER_LAYER_MIN_GAIN):
                    best, chosen[name] = error, fit
                    kept_weight = predictor.weight[:, positions].clone()
                    kept_slots = [batch_slots.get(name) for batch_slots in slots]
            predictor.weight[:, positions] = kept_weight
            for batch_slots, kept in zip(slots, kept_slots, strict=True):
                if kept is not None:
                    batch_slots[name] = kept
            if position + 1 < len(in_graph_order):
                crossing = advance(crossing, cut, cuts[in_graph_order[position + 1]])
    finally:
        for hook in hooks:
            hook.remove()
        recording[0] = None
    return TargetChoice(chosen, round(start, 6), round(best, 6))
