"""qpp's main job: quantize a model, evaluate it against FP32, save the run; and re-evaluate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qpp.api import calibrate, limit_samples, prepare, run
from qpp.data import check_batches
from qpp.runs import (
    check_encoding_sizes,
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
    """Bytes after quantization: enabled weight quantizers store ``bits`` per element plus one
    float scale (and a zero point byte) per channel; every other tensor stays as it is."""
    quantized_targets: dict[str, int] = {}
    for name in model.names:
        quantizer = model.quantizer(name)
        if quantizer.kind.value != "weight" or not quantizer.enabled:
            continue
        weight = model.weight(name)
        channels = quantizer.scale.numel()
        quantized_targets[model.weight_target(name)] = (
            weight.numel() * quantizer.spec.bits + 7
        ) // 8 + channels * 5
    total = 0
    for key, tensor in model.graph_module.state_dict().items():
        if key.startswith("qpp_quantizers."):
            continue
        total += quantized_targets.get(key, tensor.numel() * tensor.element_size())
    return total


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


def quantize_job(
    source: SourceSpec,
    config: QuantConfig,
    output_dir: Path | None,
    force: bool = False,
    show_progress: bool = True,
) -> tuple[JobResult, QuantizedModel]:
    """Quantize ``source`` with ``config``, evaluate FP32 and quantized, save to ``output_dir``."""
    started = time.perf_counter()
    created = prepare_output(output_dir, force) if output_dir is not None else None
    try:
        result, quantized = _quantize(source, config, show_progress)
    except BaseException:
        if created is not None and output_dir is not None:  # leave no empty folders behind
            remove_unused_output(output_dir, created)
        raise
    if output_dir is not None:
        result.output_dir = str(output_dir)
        result.seconds["total"] = round(time.perf_counter() - started, 3)
        save_run(output_dir, source, quantized, result.as_dict())
    result.seconds["total"] = round(time.perf_counter() - started, 3)
    return result, quantized


def _quantize(
    source: SourceSpec, config: QuantConfig, show_progress: bool
) -> tuple[JobResult, QuantizedModel]:
    # Capture and check the overrides before evaluating anything, so bad input fails fast.
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
    extra: dict[str, Any] = {"quantizers": len(quantized.names)}
    if config.recipe is None:
        calibrate(quantized, batches, show_progress)
    else:
        from qpp.ptq.recipes import run_recipe

        report = run_recipe(
            config.recipe, quantized, batches, config.adaround_iterations, show_progress
        )
        extra["recipe"] = asdict(report)
    calibrate_seconds = prepare_seconds + time.perf_counter() - calibration_start

    quantized_metrics, _, evaluate_seconds = evaluate_entry(
        entry, quantized, fp32_outputs, show_progress, "quantized"
    )
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
    return result, quantized


def eval_job(folder: Path, show_progress: bool = True) -> tuple[JobResult, dict[str, Any]]:
    """Rebuild the quantized model saved in ``folder`` and evaluate it again.

    Returns the new result and the saved report, so callers can check they agree.
    """
    started = time.perf_counter()
    record = read_run(folder)
    entry = resolve_source(record.source)
    fp32 = entry.load_model()
    # Rebuild and check the saved model first: a folder that does not fit fails fast.
    batches = check_batches(entry.calibration_set(), "calibration")
    quantized = prepare(fp32, batches[0], record.config)
    load_weights(quantized, folder)
    check_encoding_sizes(quantized, record.encodings)
    quantized.load_encodings(record.encodings)
    fp32_metrics, fp32_outputs, _ = evaluate_entry(entry, fp32, None, show_progress, "fp32")
    quantized_metrics, _, evaluate_seconds = evaluate_entry(
        entry, quantized, fp32_outputs, show_progress, "quantized"
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
