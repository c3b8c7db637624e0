"""Set up static, dynamic or predicted activation QPs on a calibrated ``QuantizedModel``.

``configure_activation_qps(qmodel, batches, settings)`` attaches a ``SampleQuantizer`` to every
enabled activation quantizer, records the exact per-sample QPs on the calibration batches (the
Dense+Sparse static thresholds are their mean; the predictor's targets are their logs), fits
one ``LinearQPPredictor`` per feature source, and returns an ``ActivationQPs`` handle that
switches modes, tracks outlier densities, counts the overhead and saves its state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qpp.errors import ConfigError, EncodingsError
from qpp.predict.predictor import (
    DEFAULT_FEATURES,
    LinearQPPredictor,
    check_feature_names,
    sample_features,
)
from qpp.predict.qps import (
    QPMode,
    SampleQPs,
    SampleQuantizer,
    Scheme,
    check_dynamic_estimator,
    parse_mode,
    parse_scheme,
)
from qpp.quant.dense_sparse import check_outlier_fraction
from qpp.report.progress import progress
from qpp.sim.config import QuantConfig
from qpp.sim.model import QUANTIZER_ROOT, QuantizedModel
from qpp.sim.quantizer import Quantizer, QuantizerKind

Batch = Sequence[torch.Tensor]
STATE_FILES = ("activation_qps.json", "activation_qps.safetensors")


@dataclass(frozen=True)
class ActivationQPSettings:
    """How activation QPs are chosen: ``mode`` x ``scheme`` (QPP §3)."""

    mode: str = "static"
    scheme: str = "uniform"
    outlier_fraction: float = 0.01
    #: The per-sample range estimator of dynamic uniform QPs (and the predictor's targets).
    estimator: str = "mse"
    features: tuple[str, ...] = DEFAULT_FEATURES
    #: Quantizers whose inputs feed a predictor; empty = the first activation quantizer.
    sources: tuple[str, ...] = ()
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        parse_mode(self.mode)
        parse_scheme(self.scheme)
        check_outlier_fraction(self.outlier_fraction)
        check_dynamic_estimator(self.estimator)
        check_feature_names(self.features)
        if not self.ridge >= 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge}")

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
    _hooks: list[Any] = field(default_factory=list)

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
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for sampler in self.samplers.values():
            sampler.quantizer.per_sample = None

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
        for every predicted layer while the block runs (in ``predicted`` mode)."""
        for sampler in self.samplers.values():
            sampler.pairs = []
        result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            yield result
        finally:
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
            log_qps = predictor.predict_log(sample_features(args[0], predictor.feature_names))
            assign_predictions(self.samplers, predictor.targets, torch.exp(log_qps))

        return hook

    # --- cost -------------------------------------------------------------------------------

    def overhead_flops(self, batch: Batch) -> dict[str, int]:
        """Per-sample operations that choosing QPs adds: the predictors (features + linear map)
        and, for comparison, the dynamic scheme's reductions (min and max, or a quantile
        selection, over every quantized activation: ~2 operations per element)."""
        sizes: dict[str, int] = {}

        def record_size(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes.setdefault(module.name, args[0][0].numel())  # type: ignore[arg-type]

        hooks = [s.quantizer.register_forward_pre_hook(record_size) for s in self.samplers.values()]
        saved = {name: s.mode for name, s in self.samplers.items()}
        try:
            self.set_mode("static")
            with torch.no_grad():
                self.model(*[x[:1] for x in batch])
        finally:
            for hook in hooks:
                hook.remove()
            for name, mode in saved.items():
                self.samplers[name].mode = mode
        predictor = sum(p.flops(sizes.get(p.source, 0)) for p in self.predictors)
        return {"predictor": predictor, "dynamic": 2 * sum(sizes.values())}

    # --- persistence ------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        layers = {}
        for index, (name, sampler) in enumerate(self.samplers.items()):
            layers[name] = {"nonnegative": sampler.nonnegative}
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
        }
        (folder / STATE_FILES[0]).write_text(json.dumps(settings, indent=1))
        save_file(tensors, str(folder / STATE_FILES[1]))


def assign_predictions(
    samplers: dict[str, SampleQuantizer], targets: list[tuple[str, str]], qps: torch.Tensor
) -> None:
    """Write predicted QPs ``[N, T]`` (linear scale) into each target's ``predicted`` slot."""
    slots: dict[str, SampleQPs] = {}
    for column, (name, kind) in enumerate(targets):
        slot = slots.setdefault(name, SampleQPs())
        value = qps[:, column]
        if kind == "lo":
            slot.lo = -value
        elif kind == "hi":
            slot.hi = value
        else:
            slot.threshold = value
    for name, slot in slots.items():
        if slot.hi is not None and slot.lo is None:
            slot.lo = torch.zeros_like(slot.hi)  # a non-negative tensor: its range starts at 0
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


def _sources(
    order: list[Quantizer], settings: ActivationQPSettings, model: QuantizedModel
) -> list[str]:
    names = [q.name for q in order]
    if not settings.sources:
        return names[:1]
    for source in settings.sources:
        if source not in names:
            model.quantizer(source)  # raises for unknown names
            raise ConfigError(
                f"predictor source '{source}' is not an enabled activation quantizer; pick one "
                "from `qpp quantize MODEL --list-quantizers`"
            )
    return sorted(settings.sources, key=names.index)


def attach(
    model: QuantizedModel, settings: ActivationQPSettings
) -> tuple[ActivationQPs, list[Quantizer]]:
    """A ``SampleQuantizer`` on every enabled, calibrated activation quantizer, in run order."""
    order = [q for q in execution_order(model) if q.enabled and q.calibrated]
    scheme, mode = parse_scheme(settings.scheme), parse_mode(settings.mode)
    samplers = {
        q.name: SampleQuantizer(q, scheme, mode, settings.outlier_fraction, settings.estimator)
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
    handle, order = attach(model, settings)
    samplers, scheme, mode = (
        handle.samplers,
        parse_scheme(settings.scheme),
        parse_mode(settings.mode),
    )
    if scheme is Scheme.UNIFORM and mode is not QPMode.PREDICTED:
        return handle  # static uses the calibrated encodings; dynamic needs nothing more

    sources = _sources(order, settings, model) if mode is QPMode.PREDICTED else []
    features: dict[str, list[torch.Tensor]] = {name: [] for name in sources}

    def record_features(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        features[module.name].append(sample_features(args[0], settings.features))  # type: ignore[index]

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
        sampler.nonnegative = bool(min(float(r.lo.min()) for r in records[name]) >= 0)  # type: ignore[union-attr]
        if scheme is Scheme.DENSE_SPARSE:
            sampler.static_threshold = torch.cat([r.threshold for r in records[name]]).mean()  # type: ignore[misc]

    position = {q.name: i for i, q in enumerate(order)}
    for index, source in enumerate(sources):
        end = position[sources[index + 1]] if index + 1 < len(sources) else len(order)
        members = [q.name for q in order[position[source] : end]]
        targets = [t for name in members for t in _targets_of(samplers[name])]
        log_qps = torch.cat([_log_targets(samplers[n], records[n]) for n in members], dim=1)
        inputs = torch.cat(features[source])
        predictor = LinearQPPredictor.fit(
            source, settings.features, targets, inputs, log_qps, settings.ridge
        )
        r2 = predictor.r_squared(inputs, log_qps)
        for (name, kind), value in zip(targets, r2.tolist(), strict=True):
            handle.fit_r_squared[f"{name}:{kind}"] = round(value, 6)
        handle.predictors.append(predictor)
    handle._install_predictors()
    handle.set_mode(mode.value)
    return handle


def load_activation_qps(
    model: QuantizedModel, folder: Path, settings: ActivationQPSettings
) -> ActivationQPs:
    """Re-attach the per-sample QPs saved by ``ActivationQPs.save`` (no data needed)."""
    handle, _ = attach(model, settings)
    samplers, scheme, mode = (
        handle.samplers,
        parse_scheme(settings.scheme),
        parse_mode(settings.mode),
    )
    if scheme is Scheme.UNIFORM and mode is not QPMode.PREDICTED:
        return handle
    paths = [folder / name for name in STATE_FILES]
    if not all(p.is_file() for p in paths):
        raise EncodingsError(
            f"{folder} lacks {' and '.join(STATE_FILES)} that its config needs; quantize again"
        )
    try:
        saved = json.loads(paths[0].read_text())
        tensors = load_file(str(paths[1]))
        for name, layer in saved["layers"].items():
            if name not in samplers:
                raise EncodingsError(
                    f"{paths[0]} names quantizer '{name}' that this model lacks; it belongs to "
                    "another model, quantize again"
                )
            samplers[name].nonnegative = bool(layer["nonnegative"])
            if "threshold" in layer:
                samplers[name].static_threshold = tensors[layer["threshold"]][0]
        for index, predictor in enumerate(saved["predictors"]):
            handle.predictors.append(
                LinearQPPredictor.from_saved(predictor, tensors, f"predictor.{index}")
            )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
        raise EncodingsError(
            f"{folder}'s activation QP state is corrupt ({error}); quantize again"
        ) from None
    handle.fit_r_squared = dict(saved.get("fit_r_squared", {}))
    handle._install_predictors()
    handle.set_mode(mode.value)
    return handle


def settings_from_config(config: QuantConfig) -> ActivationQPSettings:
    """The activation-QP settings a ``QuantConfig`` names (checked)."""

    def names(text: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in text.split(",") if item.strip())

    if config.activation_quantizer != "uniform" and (
        config.activation_ranges != "static" or config.activation_scheme != "uniform"
    ):
        raise ConfigError(
            f"per-input activation QPs work with uniform activation quantizers, not "
            f"'{config.activation_quantizer}'; drop --activation-quantizer or use static ranges"
        )
    return ActivationQPSettings(
        mode=config.activation_ranges,
        scheme=config.activation_scheme,
        outlier_fraction=float(config.outlier_fraction),
        estimator=config.dynamic_estimator,
        features=names(config.predictor_features),
        sources=names(config.predictor_sources),
    )
