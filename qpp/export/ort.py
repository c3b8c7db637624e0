"""ONNX Runtime: sessions, the kernels its optimizer chose, parity with the simulation, latency."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpp.report.progress import progress

DEFAULT_THREADS = 2
#: Parity: ORT may differ from the simulation by this many steps on a quantized output...
MAX_STEPS = 1.0
#: ...and by this much on the primary task metric (points; cosines x 100).
MAX_METRIC_DIFFERENCE = 0.1
#: Ops of ORT's optimized graph that compute with integers (QDQ fusions and their relatives).
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QGemm",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "QAttention",
        "DynamicQuantizeLSTM",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSoftmax",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
    }
)
#: Float ops that do the same work, left over where a fusion did not happen.
FLOAT_COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"})


def make_session(
    model: str | Path | bytes,
    threads: int = DEFAULT_THREADS,
    optimized_model: Path | None = None,
) -> object:
    """A CPU session with all graph optimizations (QDQ fusions included) and ``threads``
    intra-op threads; ``optimized_model`` receives the graph ORT actually runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the "hardware specific optimizations" warning is expected
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def optimized_op_counts(model: str | Path, folder: Path) -> Counter[str]:
    """How many of each op ORT's optimized version of ``model`` holds (written into
    ``folder``)."""
    import onnx

    optimized = Path(folder) / (Path(model).stem + ".optimized.onnx")
    make_session(model, optimized_model=optimized)
    graph = onnx.load(str(optimized), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


@dataclass(frozen=True)
class KernelReport:
    """Integer kernels ORT runs, and float compute ops it left (a missed fusion)."""

    integer: dict[str, int]
    float_compute: dict[str, int]

    @classmethod
    def from_counts(cls, counts: Counter[str]) -> KernelReport:
        return cls(
            {op: n for op, n in sorted(counts.items()) if op in INTEGER_KERNELS},
            {op: n for op, n in sorted(counts.items()) if op in FLOAT_COMPUTE_OPS},
        )


def run_session(
    session: object, batches: Sequence[Sequence[torch.Tensor]], show_progress: bool = False
) -> list[np.ndarray]:
    """Every output of ``session`` over ``batches``, each concatenated on dim 0."""
    names = [value.name for value in session.get_inputs()]  # type: ignore[attr-defined]
    outputs: list[list[np.ndarray]] = []
    for batch in progress(batches, "onnxruntime", show_progress):
        feed = {name: tensor.numpy() for name, tensor in zip(names, batch, strict=True)}
        for index, value in enumerate(session.run(None, feed)):  # type: ignore[attr-defined]
            if index == len(outputs):
                outputs.append([])
            outputs[index].append(value)
    return [np.concatenate(parts) for parts in outputs]


# --- parity ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputParity:
    """How far ORT's output is from the simulation's, in steps of the output's grid.

    ``quantized`` outputs come straight from a quantizer, and ``step`` is its scale. Float
    outputs (a linear layer's dequantized accumulator, a normalization) have no grid; their
    step is that of an 8-bit grid over the simulated output's range, ``(max - min) / 255``.
    """

    name: str
    quantized: bool
    step: float
    max_abs_difference: float
    max_steps: float
    #: Share of elements that differ by more than 1e-6 of a step.
    differing_fraction: float


@dataclass
class ParityReport:
    outputs: list[OutputParity]
    #: Task metrics of the simulation and of ORT, both against the FP32 model.
    simulated_metrics: dict[str, float]
    onnxruntime_metrics: dict[str, float]
    primary_metric: str
    kernels: KernelReport | None = None
    notes: list[str] = field(default_factory=list)
    #: Teacher-forced parity of every quantized tensor (``qpp.export.teacher.TeacherReport``).
    teacher: Any = None

    @property
    def metric_difference(self) -> float:
        """|ORT - simulation| on the primary metric, in points (cosines x 100)."""
        sim = self.simulated_metrics[self.primary_metric]
        deployed = self.onnxruntime_metrics[self.primary_metric]
        scale = 100.0 if abs(sim) <= 1.0 and abs(deployed) <= 1.0 else 1.0
        return abs(sim - deployed) * scale

    @property
    def passed(self) -> bool:
        """At most ``MAX_STEPS`` on quantized outputs (and, teacher-forced, on every quantized
        tensor) and the metric within ``MAX_METRIC_DIFFERENCE`` points."""
        steps = self.max_quantized_steps
        teacher = self.teacher is None or self.teacher.passed
        return (
            (steps is None or steps <= MAX_STEPS)
            and teacher
            and (self.metric_difference <= MAX_METRIC_DIFFERENCE)
        )

    @property
    def max_quantized_steps(self) -> float | None:
        steps = [o.max_steps for o in self.outputs if o.quantized]
        return max(steps) if steps else None

    def as_dict(self) -> dict[str, object]:
        return {
            "outputs": [o.__dict__ for o in self.outputs],
            "simulated_metrics": self.simulated_metrics,
            "onnxruntime_metrics": self.onnxruntime_metrics,
            "primary_metric": self.primary_metric,
            "metric_difference": self.metric_difference,
            "passed": self.passed,
            "kernels": None if self.kernels is None else self.kernels.__dict__,
            "notes": self.notes,
            "teacher_forced": None if self.teacher is None else self.teacher.as_dict(),
        }


def output_parity(
    name: str, simulated: np.ndarray, deployed: np.ndarray, quantizer_scale: float | None
) -> OutputParity:
    """``OutputParity`` of one output (``quantizer_scale``: the scale of the quantizer that
    produces it, ``None`` for a float output)."""
    simulated = simulated.astype(np.float64)
    deployed = deployed.astype(np.float64)
    if quantizer_scale is not None:
        step = float(quantizer_scale)
    else:
        span = float(simulated.max() - simulated.min()) if simulated.size else 0.0
        step = span / 255 if span > 0 else 1.0
    difference = np.abs(simulated - deployed)
    largest = float(difference.max()) if difference.size else 0.0
    return OutputParity(
        name,
        quantizer_scale is not None,
        step,
        largest,
        largest / step,
        float((difference > 1e-6 * step).mean()) if difference.size else 0.0,
    )


def check_parity(
    simulated: Sequence[torch.Tensor],
    deployed: Sequence[np.ndarray],
    output_scales: Sequence[float | None],
    metrics: Callable[[object], dict[str, float]],
    primary_metric: str,
    output_names: Sequence[str] | None = None,
) -> ParityReport:
    """Compare the simulation's outputs with ORT's, output by output, and by task metric.

    ``metrics(outputs)`` scores outputs (a tensor, or a tuple for several) against FP32.
    """
    names = list(output_names or [f"output{i}" for i in range(len(simulated))])
    per_output = [
        output_parity(name, sim.numpy(), dep, scale)
        for name, sim, dep, scale in zip(names, simulated, deployed, output_scales, strict=True)
    ]

    def as_model_output(values: Sequence[torch.Tensor]) -> object:
        return values[0] if len(values) == 1 else tuple(values)

    deployed_tensors = [torch.from_numpy(np.ascontiguousarray(d)) for d in deployed]
    return ParityReport(
        per_output,
        metrics(as_model_output(list(simulated))),
        metrics(as_model_output(deployed_tensors)),
        primary_metric,
    )


# --- latency -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Median (and spread) of repeated ``session.run`` calls on one feed, in milliseconds."""

    batch_size: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def measure_latency(
    sessions: dict[str, object],
    feed: dict[str, np.ndarray],
    repeats: int,
    warmup: int = 3,
    time_budget_s: float | None = None,
) -> dict[str, Latency]:
    """Latency of each session on ``feed``, run round-robin (one call of each in turn) so a
    change in machine load touches every model alike. Stops early after ``time_budget_s``."""
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {label: [] for label in sessions}
    started = time.perf_counter()
    for _ in range(repeats):
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)  # type: ignore[attr-defined]
            times[label].append((time.perf_counter() - start) * 1000)
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            break
    batch_size = int(next(iter(feed.values())).shape[0])
    result = {}
    for label, values in times.items():
        deciles = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
        result[label] = Latency(
            batch_size, statistics.median(values), deciles[0], deciles[-1], len(values)
        )
    return result
