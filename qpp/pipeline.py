"""qpp's main job: quantize a model, evaluate it against FP32, save the run; and re-evaluate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from qpp.api import calibrate_and_correct, limit_samples, prepare, run
from qpp.data import check_batches
from qpp.graph.outputs import comparable_outputs, softmax_outputs
from qpp.predict import (
    ActivationQPs,
    configure_activation_qps,
    load_activation_qps,
    settings_from_config,
)
from qpp.predict.activation_qps import CHOSEN_MIX, DYNAMIC_MIXES, LayerDensity
from qpp.predict.cost import model_flops
from qpp.predict.estimator_choice import relative_error
from qpp.runs import (
    RunRecord,
    load_weights,
    prepare_output,
    read_run,
    remove_unused_output,
    save_run,
)
from qpp.sim.config import QuantConfig
from qpp.sim.model import QuantizedModel
from qpp.sources import SourceSpec, resolve_source
from qpp.zoo.base import ZooEntry

#: A model's outputs over the evaluation data (``qpp.api.run``).
Outputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class JobResult:
    """What a quantize (or eval) job measured; ``as_dict`` is the CLI's ``--json`` object."""

    model: str
    config: QuantConfig
    metrics: dict[str, dict[str, float]]
    size_bytes: dict[str, int]
    seconds: dict[str, float]
    output_dir: str | None
    primary_metric: str
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "config": self.config.to_dict(),
            "metrics": self.metrics,
            "size_bytes": self.size_bytes,
            "seconds": self.seconds,
            "output_dir": self.output_dir,
            "primary_metric": self.primary_metric,
            **self.extra,
        }


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer at its stored dtype."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantized_size_bytes(model: QuantizedModel) -> int:
    """Bytes after quantization: each enabled weight quantizer's ``storage_bytes`` (``bits``
    per element plus per-channel parameters); every other tensor stays as it is."""
    quantized_targets: dict[str, int] = {}
    for name in model.names:
        quantizer = model.quantizer(name)
        if quantizer.kind.value != "weight" or not quantizer.enabled:
            continue
        quantized_targets[model.weight_target(name)] = quantizer.storage_bytes(model.weight(name))
    total = 0
    for key, tensor in model.graph_module.state_dict().items():
        if key.startswith("qpp_quantizers."):
            continue
        total += quantized_targets.get(key, tensor.numel() * tensor.element_size())
    return total


def weight_bits_per_element(model: QuantizedModel) -> float | None:
    """Stored bits per quantized weight element, averaged over the enabled weight quantizers
    (``b`` for uniform grids, ``b`` plus the region bit for PWLQ); ``None`` if there are none."""
    bits = elements = 0
    for quantizer, weight in model.weight_quantizers():
        if quantizer.enabled:
            bits += weight.numel() * quantizer.bits_per_element
            elements += weight.numel()
    return round(bits / elements, 4) if elements else None


def evaluate_entry(
    entry: ZooEntry,
    model: torch.nn.Module,
    reference: torch.Tensor | None,
    show_progress: bool,
    label: str,
) -> tuple[dict[str, float], torch.Tensor, float]:
    evaluation = entry.evaluation_set()
    start = time.perf_counter()
    outputs = run(model, evaluation.batches, label, show_progress)
    seconds = time.perf_counter() - start
    metrics = entry.metrics(outputs, outputs if reference is None else reference, evaluation)
    return metrics, outputs, seconds


def evaluate_quantized(
    entry: ZooEntry,
    quantized: QuantizedModel,
    activation_qps: ActivationQPs | None,
    reference: torch.Tensor,
    show_progress: bool,
    label: str = "quantized",
) -> tuple[dict[str, float], float, list[LayerDensity] | None, Outputs]:
    """Evaluate, and for Dense+Sparse also the achieved outlier fraction per layer; the
    model's outputs come last."""
    if activation_qps is None or activation_qps.settings.scheme != "dense-sparse":
        metrics, outputs, seconds = evaluate_entry(
            entry, quantized, reference, show_progress, label
        )
        return metrics, seconds, None, outputs
    with activation_qps.tracking_density() as layers:
        metrics, outputs, seconds = evaluate_entry(
            entry, quantized, reference, show_progress, label
        )
    return metrics, seconds, layers, outputs


def evaluation_output_error(
    outputs: Outputs, reference: Outputs, softmax: Sequence[bool] = ()
) -> float:
    """``sum ||y_q - y||^2 / sum ||y||^2`` over every output and evaluation sample: how far
    the quantized model's outputs are from the float model's. A continuous counterpart of
    the task metric, which at 8 bits often moves by single samples. The outputs flagged in
    ``softmax`` (``qpp.graph.outputs.softmax_outputs``) compare as log-probabilities, as
    the calibration-time choices compare them."""
    leaves = [
        comparable_outputs([t.double() for t in tree_leaves(o)], softmax)
        for o in (outputs, reference)
    ]
    return relative_error([leaves[0]], [leaves[1]])


def density_summary(layers: list[LayerDensity], target: float) -> dict[str, Any]:
    """Achieved outlier fraction: mean over layers of each layer's mean and std over inputs."""
    count = max(1, len(layers))
    return {
        "target": target,
        "mean": sum(layer.mean for layer in layers) / count,
        "std_over_inputs": sum(layer.std for layer in layers) / count,
        "layers": {layer.name: [round(layer.mean, 6), round(layer.std, 6)] for layer in layers},
    }


@dataclass
class ModeComparison:
    """``--compare``: the JSON rows, plus what the plots need."""

    rows: dict[str, Any]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    densities: dict[str, torch.Tensor]
    #: What the predictors were fitted to, for the scatter's axis (uniform: an estimator).
    exact_label: str = "dynamic (exact) QP"

    def plot(self, folder: Path, target: float) -> list[str]:
        from qpp.report.plots import plot_density_histograms, plot_predicted_vs_dynamic

        written = []
        if self.pairs:
            path = folder / "qps_predicted.png"
            written.append(plot_predicted_vs_dynamic(self.pairs, path, self.exact_label))
        if self.densities:
            path = folder / "outlier_density.png"
            written.append(plot_density_histograms(self.densities, target, path))
        return [p.name for p in written]


def compare_modes(
    entry: ZooEntry,
    quantized: QuantizedModel,
    activation_qps: ActivationQPs,
    fp32: torch.nn.Module,
    reference: torch.Tensor,
    batch: tuple[torch.Tensor, ...],
    show_progress: bool,
) -> ModeComparison:
    """Static, predicted and dynamic QPs evaluated side by side (QPP's comparison)."""
    flops = model_flops(fp32, batch)
    overhead = activation_qps.overhead_flops(batch)
    cost = {"static": 0, "predicted": overhead["predictor"], "dynamic": overhead["dynamic"]}
    target = activation_qps.settings.outlier_fraction
    softmax = softmax_outputs(quantized.graph_module)
    comparison = ModeComparison({"model_flops": flops, "modes": {}}, {}, {})
    comparison.rows["output_error_on"] = "log-probabilities" if any(softmax) else "outputs"
    if activation_qps.target_estimator is not None:
        comparison.exact_label = f"exact QP ({activation_qps.target_label}, per input)"
    for mode in ("static", "predicted", "dynamic"):
        activation_qps.set_mode(mode)
        with activation_qps.pairing_qps() as pairs:
            metrics, seconds, layers, outputs = evaluate_quantized(
                entry, quantized, activation_qps, reference, show_progress, mode
            )
        comparison.pairs.update(pairs)
        row: dict[str, Any] = {
            "metrics": metrics,
            "output_error": round(evaluation_output_error(outputs, reference, softmax), 8),
            "seconds": round(seconds, 3),
            "overhead_flops": cost[mode],
            "overhead_percent": round(100.0 * cost[mode] / max(1, flops), 4),
        }
        if layers:
            summary = density_summary(layers, target)
            row["outlier_density"] = {k: v for k, v in summary.items() if k != "layers"}
            comparison.densities[mode] = torch.cat([layer.values for layer in layers])
        comparison.rows["modes"][mode] = row
    return comparison


def quantize_job(
    source: SourceSpec,
    config: QuantConfig,
    output_dir: Path | None,
    force: bool = False,
    show_progress: bool = True,
    compare: bool = False,
) -> tuple[JobResult, QuantizedModel]:
    """Quantize ``source`` with ``config``, evaluate FP32 and quantized, save to ``output_dir``."""
    started = time.perf_counter()
    created = prepare_output(output_dir, force) if output_dir is not None else None
    try:
        result, quantized, activation_qps, comparison = _quantize(
            source, config, show_progress, compare
        )
    except BaseException:
        if created is not None and output_dir is not None:  # leave no empty folders behind
            remove_unused_output(output_dir, created)
        raise
    if output_dir is not None:
        result.output_dir = str(output_dir)
        result.seconds["total"] = round(time.perf_counter() - started, 3)
        if comparison is not None:
            result.extra["plots"] = comparison.plot(output_dir, config.outlier_fraction)
        save_run(output_dir, source, quantized, result.as_dict())
        if activation_qps is not None:
            activation_qps.save(output_dir)
    result.seconds["total"] = round(time.perf_counter() - started, 3)
    return result, quantized


def _quantize(
    source: SourceSpec, config: QuantConfig, show_progress: bool, compare: bool
) -> tuple[JobResult, QuantizedModel, ActivationQPs | None, ModeComparison | None]:
    # Capture and check the overrides before evaluating anything, so bad input fails fast.
    qp_settings = settings_from_config(config)
    entry = resolve_source(source)
    fp32 = entry.load_model()
    calibration_start = time.perf_counter()
    batches = limit_samples(
        check_batches(entry.calibration_set(), "calibration"), config.calibration_samples
    )
    quantized = prepare(fp32, batches[0], config)
    prepare_seconds = time.perf_counter() - calibration_start

    fp32_metrics, fp32_outputs, _ = evaluate_entry(entry, fp32, None, show_progress, "fp32")

    calibration_start = time.perf_counter()
    recipe_report = None
    correction = None
    if config.recipe is None:
        correction = calibrate_and_correct(quantized, batches, show_progress)
    else:
        from qpp.ptq.recipes import run_recipe

        recipe_report = run_recipe(
            config.recipe, quantized, batches, config.adaround_iterations, show_progress
        )
    activation_qps = None
    if qp_settings.needs_per_sample or compare:
        fitted = replace(qp_settings, mode="predicted") if compare else qp_settings
        activation_qps = configure_activation_qps(quantized, batches, fitted, show_progress)
    calibrate_seconds = prepare_seconds + time.perf_counter() - calibration_start

    extra: dict[str, Any] = {
        "quantizers": len(quantized.names),
        "weight_bits_per_element": weight_bits_per_element(quantized),
    }
    if recipe_report is not None:
        extra["recipe"] = asdict(recipe_report)
    if correction is not None:
        extra["empirical_bias_correction"] = asdict(correction)
    comparison = None
    if compare and activation_qps is not None:
        comparison = compare_modes(
            entry, quantized, activation_qps, fp32, fp32_outputs, batches[0], show_progress
        )
        extra["compare"] = comparison.rows
        activation_qps.set_mode(qp_settings.mode)
    quantized_metrics, evaluate_seconds, layers, _ = evaluate_quantized(
        entry, quantized, activation_qps, fp32_outputs, show_progress
    )
    if layers:
        extra["outlier_density"] = density_summary(layers, qp_settings.outlier_fraction)
    if activation_qps is not None and activation_qps.estimator_errors:
        extra["dynamic_estimator"] = {
            "chosen": activation_qps.settings.estimator,
            "calibration_output_error": activation_qps.estimator_errors,
            "static_output_error": activation_qps.static_output_error,
        }
        if activation_qps.layer_estimators and activation_qps.per_layer_errors:
            extra["dynamic_estimator"]["per_layer"] = _layer_choice(
                activation_qps.dynamic_estimator_label,
                activation_qps.per_layer_errors,
                "estimators",
                activation_qps.layer_estimators,
            )
        if activation_qps.target_errors:
            extra["dynamic_estimator"]["predictor_targets"] = activation_qps.target_estimator
            extra["dynamic_estimator"]["predicted_output_error"] = activation_qps.target_errors
        if activation_qps.layer_targets and activation_qps.layer_target_errors:
            extra["dynamic_estimator"]["per_layer_targets"] = _layer_choice(
                activation_qps.target_label,
                activation_qps.layer_target_errors,
                "targets",
                activation_qps.layer_targets,
            )
        if activation_qps.dynamic_mix_errors:
            extra["dynamic_estimator"]["dynamic_mix"] = {
                "errors": {
                    DYNAMIC_MIXES[mix]: error
                    for mix, error in activation_qps.dynamic_mix_errors.items()
                },
                "adopted": DYNAMIC_MIXES[activation_qps.dynamic_mix],
                "changed": activation_qps.dynamic_mix != CHOSEN_MIX,
                "offsets": activation_qps.dynamic_offsets,
            }
        if activation_qps.dynamic_sweep_errors is not None:
            before, after = activation_qps.dynamic_sweep_errors
            extra["dynamic_estimator"]["dynamic_second_sweep"] = {
                "output_error_before": before,
                "output_error_after": after,
                "estimators": activation_qps.layer_estimators,
            }
    if activation_qps is not None and activation_qps.fit_r_squared:
        r2 = list(activation_qps.fit_r_squared.values())
        extra["predictor_r_squared"] = {"min": min(r2), "median": sorted(r2)[len(r2) // 2]}
    result = JobResult(
        model=source.model,
        config=config,
        metrics={"fp32": fp32_metrics, "quantized": quantized_metrics},
        size_bytes={"fp32": model_size_bytes(fp32), "quantized": quantized_size_bytes(quantized)},
        seconds={
            "calibrate": round(calibrate_seconds, 3),
            "evaluate": round(evaluate_seconds, 3),
            "total": 0.0,
        },
        output_dir=None,
        primary_metric=entry.primary_metric,
        extra=extra,
    )
    return result, quantized, activation_qps, comparison


def rebuild_run(folder: Path) -> tuple[RunRecord, ZooEntry, torch.nn.Module, QuantizedModel]:
    """The run saved in ``folder``: its record, source entry, FP32 model and quantized model
    (weights and encodings loaded and checked, so a folder that does not fit fails fast)."""
    record = read_run(folder)
    entry = resolve_source(record.source)
    fp32 = entry.load_model()
    batches = check_batches(entry.calibration_set(), "calibration")
    quantized = prepare(fp32, batches[0], record.config)
    load_weights(quantized, folder)
    quantized.load_encodings(record.encodings)
    return record, entry, fp32, quantized


def eval_job(folder: Path, show_progress: bool = True) -> tuple[JobResult, dict[str, Any]]:
    """Rebuild the quantized model saved in ``folder`` and evaluate it again.

    Returns the new result and the saved report, so callers can check they agree.
    """
    started = time.perf_counter()
    record, entry, fp32, quantized = rebuild_run(folder)
    qp_settings = settings_from_config(record.config)
    activation_qps = (
        load_activation_qps(quantized, folder, qp_settings)
        if qp_settings.needs_per_sample
        else None
    )
    fp32_metrics, fp32_outputs, _ = evaluate_entry(entry, fp32, None, show_progress, "fp32")
    quantized_metrics, evaluate_seconds, _, _ = evaluate_quantized(
        entry, quantized, activation_qps, fp32_outputs, show_progress
    )
    result = JobResult(
        model=record.source.model,
        config=record.config,
        metrics={"fp32": fp32_metrics, "quantized": quantized_metrics},
        size_bytes={"fp32": model_size_bytes(fp32), "quantized": quantized_size_bytes(quantized)},
        seconds={
            "calibrate": 0.0,
            "evaluate": round(evaluate_seconds, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        output_dir=str(folder),
        primary_metric=entry.primary_metric,
    )
    return result, record.report


def _layer_choice(
    label: str | None, errors: tuple[float, float], key: str, choice: dict[str, str]
) -> dict[str, Any]:
    """A layer-by-layer choice for the JSON report: its label, the output error before and
    after it, and each layer's pick under ``key``."""
    before, after = errors
    return {"label": label, "output_error_before": before, "output_error_after": after, key: choice}
