"""Set up static, dynamic or predicted activation QPs on a calibrated ``QuantizedModel``.

``configure_activation_qps(qmodel, batches, settings)`` attaches a ``SampleQuantizer`` to every
enabled activation quantizer, records the exact per-sample QPs on the calibration batches (the
Dense+Sparse static thresholds are their mean; the predictor's targets are their logs), fits
one ``LinearQPPredictor`` per feature source, and returns an ``ActivationQPs`` handle that
switches modes, tracks outlier densities, counts the overhead and saves its state.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qpp.errors import ConfigError, EncodingsError
from qpp.predict.cost import model_flops
from qpp.predict.estimator_choice import (
    CHOICE_BATCHES,
    PER_LAYER_MIN_GAIN,
    choose_dynamic_estimator,
    mix_errors,
    refine_per_layer,
    relative_output_error,
)
from qpp.predict.offsets import fit_dynamic_offsets, fit_offsets
from qpp.predict.predictor import (
    LinearQPPredictor,
    check_feature_names,
    default_features,
    feature_flops,
    sample_features,
)
from qpp.predict.qps import (
    AUTO_ESTIMATOR,
    CHOSEN_ESTIMATORS,
    PER_LAYER_ESTIMATOR,
    STATIC_ESTIMATOR,
    QPMode,
    SampleQPs,
    SampleQuantizer,
    Scheme,
    check_dynamic_estimator,
    check_layer_estimator,
    parse_mode,
    parse_scheme,
    predicted_slots,
)
from qpp.predict.target_choice import (
    STATIC_FIT,
    TARGET_SWEEP_BATCHES,
    refine_targets_per_layer,
    static_columns,
)
from qpp.quant.dense_sparse import (
    check_outlier_fraction,
    dense_sparse_floor,
    min_dense_sparse_elements,
)
from qpp.report.progress import progress
from qpp.sim.config import QuantConfig
from qpp.sim.model import QUANTIZER_ROOT, QuantizedModel
from qpp.sim.quantizer import Quantizer, QuantizerKind

Batch = Sequence[torch.Tensor]
#: ``sources="auto"`` places as many predictors as fit in ``overhead_budget`` of the model's
#: FLOPs, at most this many, each reading ``DEFAULT_FEATURE_ELEMENTS`` of its source. On
#: ppocr-cls (98 activation quantizers) 16 predictors fit the Dense+Sparse thresholds with a
#: median R^2 of 0.63, against 0.17 for one predictor on the input (0.42 % of the FLOPs); on
#: MiniLM (48) the spread of the achieved outlier fraction over inputs falls from 0.0028
#: (static) to 0.0017 with 16 predictors, 0.0013 with 32, 0.0011 with 48 (0.02-0.06 %), and
#: W8A8 uniform predicted closes 70 % (32) or 87 % (48) of the static-to-dynamic gap; on
#: ppocr-det (106) W8A4 uniform predicted closes 19 % of the gap with 64 predictors and 96 %
#: with 106 (0.11 % of the FLOPs). With as many sources as quantizers, each quantizer's QPs
#: come from a 2048-element sample of its own input, the dense end of the paper's predictors
#: at several depths; the budget, not this cap, decides on the zoo models.
MAX_AUTO_SOURCES = 256
#: Uniform predicted QPs with ``estimator="auto"``: the predictors are fitted to the targets of
#: this many per-input estimators, those with the lowest dynamic output error, and the fit whose
#: predicted-mode output error is lowest is kept. The estimator that is best per input is not
#: always the one best predicted: a noisy per-input range (MSE) regresses to a mean range that
#: clips. Measured 2026-12-05 (W8, predicted-mode relative output error on calibration data /
#: held-out metric): ppocr-cls A4, MSE 0.364 / 74.3 % vs percentile 99.9 0.312 / 77.0 %
#: (dynamic MSE 77.7 %, static 74.3 %); MiniLM A4, MSE 0.556 / 0.726 vs percentile 99.9
#: 0.528 / 0.732 mean cosine. The predicted-mode error ranked the task metric the same way in
#: every case measured.
TARGET_CANDIDATES = 2
DEFAULT_FEATURE_ELEMENTS = 2048
#: ``per-layer``, predicted: what ``dynamic`` mode may run (``_choose_dynamic_mix``), by
#: name: the dynamic sweep's per-layer estimators, the estimator mix the predictors' columns
#: came from (``layer_targets``), that mix with the predictors' log offsets on its exact ranges,
#: and either mix with offsets refitted on the exact ranges (``fit_dynamic_offsets``).
CHOSEN_MIX = "chosen"
DYNAMIC_MIXES: dict[str, str] = {
    CHOSEN_MIX: "per-layer choice",
    "targets": "predictors' mix",
    "targets_offsets": "predictors' mix and offsets",
    "chosen_fitted": "per-layer choice, fitted offsets",
    "targets_fitted": "predictors' mix, fitted offsets",
}
STATE_FILES = ("activation_qps.json", "activation_qps.safetensors")


@dataclass(frozen=True)
class ActivationQPSettings:
    """How activation QPs are chosen: ``mode`` x ``scheme`` (QPP §3)."""

    mode: str = "static"
    scheme: str = "uniform"
    outlier_fraction: float = 0.01
    #: The per-sample range estimator of dynamic uniform QPs (and the predictor's targets).
    estimator: str = "auto"
    #: The predictor's features; empty = the scheme's default (``default_features``).
    features: tuple[str, ...] = ()
    #: Quantizers whose inputs feed a predictor; empty = ``source_count`` of them, evenly
    #: spaced over the run order from the first activation quantizer on.
    sources: tuple[str, ...] = ()
    #: None: as many as ``overhead_budget`` allows (at most ``MAX_AUTO_SOURCES``).
    source_count: int | None = None
    #: The predictors' share of the model's FLOPs that ``source_count=None`` may spend.
    overhead_budget: float = 0.005
    #: Predicted Dense+Sparse thresholds are raised by this many residual standard deviations
    #: of the fit (log space): a threshold predicted a little too low turns every value tied
    #: at the true threshold (a saturated image background, a clipped activation) into an
    #: outlier, while one a little too high costs a few dense values' resolution.
    threshold_margin: float = 0.0
    #: Shift each layer's predicted QPs by the log offset that serves its scheme best on the
    #: calibration data: the outlier density closest to the target (Dense+Sparse), the least
    #: quantization error (uniform); ``qpp.predict.offsets``.
    fit_offsets: bool = True
    #: The features read at most this many elements of each source per sample (None: all).
    feature_elements: int | None = DEFAULT_FEATURE_ELEMENTS
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        parse_mode(self.mode)
        parse_scheme(self.scheme)
        check_outlier_fraction(self.outlier_fraction)
        check_dynamic_estimator(self.estimator)
        if not self.features:
            object.__setattr__(self, "features", default_features(self.scheme))
        check_feature_names(self.features)
        if not self.ridge >= 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge}")
        if self.source_count is not None and self.source_count < 1:
            raise ConfigError(
                f"the predictor needs at least one source, got {self.source_count}; e.g. auto:8"
            )
        if self.feature_elements is not None and self.feature_elements < 16:
            raise ConfigError(
                f"predictor features need at least 16 elements per sample, got "
                f"{self.feature_elements}; e.g. 4096, or none for all"
            )

    @property
    def needs_per_sample(self) -> bool:
        return not (self.mode == "static" and self.scheme == "uniform")


def execution_order(model: QuantizedModel) -> list[Quantizer]:
    """Activation quantizers in the order the graph runs them (first call of each)."""
    seen: dict[str, Quantizer] = {}
    for node in model.graph_module.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(f"{QUANTIZER_ROOT}."):
            quantizer = model.graph_module.get_submodule(str(node.target))
            if isinstance(quantizer, Quantizer) and quantizer.kind is QuantizerKind.ACTIVATION:
                seen.setdefault(quantizer.name, quantizer)
    return list(seen.values())


def calibrated_activations(model: QuantizedModel) -> list[Quantizer]:
    """The enabled, calibrated activation quantizers in run order: those that can take
    per-sample QPs."""
    return [q for q in execution_order(model) if q.enabled and q.calibrated]


@dataclass
class LayerDensity:
    """The achieved outlier fraction of one layer: per sample, and its mean and std."""

    name: str
    values: torch.Tensor

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def std(self) -> float:
        return float(self.values.std(correction=0))


@dataclass
class ActivationQPs:
    """The per-sample QP machinery attached to a model (see module docstring)."""

    model: QuantizedModel
    settings: ActivationQPSettings
    samplers: dict[str, SampleQuantizer]
    predictors: list[LinearQPPredictor] = field(default_factory=list)
    fit_r_squared: dict[str, float] = field(default_factory=dict)
    #: The log offsets ``fit_offsets`` added to each layer's predicted QPs.
    qp_offsets: dict[str, float] = field(default_factory=dict)
    #: ``estimator="auto"``: each candidate per-input estimator's relative output error on the
    #: calibration batches (``qpp.predict.estimator_choice``); ``settings`` holds the choice.
    estimator_errors: dict[str, float] = field(default_factory=dict)
    #: The static ranges' relative output error on the same batches (None without a choice).
    static_output_error: float | None = None
    #: The per-input estimator whose QPs the predictors were fitted to (uniform predicted):
    #: with ``estimator="auto"``, the candidate whose predicted-mode output error is lowest
    #: (``TARGET_CANDIDATES``), not always the dynamic choice in ``settings``.
    target_estimator: str | None = None
    #: Each target candidate's predicted-mode relative output error on calibration data.
    target_errors: dict[str, float] = field(default_factory=dict)
    #: ``estimator="per-layer"``: each uniform layer's per-input estimator
    #: (``qpp.predict.estimator_choice.refine_per_layer``); empty otherwise.
    layer_estimators: dict[str, str] = field(default_factory=dict)
    #: The relative output error before and after the per-layer refinement, on the batches
    #: it ran on (None without it).
    per_layer_errors: tuple[float, float] | None = None
    #: ``estimator="per-layer"``, predicted: the per-input estimator whose fit predicts each
    #: uniform layer's ranges, chosen layer by layer in predicted mode
    #: (``qpp.predict.target_choice``); empty otherwise.
    layer_targets: dict[str, str] = field(default_factory=dict)
    #: The relative output error before and after that choice, on the batches it ran on.
    layer_target_errors: tuple[float, float] | None = None
    #: ``estimator="per-layer"``, predicted: the dynamic-mode output error of each candidate
    #: of ``DYNAMIC_MIXES`` on the target sweep's batches (``_choose_dynamic_mix``).
    dynamic_mix_errors: dict[str, float] = field(default_factory=dict)
    #: The candidate of ``DYNAMIC_MIXES`` that ``dynamic`` mode runs.
    dynamic_mix: str = CHOSEN_MIX
    #: The range offsets (log factors on exact ranges) ``dynamic`` mode runs with, by layer.
    dynamic_offsets: dict[str, float] = field(default_factory=dict)
    #: The dynamic-mode output error before and after the second per-layer sweep of the
    #: dynamic estimators, on the target sweep's batches (``_choose_dynamic_mix``).
    dynamic_sweep_errors: tuple[float, float] | None = None
    _hooks: list[Any] = field(default_factory=list)

    # --- estimators -------------------------------------------------------------------------

    @property
    def dynamic_estimator_label(self) -> str:
        """What ``dynamic`` mode runs: one estimator, or ``per-layer (mse 34, minmax 4)``."""
        if not self.layer_estimators:
            return self.settings.estimator
        return f"{PER_LAYER_ESTIMATOR} ({_estimator_counts(self.layer_estimators)})"

    @property
    def target_label(self) -> str | None:
        """What the predictors were fitted to: one estimator, ``per-layer``, or after the
        layer-by-layer choice of fits ``per-layer (percentile:99.9 80, mse 13)``."""
        if not self.layer_targets:
            return self.target_estimator
        return f"{PER_LAYER_ESTIMATOR} ({_estimator_counts(self.layer_targets)})"

    def target_assignment(self) -> dict[str, str]:
        """The per-input estimator whose QPs each uniform layer's predictor was fitted to."""
        uniform = [n for n, s in self.samplers.items() if s.scheme is Scheme.UNIFORM]
        if self.layer_targets:
            return {  # a layer on its static range is paired with its own per-input ranges
                name: self.samplers[name].estimator
                if self.layer_targets.get(name, STATIC_FIT) == STATIC_FIT
                else self.layer_targets[name]
                for name in uniform
            }
        if self.target_estimator == PER_LAYER_ESTIMATOR:
            return {name: self.layer_estimators[name] for name in uniform}
        if self.target_estimator is None:
            return {name: self.samplers[name].estimator for name in uniform}
        return dict.fromkeys(uniform, self.target_estimator)

    # --- modes ------------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        """Switch every attached quantizer to ``static``, ``dynamic`` or ``predicted``."""
        chosen = parse_mode(mode)
        if chosen is QPMode.PREDICTED and not self.predictors:
            raise ConfigError("no predictor was fitted; configure with mode 'predicted' first")
        predicted = {name for p in self.predictors for name, _ in p.targets}
        for name, sampler in self.samplers.items():
            # Quantizers before the first feature source cannot be predicted: they stay static.
            if chosen is QPMode.PREDICTED and name not in predicted:
                sampler.mode = QPMode.STATIC
            else:
                sampler.mode = chosen
            sampler.predicted = None

    def detach(self) -> None:
        """Remove the predictors' hooks and the per-sample QPs: the model is static again."""
        self.detach_predictors()
        for sampler in self.samplers.values():
            sampler.quantizer.per_sample = None

    def detach_predictors(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # --- densities --------------------------------------------------------------------------

    @contextmanager
    def tracking_density(self) -> Iterator[list[LayerDensity]]:
        """Collect the achieved outlier fraction per sample of each Dense+Sparse layer."""
        for sampler in self.samplers.values():
            sampler.densities = []
        result: list[LayerDensity] = []
        try:
            yield result
        finally:
            for name, sampler in self.samplers.items():
                if sampler.densities:
                    result.append(LayerDensity(name, torch.cat(sampler.densities)))
                sampler.densities = None

    @contextmanager
    def pairing_qps(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Collect predicted and exact QPs side by side (main QP: ``hi`` or the threshold)
        for every predicted layer while the block runs (in ``predicted`` mode). The exact QPs
        are those the predictors were fitted to: uniform ranges of ``target_estimator``; only
        predicted layers swap to it (a dynamic layer keeps its own estimator)."""
        estimators = {name: s.estimator for name, s in self.samplers.items()}
        for name, estimator in self.target_assignment().items():
            if self.samplers[name].mode is QPMode.PREDICTED:
                self.samplers[name].estimator = estimator
        for sampler in self.samplers.values():
            sampler.pairs = []
        result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            yield result
        finally:
            for name, estimator in estimators.items():
                self.samplers[name].estimator = estimator
            for name, sampler in self.samplers.items():
                if sampler.pairs:
                    main = "threshold" if sampler.scheme is Scheme.DENSE_SPARSE else "hi"
                    predicted = torch.cat([getattr(p, main) for p, _ in sampler.pairs])
                    exact = torch.cat([getattr(e, main) for _, e in sampler.pairs])
                    result[name] = (predicted, exact)
                sampler.pairs = None

    # --- predictor hooks --------------------------------------------------------------------

    def _install_predictors(self) -> None:
        for predictor in self.predictors:
            source = self.model.quantizer(predictor.source)
            self._hooks.append(source.register_forward_pre_hook(self._predict_hook(predictor)))

    def _predict_hook(self, predictor: LinearQPPredictor):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not any(
                self.samplers[name].mode is QPMode.PREDICTED for name, _ in predictor.targets
            ):
                return
            qps = predictor.predict_qps(predictor.features(args[0]), self.settings.threshold_margin)
            assign_predictions(self.samplers, predictor.targets, qps)

        return hook

    # --- cost -------------------------------------------------------------------------------

    def overhead_flops(self, batch: Batch) -> dict[str, int]:
        """Per-sample operations that choosing QPs adds: the predictors (features + linear map)
        and, for comparison, the dynamic scheme's reductions (min and max, or a quantile
        selection, over every quantized activation that dynamic mode does not run on its static
        range: ~2 operations per element)."""
        sizes = sample_sizes(self.model, batch)
        predictor = sum(p.flops(sizes.get(p.source, 0)) for p in self.predictors)
        reduced = [n for n, s in self.samplers.items() if s.estimator != STATIC_ESTIMATOR]
        return {"predictor": predictor, "dynamic": 2 * sum(sizes[name] for name in reduced)}

    # --- persistence ------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        layers = {}
        for index, (name, sampler) in enumerate(self.samplers.items()):
            layers[name] = {
                "nonnegative": sampler.nonnegative,
                "floor": sampler.floor if math.isfinite(sampler.floor) else None,
                "scheme": sampler.scheme.value,
            }
            if name in self.layer_estimators:
                layers[name]["estimator"] = self.layer_estimators[name]
            if name in self.layer_targets:
                layers[name]["target"] = self.layer_targets[name]
            if name in self.dynamic_offsets:
                layers[name]["dynamic_offset"] = self.dynamic_offsets[name]
            if sampler.static_threshold is not None:
                tensors[f"threshold.{index}"] = sampler.static_threshold.reshape(1).contiguous()
                layers[name]["threshold"] = f"threshold.{index}"
        predictors = []
        for index, predictor in enumerate(self.predictors):
            tensors.update(predictor.tensors(f"predictor.{index}"))
            predictors.append(predictor.settings())
        settings = {
            "settings": asdict(self.settings),  # JSON writes the tuples as lists
            "layers": layers,
            "predictors": predictors,
            "fit_r_squared": self.fit_r_squared,
            "qp_offsets": self.qp_offsets,
            "estimator_errors": self.estimator_errors,
            "static_output_error": self.static_output_error,
            "target_estimator": self.target_estimator,
            "target_errors": self.target_errors,
            "per_layer_errors": self.per_layer_errors,
            "layer_target_errors": self.layer_target_errors,
            "dynamic_mix_errors": self.dynamic_mix_errors,
            "dynamic_mix": self.dynamic_mix,
            "dynamic_sweep_errors": self.dynamic_sweep_errors,
        }
        (folder / STATE_FILES[0]).write_text(json.dumps(settings, indent=1))
        save_file(tensors, str(folder / STATE_FILES[1]))


def assign_predictions(
    samplers: dict[str, SampleQuantizer], targets: list[tuple[str, str]], qps: torch.Tensor
) -> None:
    """Write predicted QPs ``[N, T]`` (linear scale) into each target's ``predicted`` slot."""
    for name, slot in predicted_slots(targets, qps).items():
        samplers[name].predicted = slot


def _targets_of(sampler: SampleQuantizer) -> list[tuple[str, str]]:
    if sampler.scheme is Scheme.DENSE_SPARSE:
        return [(sampler.name, "threshold")]
    if sampler.nonnegative:
        return [(sampler.name, "hi")]
    return [(sampler.name, "lo"), (sampler.name, "hi")]


def _log_targets(sampler: SampleQuantizer, records: list[SampleQPs]) -> torch.Tensor:
    columns = []
    for _, kind in _targets_of(sampler):
        if kind == "lo":
            values = -torch.cat([r.lo for r in records])  # type: ignore[misc]
        elif kind == "hi":
            values = torch.cat([r.hi for r in records])  # type: ignore[misc]
        else:
            values = torch.cat([r.threshold for r in records])  # type: ignore[misc]
        floor = 1e-6 * float(values.abs().max()) + 1e-12
        columns.append(torch.log(values.clamp(min=floor)))
    return torch.stack(columns, dim=1)


def evenly_spaced(names: list[str], count: int) -> list[str]:
    """``count`` of ``names`` at even steps, the first included."""
    count = max(1, min(count, len(names)))
    return [names[(index * len(names)) // count] for index in range(count)]


def spaced_in_run_order(names: list[str], count: int, positions: dict[str, int]) -> list[str]:
    """``count`` of ``names`` (a subset of the run order, ``positions`` their places in it)
    nearest to even steps of the run order from the first to the last of them, both included.

    For Dense+Sparse sources: a layer's threshold is predicted from the nearest source before
    it, so what matters is the distance in the run order, not in the list of candidates. On
    digits-cnn the Dense+Sparse layers sit at places 1, 2 and 6 of 8; two sources at 1 and 6
    hold the density spread to 0.47 of static's, at 1 and 2 to 0.75 (A4)."""
    count = max(1, min(count, len(names)))
    if count == len(names):
        return list(names)
    if count == 1:
        return names[:1]
    first, last = positions[names[0]], positions[names[-1]]
    chosen: list[int] = []
    for step in range(count):
        target = first + step * (last - first) / (count - 1)
        low = chosen[-1] + 1 if chosen else 0
        high = len(names) - (count - step)  # leave one name for every later step
        index = min(range(low, high + 1), key=lambda i: (abs(positions[names[i]] - target), i))
        chosen.append(index)
    return [names[i] for i in chosen]


#: ``sources="auto"`` may read fewer elements per source, halving down to this many, to afford
#: more sources: on digits-cnn (Dense+Sparse, A4) 2 predictors on its Dense+Sparse layers
#: reading 512 elements each hold the density spread to 0.47 of static's at 0.46 % of the
#: FLOPs, where 2048 elements afforded one.
MIN_AUTO_ELEMENTS = 512


def _element_choices(settings: ActivationQPSettings) -> list[int | None]:
    """``settings.feature_elements``, then its halvings down to ``MIN_AUTO_ELEMENTS``."""
    first = settings.feature_elements
    if first is None:
        return [None]
    choices: list[int | None] = [first]
    while first // 2 >= MIN_AUTO_ELEMENTS:
        first //= 2
        choices.append(first)
    return choices


def budget_sources(
    names: list[str],
    sizes: dict[str, int],
    settings: ActivationQPSettings,
    flops: int,
    spacing: Callable[[list[str], int], list[str]] = evenly_spaced,
) -> tuple[int, int | None]:
    """The most evenly spaced sources of ``names`` (up to ``MAX_AUTO_SOURCES``), and the
    elements each reads (``settings.feature_elements`` or a halving of it), whose features and
    linear maps cost at most ``settings.overhead_budget`` of ``flops`` and at most what the
    dynamic scheme's reductions cost (a dearer predictor would be pointless); at least one
    source. More sources come before more elements per source."""
    targets = 2 * len(sizes)  # at most lo and hi per quantizer
    dynamic = 2 * sum(sizes.values())
    budget = min(settings.overhead_budget * flops, dynamic)
    features = len(settings.features)
    choices = _element_choices(settings)
    for count in range(min(MAX_AUTO_SOURCES, len(names)), 0, -1):
        chosen = spacing(names, count)
        for elements in choices:
            cost = sum(
                feature_flops(settings.features, min(sizes[name], elements or sizes[name]))
                for name in chosen
            ) + 2 * features * (targets + count)
            if cost <= budget:
                return count, elements
    return 1, choices[-1]


def _sources(
    model: QuantizedModel,
    settings: ActivationQPSettings,
    sizes: dict[str, int],
    schemes: dict[str, Scheme],
    batch: Batch,
) -> tuple[list[str], int | None]:
    """The predictors' sources and the elements each reads. ``auto`` spaces them over the
    Dense+Sparse layers where there are any: their thresholds set the outlier density, and a
    source's own features predict its threshold best."""
    names = [q.name for q in calibrated_activations(model) if q.name in sizes]
    if not settings.sources:
        candidates = [n for n in names if schemes.get(n) is Scheme.DENSE_SPARSE]
        spacing = evenly_spaced
        if candidates:
            positions = {name: place for place, name in enumerate(names)}
            spacing = partial(spaced_in_run_order, positions=positions)
        candidates = candidates or names
        count, elements = settings.source_count, settings.feature_elements
        if count is None:
            with static_quantizers(model):
                flops = model_flops(model, batch)
            count, elements = budget_sources(candidates, sizes, settings, flops, spacing)
        return spacing(candidates, count), elements
    for source in settings.sources:
        if source not in names:
            model.quantizer(source)  # raises for unknown names
            raise ConfigError(
                f"predictor source '{source}' is not an enabled activation quantizer; pick one "
                "from `qpp quantize MODEL --list-quantizers`"
            )
    return sorted(settings.sources, key=names.index), settings.feature_elements


@contextmanager
def static_quantizers(model: QuantizedModel) -> Iterator[None]:
    """Within the block, every activation quantizer uses its static encoding."""
    quantizers = execution_order(model)
    saved = [q.per_sample for q in quantizers]
    try:
        for quantizer in quantizers:
            quantizer.per_sample = None
        yield
    finally:
        for quantizer, per_sample in zip(quantizers, saved, strict=True):
            quantizer.per_sample = per_sample


def sample_sizes(model: QuantizedModel, batch: Batch) -> dict[str, int]:
    """Elements per sample of each activation quantizer's input whose first dimension is the
    batch (probes of two and three samples, or one if the batch has one; static QPs).
    Tensors that carry the batch elsewhere (e.g. an attention tensor ``[1, N, heads, T, d]``
    split from a fused QKV projection) are left out: they cannot take per-sample QPs and keep
    their static encoding."""
    available = int(batch[0].shape[0]) if batch[0].ndim else 1
    counts = [2, 3] if available >= 3 else [min(available, 2)]
    probes: list[dict[str, torch.Size]] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        probes[-1].setdefault(module.name, args[0].shape)  # type: ignore[arg-type]

    hooks = [q.register_forward_pre_hook(record) for q in execution_order(model)]
    try:
        with static_quantizers(model), torch.no_grad():
            for count in counts:
                probes.append({})
                model(*[x[:count] for x in batch])
    finally:
        for hook in hooks:
            hook.remove()
    return {
        name: shape.numel() // counts[0]
        for name, shape in probes[0].items()
        if all(
            len(probe.get(name, ())) and probe[name][0] == count
            for probe, count in zip(probes, counts, strict=True)
        )
    }


def layer_schemes(sizes: dict[str, int], settings: ActivationQPSettings) -> dict[str, Scheme]:
    """Dense+Sparse where a sample has enough elements to hold the outlier fraction
    (``min_dense_sparse_elements``), uniform elsewhere; uniform everywhere for ``uniform``."""
    scheme = parse_scheme(settings.scheme)
    if scheme is Scheme.UNIFORM:
        return {name: scheme for name in sizes}
    smallest = min_dense_sparse_elements(settings.outlier_fraction)
    return {
        name: Scheme.DENSE_SPARSE if size >= smallest else Scheme.UNIFORM
        for name, size in sizes.items()
    }


def attach(
    model: QuantizedModel,
    settings: ActivationQPSettings,
    schemes: dict[str, Scheme] | None = None,
) -> tuple[ActivationQPs, list[Quantizer]]:
    """A ``SampleQuantizer`` on every enabled, calibrated activation quantizer, in run order,
    with the scheme ``schemes`` names for it (default: ``settings.scheme``); with ``schemes``,
    only on the quantizers it names (those whose tensors are batch-first)."""
    order = calibrated_activations(model)
    if schemes is not None:
        order = [q for q in order if q.name in schemes]
    scheme, mode = parse_scheme(settings.scheme), parse_mode(settings.mode)
    schemes = schemes or {}
    samplers = {
        q.name: SampleQuantizer(
            q, schemes.get(q.name, scheme), mode, settings.outlier_fraction, settings.estimator
        )
        for q in order
    }
    for sampler in samplers.values():
        sampler.quantizer.per_sample = sampler
    return ActivationQPs(model, settings, samplers), order


def configure_activation_qps(
    model: QuantizedModel,
    batches: Sequence[Batch],
    settings: ActivationQPSettings,
    show_progress: bool = False,
) -> ActivationQPs:
    """Attach per-sample QPs to ``model``'s activation quantizers as ``settings`` says.

    Records the exact QPs on ``batches`` when the scheme or mode needs them (Dense+Sparse static
    thresholds, predictor targets), fits the predictors, and leaves the model in
    ``settings.mode``.
    """
    if not batches:
        raise ConfigError("per-input activation QPs need calibration data; pass some batches")
    scheme, mode = parse_scheme(settings.scheme), parse_mode(settings.mode)
    sizes = sample_sizes(model, batches[0])
    schemes = layer_schemes(sizes, settings)
    sources: list[str] = []
    reference: list[list[torch.Tensor]] = []
    if mode is QPMode.PREDICTED:
        sources, elements = _sources(model, settings, sizes, schemes, batches[0])
        settings = replace(settings, feature_elements=elements)
    handle, order = attach(model, settings, schemes)
    samplers = handle.samplers
    chosen = settings.estimator in CHOSEN_ESTIMATORS
    if scheme is Scheme.UNIFORM and mode is not QPMode.STATIC and chosen:
        choice = choose_dynamic_estimator(
            model, samplers.values(), batches, show_progress=show_progress
        )
        handle.settings = replace(settings, estimator=choice.chosen)
        handle.estimator_errors = choice.errors
        handle.static_output_error = choice.static_error
        reference = choice.reference
        if settings.estimator == PER_LAYER_ESTIMATOR:
            refined = refine_per_layer(
                model, samplers, batches, reference, show_progress=show_progress
            )
            handle.layer_estimators = refined.estimators
            handle.per_layer_errors = (refined.start_error, refined.error)
    if scheme is Scheme.UNIFORM and mode is not QPMode.PREDICTED:
        return handle  # static uses the calibrated encodings; dynamic needs nothing more
    if scheme is Scheme.UNIFORM and chosen:
        _fit_to_best_targets(handle, order, sources, batches, reference, show_progress)
    else:
        _fit_predictors(handle, order, sources, batches, show_progress)
        if scheme is Scheme.UNIFORM and mode is QPMode.PREDICTED:
            handle.target_estimator = settings.estimator
    return handle


@dataclass
class _FittedState:
    """What ``_fit_predictors`` sets on a handle, kept while other targets are tried."""

    predictors: list[LinearQPPredictor]
    fit_r_squared: dict[str, float]
    qp_offsets: dict[str, float]
    nonnegative: dict[str, bool]

    @classmethod
    def of(cls, handle: ActivationQPs) -> _FittedState:
        nonnegative = {name: s.nonnegative for name, s in handle.samplers.items()}
        return cls(handle.predictors, handle.fit_r_squared, handle.qp_offsets, nonnegative)

    def restore(self, handle: ActivationQPs) -> None:
        handle.predictors, handle.fit_r_squared = self.predictors, self.fit_r_squared
        handle.qp_offsets = self.qp_offsets
        for name, sampler in handle.samplers.items():
            sampler.nonnegative = self.nonnegative[name]


def _fit_to_best_targets(
    handle: ActivationQPs,
    order: list[Quantizer],
    sources: list[str],
    batches: Sequence[Batch],
    reference: list[list[torch.Tensor]],
    show_progress: bool,
) -> None:
    """Fit the predictors to the targets of each of ``TARGET_CANDIDATES`` estimator choices
    (``_target_candidates``), and keep the fit whose predicted-mode relative output error on
    ``batches[:CHOICE_BATCHES]`` is lowest (the criterion of ``choose_dynamic_estimator``,
    applied to what the deployed model runs). The samplers keep the dynamic choice for
    ``dynamic`` mode. ``reference``: the float model's outputs on those batches
    (``EstimatorChoice.reference``)."""
    dynamic = {name: s.estimator for name, s in handle.samplers.items()}
    candidates = _target_candidates(handle)
    used = list(batches[:CHOICE_BATCHES])
    model = handle.model
    fitted: dict[str, _FittedState] = {}
    try:
        for candidate, estimators in candidates.items():
            for name, estimator in estimators.items():
                handle.samplers[name].estimator = estimator
            handle.predictors, handle.fit_r_squared, handle.qp_offsets = [], {}, {}
            _fit_predictors(handle, order, sources, batches, show_progress)
            handle.target_errors[candidate] = round(
                relative_output_error(model, used, reference), 6
            )
            fitted[candidate] = _FittedState.of(handle)
            handle.detach_predictors()
    finally:
        for name, estimator in dynamic.items():
            handle.samplers[name].estimator = estimator
    best = min(candidates, key=handle.target_errors.__getitem__)  # the first on ties
    fitted[best].restore(handle)
    handle.target_estimator = best
    handle._install_predictors()
    handle.set_mode(QPMode.PREDICTED.value)
    if handle.layer_estimators:
        _refine_targets(handle, fitted, candidates, best, batches, reference, show_progress)
        _choose_dynamic_mix(handle, batches, reference)
        _sweep_dynamic_again(handle, batches, reference, show_progress)


#: The fit name of the columns a layer holds when the second target sweep starts.
_SWEPT = "swept"


def _refine_targets(
    handle: ActivationQPs,
    fitted: dict[str, _FittedState],
    candidates: dict[str, dict[str, str]],
    best: str,
    batches: Sequence[Batch],
    reference: list[list[torch.Tensor]],
    show_progress: bool,
) -> None:
    """``per-layer``: give each uniform layer the columns of whichever fit lowers the
    predicted-mode output error (``qpp.predict.target_choice``), starting from ``best``'s
    fit, installed; then a second sweep from those columns, where every fit, ``best``'s own
    included, is an alternative again. The static ranges are an alternative in both
    (``static_columns``): at 8 bits the calibrated range of some layers serves better than
    any prediction (digits-cnn W8A8, 2026-12-07: 4 of 8 layers; calibration error 8.3e-5 ->
    7.8e-5). The layers' offsets and R^2 follow their columns; a static layer has neither.

    One greedy sweep depends on its path: on ppocr-det W8A4 (2026-12-07) it ended at an error
    of 0.437 on the four batches (box F1 55.16; a morning run of the same settings, 0.308 and
    68.49), and the second sweep went on to 0.238 (68.38; 26 layers moved), as the dynamic
    side's second sweep does for dynamic mode (``_sweep_dynamic_again``)."""
    base = copy.deepcopy(handle.predictors)  # best's columns, as fitted
    base_offsets, base_r_squared = dict(handle.qp_offsets), dict(handle.fit_r_squared)
    alternatives = {name: state.predictors for name, state in fitted.items() if name != best}
    alternatives[STATIC_FIT] = static_columns(base, handle.samplers)
    first = refine_targets_per_layer(
        handle.model,
        handle.samplers,
        handle.predictors,
        alternatives,
        best,
        batches,
        reference,
        show_progress,
    )
    second = refine_targets_per_layer(
        handle.model,
        handle.samplers,
        handle.predictors,
        {**alternatives, best: base},
        _SWEPT,
        batches,
        reference,
        show_progress,
    )
    fits = {name: first.fits[name] if fit == _SWEPT else fit for name, fit in second.fits.items()}
    handle.layer_targets = {
        name: STATIC_FIT if fit == STATIC_FIT else candidates[fit][name]
        for name, fit in fits.items()
    }
    handle.layer_target_errors = (first.start_error, second.error)
    for name, fit in fits.items():
        if fit == STATIC_FIT:  # no regression and no offset: the calibrated range
            handle.qp_offsets.pop(name, None)
            for key in [k for k in handle.fit_r_squared if k.rsplit(":", 1)[0] == name]:
                del handle.fit_r_squared[key]
            continue
        offsets, r_squared = (
            (base_offsets, base_r_squared)
            if fit == best
            else (fitted[fit].qp_offsets, fitted[fit].fit_r_squared)
        )
        if name in offsets:
            handle.qp_offsets[name] = offsets[name]
        for key, value in r_squared.items():
            if key.rsplit(":", 1)[0] == name:
                handle.fit_r_squared[key] = value
    handle.target_estimator = PER_LAYER_ESTIMATOR


def _choose_dynamic_mix(
    handle: ActivationQPs, batches: Sequence[Batch], reference: list[list[torch.Tensor]]
) -> None:
    """``per-layer``: let ``dynamic`` mode run the candidate of ``DYNAMIC_MIXES`` with the
    lowest dynamic-mode output error on the target sweep's ``TARGET_SWEEP_BATCHES`` batches,
    when it beats the dynamic sweep's per-layer choice by more than ``PER_LAYER_MIN_GAIN``.

    The dynamic sweep chose each layer's estimator on ``PER_LAYER_BATCHES`` batch(es); the
    target sweep, on more batches, can find a mix whose exact ranges are better still
    (measured: ``docs/benchmarks.md``). And a predictor with its log offset δ_l
    (``qpp.predict.offsets``) predicts its targets' exact ranges times ``e^δ_l``: the exact
    counterpart of predicted mode runs those, or the exact ranges with δ_l refitted on them.
    ``dynamic`` should be the best per-input ranges found, not the first; every error is
    kept."""
    if not handle.layer_targets:
        return
    uniform = {name: handle.samplers[name] for name in handle.layer_targets}
    used = batches[:TARGET_SWEEP_BATCHES]
    chosen = dict(handle.layer_estimators)
    # A layer that predicted mode keeps on its static range runs it here too: the mix is the
    # exact counterpart of predicted mode, prediction error aside.
    targets = {
        name: STATIC_ESTIMATOR if target == STATIC_FIT else target
        for name, target in handle.layer_targets.items()
    }
    mixes = {
        CHOSEN_MIX: chosen,
        "targets": targets,
        "targets_offsets": targets,
        "chosen_fitted": chosen,
        "targets_fitted": targets,
    }
    offsets = {"targets_offsets": {n: handle.qp_offsets.get(n, 0.0) for n in targets}}
    for mix in ("chosen_fitted", "targets_fitted"):
        estimators = {name: mixes[mix].get(name, s.estimator) for name, s in uniform.items()}
        offsets[mix] = fit_dynamic_offsets(
            handle.model, handle.samplers, handle.predictors, estimators, used
        )
    errors = mix_errors(handle.model, uniform, mixes, used, reference, offsets=offsets)
    handle.dynamic_mix_errors = {mix: round(errors[mix], 6) for mix in DYNAMIC_MIXES}
    handle.dynamic_mix = best_dynamic_mix(handle.dynamic_mix_errors)
    if handle.dynamic_mix == CHOSEN_MIX:
        return
    handle.layer_estimators = {**handle.layer_estimators, **mixes[handle.dynamic_mix]}
    handle.dynamic_offsets = {
        name: offset
        for name, offset in offsets.get(handle.dynamic_mix, {}).items()
        if offset != 0.0
    }
    for name, sampler in uniform.items():
        sampler.estimator = handle.layer_estimators[name]
        sampler.range_offset = handle.dynamic_offsets.get(name, 0.0)


def _sweep_dynamic_again(
    handle: ActivationQPs,
    batches: Sequence[Batch],
    reference: list[list[torch.Tensor]],
    show_progress: bool = False,
) -> None:
    """``per-layer``, predicted: a second layer-by-layer sweep of the dynamic estimators
    (``refine_per_layer``), from the mix ``_choose_dynamic_mix`` kept, on the target sweep's
    ``TARGET_SWEEP_BATCHES`` batches: the batches on which predicted mode's columns were
    chosen layer by layer, so both modes are tuned on the same data. The first sweep ran on
    ``PER_LAYER_BATCHES`` batch(es) to be cheap and can fit that batch rather than the
    model: on ppocr-cls W8A4 (2026-12-07) it lowered its batch's error from 0.208 to 0.111,
    and the four batches' error was still 0.206, against 0.163 for predicted mode."""
    uniform = {name: handle.samplers[name] for name in handle.layer_targets}
    used = batches[:TARGET_SWEEP_BATCHES]
    refined = refine_per_layer(
        handle.model,
        uniform,
        used,
        reference,
        show_progress=show_progress,
        sweep_batches=len(used),
    )
    handle.dynamic_sweep_errors = (refined.start_error, refined.error)
    handle.layer_estimators = {**handle.layer_estimators, **refined.estimators}


def best_dynamic_mix(errors: dict[str, float]) -> str:
    """The candidate of ``DYNAMIC_MIXES`` that ``dynamic`` mode runs, given each one's output
    error: the lowest, where it is below the per-layer choice's by more than
    ``PER_LAYER_MIN_GAIN`` (ties go to the earlier candidate)."""
    others = [mix for mix in DYNAMIC_MIXES if mix != CHOSEN_MIX and mix in errors]
    if not others:
        return CHOSEN_MIX
    best = min(others, key=errors.__getitem__)
    return best if errors[best] < errors[CHOSEN_MIX] * (1.0 - PER_LAYER_MIN_GAIN) else CHOSEN_MIX


def _target_candidates(handle: ActivationQPs) -> dict[str, dict[str, str]]:
    """The estimator choices the predictors may be fitted to, by name: the per-layer choice
    (with ``per-layer``) and the single estimators with the lowest dynamic output error,
    ``TARGET_CANDIDATES`` in all; each maps every uniform layer to its estimator."""
    uniform = [n for n, s in handle.samplers.items() if s.scheme is Scheme.UNIFORM]
    candidates: dict[str, dict[str, str]] = {}
    per_layer = {n: handle.layer_estimators[n] for n in uniform if n in handle.layer_estimators}
    if set(per_layer.values()) - {handle.settings.estimator}:  # differs from the single choice
        candidates[PER_LAYER_ESTIMATOR] = per_layer
    errors = handle.estimator_errors
    # per-layer fits every estimator: the layer-by-layer choice of targets picks among them.
    limit = len(errors) + 1 if handle.layer_estimators else TARGET_CANDIDATES
    for name in sorted(errors, key=errors.__getitem__):  # stable on ties
        if len(candidates) == limit:
            break
        candidates[name] = dict.fromkeys(uniform, name)
    return candidates


def _estimator_counts(estimators: dict[str, str]) -> str:
    """``{"a": "mse", "b": "mse", "c": "minmax"}`` -> ``"mse 2, minmax 1"``."""
    counts = Counter(estimators.values())
    return ", ".join(f"{name} {count}" for name, count in counts.most_common())


def _fit_predictors(
    handle: ActivationQPs,
    order: list[Quantizer],
    sources: list[str],
    batches: Sequence[Batch],
    show_progress: bool,
) -> None:
    """Record the exact QPs (the samplers' estimators) and the sources' features on
    ``batches``, fit one predictor per source to the QPs of the quantizers from it to the
    next source, install them, switch to ``settings.mode`` and fit the log offsets."""
    model, settings, samplers = handle.model, handle.settings, handle.samplers
    mode = parse_mode(settings.mode)
    features: dict[str, list[torch.Tensor]] = {name: [] for name in sources}

    def record_features(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        features[module.name].append(  # type: ignore[index]
            sample_features(args[0], settings.features, settings.feature_elements)
        )

    hooks = [model.quantizer(name).register_forward_pre_hook(record_features) for name in sources]
    for sampler in samplers.values():
        sampler.mode, sampler.recorded = QPMode.DYNAMIC, []
    try:
        with torch.no_grad():
            for batch in progress(batches, "record QPs", show_progress):
                model(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    records = {name: s.recorded or [] for name, s in samplers.items()}
    for name, sampler in samplers.items():
        sampler.recorded = None
        if not records[name]:
            raise ConfigError(f"quantizer '{name}' saw no calibration data; disable it")
        least = min(float(r.lo.min()) for r in records[name])  # type: ignore[union-attr]
        sampler.nonnegative = least >= 0
        if sampler.scheme is Scheme.DENSE_SPARSE:
            thresholds = torch.cat([r.threshold for r in records[name]])  # type: ignore[misc]
            sampler.static_threshold = thresholds.mean()
            sampler.floor = dense_sparse_floor(least, float(sampler.static_threshold))

    position = {q.name: i for i, q in enumerate(order)}
    for index, source in enumerate(sources):
        end = position[sources[index + 1]] if index + 1 < len(sources) else len(order)
        members = [q.name for q in order[position[source] : end]]
        targets = [t for name in members for t in _targets_of(samplers[name])]
        log_qps = torch.cat([_log_targets(samplers[n], records[n]) for n in members], dim=1)
        inputs = torch.cat(features[source])
        predictor = LinearQPPredictor.fit(
            source,
            settings.features,
            targets,
            inputs,
            log_qps,
            settings.ridge,
            settings.feature_elements,
        )
        r2 = predictor.r_squared(inputs, log_qps)
        for (name, kind), value in zip(targets, r2.tolist(), strict=True):
            handle.fit_r_squared[f"{name}:{kind}"] = round(value, 6)
        handle.predictors.append(predictor)
    handle._install_predictors()
    handle.set_mode(mode.value)
    if settings.fit_offsets and mode is QPMode.PREDICTED:
        handle.qp_offsets = fit_offsets(
            model,
            samplers,
            handle.predictors,
            batches,
            settings.outlier_fraction,
            show_progress,
        )


def load_activation_qps(
    model: QuantizedModel, folder: Path, settings: ActivationQPSettings
) -> ActivationQPs:
    """Re-attach the per-sample QPs saved by ``ActivationQPs.save`` (no data needed)."""
    saved = _read_state(folder)
    settings = _with_saved_estimator(settings, saved)
    handle, _ = attach(model, settings, _saved_schemes(saved))
    handle.estimator_errors = dict((saved or {}).get("estimator_errors", {}))
    _restore_layer_estimators(handle, saved)
    static_error = (saved or {}).get("static_output_error")
    if isinstance(static_error, int | float):
        handle.static_output_error = float(static_error)
    samplers, scheme, mode = (
        handle.samplers,
        parse_scheme(settings.scheme),
        parse_mode(settings.mode),
    )
    if scheme is Scheme.UNIFORM and mode is not QPMode.PREDICTED:
        return handle
    paths = [folder / name for name in STATE_FILES]
    if saved is None or not paths[1].is_file():
        raise EncodingsError(
            f"{folder} lacks {' and '.join(STATE_FILES)} that its config needs; quantize again"
        )
    try:
        tensors = load_file(str(paths[1]))
        for name, layer in saved["layers"].items():
            if name not in samplers:
                raise EncodingsError(
                    f"{paths[0]} names quantizer '{name}' that this model lacks; it belongs to "
                    "another model, quantize again"
                )
            samplers[name].nonnegative = bool(layer["nonnegative"])
            floor = layer.get("floor")  # absent in folders saved before floors were kept
            if floor is None:
                floor = 0.0 if samplers[name].nonnegative else -math.inf
            samplers[name].floor = float(floor)
            if "threshold" in layer:
                samplers[name].static_threshold = tensors[layer["threshold"]][0]
        for index, predictor in enumerate(saved["predictors"]):
            handle.predictors.append(
                LinearQPPredictor.from_saved(predictor, tensors, f"predictor.{index}")
            )
    except (KeyError, TypeError, ValueError) as error:
        raise EncodingsError(
            f"{folder}'s activation QP state is corrupt ({error}); quantize again"
        ) from None
    handle.fit_r_squared = dict(saved.get("fit_r_squared", {}))
    target = saved.get("target_estimator")
    handle.target_estimator = target if isinstance(target, str) else None
    handle.target_errors = dict(saved.get("target_errors") or {})
    handle.qp_offsets = dict(saved.get("qp_offsets", {}))
    handle._install_predictors()
    handle.set_mode(mode.value)
    return handle


def _read_state(folder: Path) -> dict[str, Any] | None:
    """The saved ``activation_qps.json``, or None when the run has none."""
    path = folder / STATE_FILES[0]
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, json.JSONDecodeError) as error:
        raise EncodingsError(f"{path} is corrupt ({error}); quantize again") from None
    if not isinstance(saved, dict):
        raise EncodingsError(f"{path} is corrupt (not a JSON object); quantize again")
    return saved


def _with_saved_estimator(
    settings: ActivationQPSettings, saved: dict[str, Any] | None
) -> ActivationQPSettings:
    """``settings`` with the per-input estimator that ``auto`` chose when the run was saved."""
    if settings.estimator not in CHOSEN_ESTIMATORS or saved is None:
        return settings
    try:
        chosen = saved["settings"].get("estimator", AUTO_ESTIMATOR)
        check_dynamic_estimator(chosen)
    except (KeyError, AttributeError, TypeError) as error:
        raise EncodingsError(f"activation QP state is corrupt ({error}); quantize again") from None
    return replace(settings, estimator=chosen)


def _restore_layer_estimators(handle: ActivationQPs, saved: dict[str, Any] | None) -> None:
    """The per-layer estimators ``per-layer`` chose when the run was saved, on the samplers."""
    if saved is None:
        return
    try:
        chosen = {
            name: layer["estimator"]
            for name, layer in saved["layers"].items()
            if "estimator" in layer and name in handle.samplers
        }
        targets = {
            name: layer["target"]
            for name, layer in saved["layers"].items()
            if "target" in layer and name in handle.samplers
        }
        for estimator in [*chosen.values(), *(t for t in targets.values() if t != STATIC_FIT)]:
            if estimator in CHOSEN_ESTIMATORS:
                raise ValueError(f"layer estimator '{estimator}' is not a per-input estimator")
            check_layer_estimator(estimator)
        handle.per_layer_errors = _error_pair(saved.get("per_layer_errors"))
        handle.layer_target_errors = _error_pair(saved.get("layer_target_errors"))
        handle.dynamic_mix_errors, handle.dynamic_mix = _dynamic_mix(saved)
        handle.dynamic_sweep_errors = _error_pair(saved.get("dynamic_sweep_errors"))
        offsets = {
            name: float(layer["dynamic_offset"])
            for name, layer in saved["layers"].items()
            if "dynamic_offset" in layer and name in handle.samplers
        }
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, ConfigError) as error:
        raise EncodingsError(f"activation QP state is corrupt ({error}); quantize again") from None
    for name, estimator in chosen.items():
        handle.samplers[name].estimator = estimator
    for name, offset in offsets.items():
        handle.samplers[name].range_offset = offset
    handle.layer_estimators = chosen
    handle.layer_targets = targets
    handle.dynamic_offsets = offsets


def _dynamic_mix(saved: dict[str, Any]) -> tuple[dict[str, float], str]:
    """The saved dynamic-mode candidates' errors and the one in use. Saves before the offset
    candidates kept ``[per-layer choice, predictors' mix]``."""
    errors = saved.get("dynamic_mix_errors")
    if not errors:
        return {}, CHOSEN_MIX
    if isinstance(errors, list):
        errors = {CHOSEN_MIX: errors[0], "targets": errors[1]}
        return {k: float(v) for k, v in errors.items()}, best_dynamic_mix(errors)
    mix = saved.get("dynamic_mix", CHOSEN_MIX)
    if mix not in DYNAMIC_MIXES:
        raise ValueError(f"unknown dynamic mix '{mix}'")
    return {str(k): float(v) for k, v in errors.items()}, mix


def _error_pair(saved: Any) -> tuple[float, float] | None:
    """A saved ``[before, after]`` output-error pair (None where none was saved)."""
    return None if saved is None else (float(saved[0]), float(saved[1]))


def _saved_schemes(saved: dict[str, Any] | None) -> dict[str, Scheme] | None:
    """Each per-sample layer's scheme as saved; None for saves that predate it (then every
    activation quantizer takes the settings' scheme)."""
    if saved is None:
        return None
    try:
        schemes = {
            name: Scheme(layer["scheme"])
            for name, layer in saved["layers"].items()
            if "scheme" in layer
        }
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        raise EncodingsError(f"activation QP state is corrupt ({error}); quantize again") from None
    return schemes or None


def settings_from_config(config: QuantConfig) -> ActivationQPSettings:
    """The activation-QP settings a ``QuantConfig`` names (checked)."""
    if config.activation_quantizer != "uniform" and (
        config.activation_ranges != "static" or config.activation_scheme != "uniform"
    ):
        raise ConfigError(
            f"per-input activation QPs work with uniform activation quantizers, not "
            f"'{config.activation_quantizer}'; drop --activation-quantizer or use static ranges"
        )
    sources, count = parse_sources(config.predictor_sources)
    return ActivationQPSettings(
        mode=config.activation_ranges,
        scheme=config.activation_scheme,
        outlier_fraction=float(config.outlier_fraction),
        estimator=config.dynamic_estimator,
        features=()
        if config.predictor_features == "auto"
        else comma_list(config.predictor_features),
        sources=sources,
        source_count=count,
        feature_elements=config.predictor_elements,
    )


def comma_list(text: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_sources(text: str) -> tuple[tuple[str, ...], int | None]:
    """``auto`` -> ((), None): by the overhead budget; ``auto:N`` -> ((), N); ``a,b`` ->
    (("a", "b"), None); "" -> ((), 1): the first activation quantizer, as in the paper."""
    text = text.strip()
    if not text:
        return (), 1
    if not text.startswith("auto"):
        return comma_list(text), None
    _, _, count = text.partition(":")
    try:
        return (), int(count) if count else None
    except ValueError:
        raise ConfigError(
            f"predictor sources '{text}' must be auto, auto:N (N evenly spaced quantizers) "
            "or quantizer names; e.g. auto:8"
        ) from None
