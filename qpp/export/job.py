"""``qpp export`` and ``qpp bench``: a saved run folder to ONNX, checked and timed in ORT."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpp.api import limit_samples, run
from qpp.export.isa import CpuIsa, WeightFormat, detect_isa
from qpp.export.onnx import (
    ExportReport,
    check_output_path,
    choose_weight_format,
    export_float_onnx,
    export_onnx,
    output_scales,
)
from qpp.export.ort import (
    DEFAULT_THREADS,
    KernelReport,
    Latency,
    ParityReport,
    check_parity,
    make_session,
    measure_latency,
    optimized_op_counts,
    run_session,
)
from qpp.export.piecewise import check_piecewise_export
from qpp.export.predictor import PREDICTED_BATCH, check_predicted_batch
from qpp.export.teacher import teacher_forced_parity
from qpp.pipeline import rebuild_run
from qpp.predict import load_activation_qps, settings_from_config
from qpp.predict.activation_qps import ActivationQPs
from qpp.sim.config import QuantConfig
from qpp.sim.model import QuantizedModel
from qpp.zoo.base import Batch, ZooEntry

BENCH_BATCH_SIZES = (1, 32)
#: Calibration samples for ORT's own quantization in ``qpp bench``: latency does not depend on
#: the ranges, and ORT's calibrators keep every activation of every sample in memory.
REFERENCE_CALIBRATION_SAMPLES = 32


@dataclass
class ExportResult:
    """What ``qpp export`` did; ``as_dict`` is its ``--json`` object."""

    model: str
    export: ExportReport
    isa: CpuIsa
    kernels: KernelReport
    parity: ParityReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "export": self.export.as_dict(),
            "isa": self.isa.as_dict(),
            "kernels": self.kernels.__dict__,
            "parity": None if self.parity is None else self.parity.as_dict(),
            "seconds": self.seconds,
        }


def _input_names(entry: ZooEntry, example: Batch) -> list[str]:
    names = list(entry.evaluation_set().input_names)
    return names if len(names) == len(example) else [f"input{i}" for i in range(len(example))]


def export_run(
    quantized: QuantizedModel,
    entry: ZooEntry,
    path: Path,
    force: bool,
    check: bool,
    fp32: torch.nn.Module | None = None,
    show_progress: bool = False,
    piecewise: str = "branches",
    activation_qps: ActivationQPs | None = None,
) -> tuple[ExportReport, KernelReport, ParityReport | None]:
    """Export ``quantized`` to ``path``, list the kernels ORT runs, and (``check``) compare ORT
    with the simulation on ``entry``'s evaluation set; ``piecewise``: the form of PWLQ weights;
    ``activation_qps``: a predicted run's predictors (the graph then takes one input at a time,
    and the check feeds ORT the evaluation set sample by sample)."""
    example = entry.calibration_set()[0]
    names = _input_names(entry, example)
    report = export_onnx(quantized, example, path, None, names, force, piecewise, activation_qps)
    with tempfile.TemporaryDirectory(prefix="qpp-export.") as folder:
        kernels = KernelReport.from_counts(optimized_op_counts(path, Path(folder)))
    parity = None
    if check:
        assert fp32 is not None
        evaluation = entry.evaluation_set()
        reference = run(fp32, evaluation.batches, "fp32", show_progress)
        simulated = run(quantized, evaluation.batches, "simulated", show_progress)
        feed = evaluation.batches
        if report.predicted_activations:
            feed = single_samples(feed)
        deployed = run_session(make_session(path), feed, show_progress)
        simulated_list = list(simulated) if isinstance(simulated, tuple) else [simulated]
        parity = check_parity(
            simulated_list,
            deployed,
            output_scales(quantized),
            lambda outputs: entry.metrics(outputs, reference, evaluation),  # type: ignore[arg-type]
            entry.primary_metric,
        )
        parity.kernels = kernels
        parity.teacher = teacher_forced_parity(
            quantized,
            evaluation.batches,
            names,
            WeightFormat(report.weight_format),
            piecewise,
        )
    return report, kernels, parity


def single_samples(batches: list[Batch]) -> list[Batch]:
    """``batches`` split into batches of ``PREDICTED_BATCH`` samples, in order."""
    return [
        tuple(x[start : start + PREDICTED_BATCH] for x in batch)
        for batch in batches
        for start in range(0, int(batch[0].shape[0]), PREDICTED_BATCH)
    ]


def load_run_activation_qps(
    folder: Path, config: QuantConfig, quantized: QuantizedModel
) -> ActivationQPs | None:
    """The per-input activation QPs saved with the run in ``folder`` (None for static)."""
    settings = settings_from_config(config)
    if not settings.needs_per_sample:
        return None
    return load_activation_qps(quantized, folder, settings)


def export_job(
    folder: Path,
    onnx_path: Path,
    check: bool,
    force: bool,
    show_progress: bool = True,
    piecewise: str = "branches",
) -> ExportResult:
    """Rebuild the run in ``folder`` and export it to ``onnx_path`` (``qpp export``)."""
    started = time.perf_counter()
    check_output_path(onnx_path, force)  # before the slow part
    check_piecewise_export(piecewise)
    record, entry, fp32, quantized = rebuild_run(folder)
    activation_qps = load_run_activation_qps(folder, record.config, quantized)
    report, kernels, parity = export_run(
        quantized, entry, onnx_path, force, check, fp32, show_progress, piecewise, activation_qps
    )
    return ExportResult(
        record.source.model,
        report,
        detect_isa(),
        kernels,
        parity,
        {"total": round(time.perf_counter() - started, 3)},
    )


# --- bench -------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """Latency of FP32, qpp int8 and ORT's own int8 for one run folder (``qpp bench``)."""

    model: str
    isa: CpuIsa
    threads: int
    weight_format: str
    #: label -> batch size -> latency
    latency: dict[str, dict[int, Latency]]
    size_bytes: dict[str, int]
    kernels: dict[str, KernelReport]
    notes: list[str] = field(default_factory=list)

    def ratio(self, label: str, batch_size: int, baseline: str) -> float:
        """``label``'s median latency divided by ``baseline``'s (below 1: faster)."""
        latency, reference = self.latency[label][batch_size], self.latency[baseline][batch_size]
        return latency.median_ms / reference.median_ms

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "isa": self.isa.as_dict(),
            "threads": self.threads,
            "weight_format": self.weight_format,
            "latency_ms": {
                label: {str(b): latency.__dict__ for b, latency in by_batch.items()}
                for label, by_batch in self.latency.items()
            },
            "ratios_vs_fp32": {
                label: {str(b): round(self.ratio(label, b, FP32), 4) for b in by_batch}
                for label, by_batch in self.latency.items()
            },
            "size_bytes": self.size_bytes,
            "kernels": {label: k.__dict__ for label, k in self.kernels.items()},
            "notes": self.notes,
        }


FP32, QPP, ORT_INT8, ORT_INT8_REDUCED = (
    "FP32",
    "qpp int8",
    "ORT quantize_static int8",
    "ORT quantize_static int8 reduce_range",
)


def fp32_onnx(entry: ZooEntry, fp32: torch.nn.Module, example: Batch, path: Path) -> str:
    """The FP32 ONNX file: the source file for ONNX models (PP-OCR, a user's .onnx), else
    ``torch.onnx.export`` of the FP32 model. Returns where it came from."""
    source = _onnx_source(entry)
    if source is not None:
        path.write_bytes(source.read_bytes())
        return f"the source ONNX file {source.name}"
    export_float_onnx(fp32, example, path, _input_names(entry, example))
    return "torch.onnx.export (dynamo) of the FP32 model"


def _onnx_source(entry: ZooEntry) -> Path | None:
    model_file = getattr(entry, "model_file", None)
    if model_file is not None:
        from qpp.zoo.ppocr import model_path

        return model_path(model_file)
    name = getattr(entry, "name", "")
    if isinstance(name, str) and name.lower().endswith(".onnx") and Path(name).is_file():
        return Path(name)
    return None


def bench_feed(entry: ZooEntry, names: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """``batch_size`` evaluation samples (repeated if there are fewer) as an ORT feed."""
    batches = entry.evaluation_set().batches
    columns = [torch.cat([batch[i] for batch in batches]) for i in range(len(batches[0]))]
    count = columns[0].shape[0]
    index = torch.arange(batch_size) % count
    return {name: column[index].numpy() for name, column in zip(names, columns, strict=True)}


def bench_job(
    folder: Path,
    batch_sizes: tuple[int, ...] | None = None,
    time_budget_s: float = 20.0,
    repeats: int = 200,
    reduce_range: bool = True,
    extra_models: dict[str, Path] | None = None,
    threads: int = DEFAULT_THREADS,
) -> BenchResult:
    """Latency in ORT of the FP32 model, qpp's int8 export and ORT's own ``quantize_static``
    int8 model of the same FP32 ONNX (and its 7-bit ``reduce_range`` variant), batch 1 and
    32 (``batch_sizes``; batch 1 only for a run with predicted QPs), round-robin, median of up
    to ``repeats`` runs or ``time_budget_s`` per batch size.
    ``extra_models`` (label -> ONNX file taking the same inputs) are timed alongside, every
    session with ``threads`` intra-op threads."""
    from qpp.export.ort_reference import preprocess, quantize_static_reference

    record, entry, fp32, quantized = rebuild_run(folder)
    activation_qps = load_run_activation_qps(folder, record.config, quantized)
    notes = []
    if activation_qps is not None and record.config.activation_ranges == "predicted":
        if batch_sizes is None:
            batch_sizes = (PREDICTED_BATCH,)
            notes.append("predicted activation QPs: the graph takes batch 1, so only batch 1")
        for batch_size in batch_sizes:
            check_predicted_batch(batch_size)
    batch_sizes = batch_sizes or BENCH_BATCH_SIZES
    isa = detect_isa()
    example = entry.calibration_set()[0]
    names = _input_names(entry, example)
    with tempfile.TemporaryDirectory(prefix="qpp-bench.") as temporary:
        root = Path(temporary)
        paths = {FP32: root / "fp32.onnx", QPP: root / "qpp.onnx"}
        notes.append(f"FP32 ONNX: {fp32_onnx(entry, fp32, example, paths[FP32])}")
        export = export_onnx(
            quantized, example, paths[QPP], None, names, activation_qps=activation_qps
        )
        calibration = [
            {name: tensor.numpy() for name, tensor in zip(names, batch, strict=True)}
            for batch in limit_samples(entry.calibration_set(), REFERENCE_CALIBRATION_SAMPLES)
        ]
        prepared, how, _ = preprocess(paths[FP32], calibration[0], root)
        notes.append(f"ORT quantizes the FP32 ONNX after {how}")
        paths[ORT_INT8] = quantize_static_reference(prepared, calibration, root / "ort.onnx")
        if reduce_range:
            paths[ORT_INT8_REDUCED] = quantize_static_reference(
                prepared, calibration, root / "ort_reduced.onnx", reduce_range=True
            )
        paths.update(extra_models or {})
        kernels = {
            label: KernelReport.from_counts(optimized_op_counts(path, root))
            for label, path in paths.items()
        }
        sessions = {label: make_session(path, threads) for label, path in paths.items()}
        latency: dict[str, dict[int, Latency]] = {label: {} for label in paths}
        for batch_size in batch_sizes:
            feed = bench_feed(entry, names, batch_size)
            measured = measure_latency(sessions, feed, repeats, time_budget_s=time_budget_s)
            for label, value in measured.items():
                latency[label][batch_size] = value
        sizes = {label: path.stat().st_size for label, path in paths.items()}
    return BenchResult(
        record.source.model,
        isa,
        threads,
        export.weight_format,
        latency,
        sizes,
        kernels,
        notes,
    )


__all__ = [
    "BenchResult",
    "ExportResult",
    "bench_job",
    "choose_weight_format",
    "export_job",
    "export_run",
]
