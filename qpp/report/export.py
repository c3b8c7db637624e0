"""Terminal tables (rich) for ``qpp export`` and ``qpp bench``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _kernels(kernels: dict[str, dict[str, int]]) -> str:
    integer = ", ".join(f"{op} x{n}" for op, n in kernels["integer"].items()) or "none"
    left = ", ".join(f"{op} x{n}" for op, n in kernels["float_compute"].items())
    return integer + (f" (float: {left})" if left else "")


def print_export(result: dict[str, Any], console: Console | None = None) -> None:
    """What ``qpp export`` wrote, the kernels ORT runs and, with ``--check``, the parity."""
    console = console or Console()
    export = result["export"]
    console.print(
        f"wrote {export['path']} ({export['bytes'] / 1e6:.2f} MB, opset {export['opset']}, "
        f"weights {export['weight_format']}: {export['quantized_weights']} quantized weights, "
        f"{export['quantized_activations']} activations, {export['int32_biases']} int32 biases)"
    )
    for note in export["notes"]:
        console.print(f"note: {note}")
    if export["float_quantizers"]:
        console.print(f"left in float: {', '.join(export['float_quantizers'])}")
    console.print(f"ORT integer kernels: {_kernels(result['kernels'])}")
    isa = result["isa"]
    flags = ", ".join(name for name, present in isa["flags"].items() if present) or "none"
    console.print(f"CPU: {isa['model_name']} ({flags})")
    parity = result["parity"]
    if parity is None:
        return
    table = Table(title="simulation vs ONNX Runtime", title_justify="left")
    for column in ("output", "grid", "step", "max |diff|", "max steps"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for output in parity["outputs"]:
        table.add_row(
            output["name"],
            "quantized" if output["quantized"] else "float (range/255)",
            f"{output['step']:.3g}",
            f"{output['max_abs_difference']:.3g}",
            f"{output['max_steps']:.3f}",
        )
    console.print(table)
    metrics = Table(title="task metrics vs FP32", title_justify="left")
    for column in ("metric", "simulated", "ONNX Runtime"):
        metrics.add_column(column, justify="left" if column == "metric" else "right")
    for key, value in parity["simulated_metrics"].items():
        marker = " *" if key == parity["primary_metric"] else ""
        deployed = parity["onnxruntime_metrics"][key]
        metrics.add_row(f"{key}{marker}", f"{value:.4f}", f"{deployed:.4f}")
    console.print(metrics)
    teacher = parity.get("teacher_forced")
    if teacher is not None:
        console.print(
            f"teacher-forced (each op fed the simulation's inputs): {teacher['tensors']} "
            f"quantized tensors, max {teacher['max_steps']} step(s) (worst: "
            f"{teacher['worst_tensor']}), {teacher['differing_fraction']:.2e} of values differ, "
            f"{teacher['batches']} batch(es)"
        )
    verdict = "PASSED" if parity["passed"] else "FAILED"
    console.print(
        f"parity {verdict} (<= 1 step on quantized outputs and, teacher-forced, on every "
        "quantized tensor; metric within 0.1)"
    )


def print_bench(result: dict[str, Any], console: Console | None = None) -> None:
    """Median latencies and their ratios to FP32, per batch size."""
    console = console or Console()
    latency, ratios = result["latency_ms"], result["ratios_vs_fp32"]
    batches = list(next(iter(latency.values())))
    table = Table(
        title=f"{result['model']}: ONNX Runtime latency, {result['threads']} threads",
        title_justify="left",
    )
    table.add_column("model")
    for batch in batches:
        table.add_column(f"batch {batch} ms", justify="right")
        table.add_column("x FP32", justify="right")
    table.add_column("MB", justify="right")
    table.add_column("integer kernels")
    for label, by_batch in latency.items():
        cells = [label]
        for batch in batches:
            cells += [f"{by_batch[batch]['median_ms']:.3f}", f"{ratios[label][batch]:.3f}"]
        cells.append(f"{result['size_bytes'][label] / 1e6:.2f}")
        cells.append(_kernels(result["kernels"][label]))
        table.add_row(*cells)
    console.print(table)
    isa = result["isa"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa["flags"].items())
    console.print(f"CPU: {isa['model_name']} ({flags}); qpp weights: {result['weight_format']}")
    for note in result["notes"]:
        console.print(note)
