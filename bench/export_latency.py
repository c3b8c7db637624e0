"""qpp's ONNX QDQ export on every zoo model: parity with the simulation, kernels, size, latency.

For each zoo model (small data, as ``ort_compare.py --quick``):

* ``quantize_job`` at W7A8 (``weight_bits=7``, the exact fast u8s8 path on CPUs without VNNI)
  with the ``runtime`` and the ``runtime-int8-eltwise`` placement policies;
* ``export_run`` of both with ``--check``: ORT (all graph optimizations) against the simulation
  on the evaluation set, per output in steps and by task metric, and teacher-forced on every
  quantized tensor (``qpp.export.teacher``); the integer kernels ORT's optimized graph holds;
* ``bench_job``: ORT latency, batch 1 and 32, ``--threads`` intra-op threads (default 2),
  round-robin medians, of FP32, both qpp variants and ORT's own ``quantize_static`` int8 model
  of the same FP32 ONNX (with and without ``reduce_range``); sizes on disk.

The table goes to stdout and into ``docs/benchmarks.md`` between
``<!-- export_latency:start/end -->``.

    .venv/bin/python bench/export_latency.py [--models digits-cnn,ppocr-cls] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_section import write_model_section, write_section
from ort_compare import MODELS, QUICK_SIZES, log, machine_line, make_entry

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- export_latency:start -->", "<!-- export_latency:end -->"
#: (label, weight bits, placement policy) of the qpp variants; the first is ``bench_job``'s own.
VARIANTS = (
    ("W7A8 runtime", 7, "runtime"),
    ("W7A8 runtime-int8-eltwise", 7, "runtime-int8-eltwise"),
)
ELTWISE = "qpp int8 W7A8 runtime-int8-eltwise"


def quantize(entry, folder: Path, weight_bits: int, policy: str):
    """``quantize_job`` on ``entry``'s (small) data, saved to ``folder``."""
    import qpp.pipeline
    from qpp.sim.config import QuantConfig
    from qpp.sources import SourceSpec

    with mock.patch.object(qpp.pipeline, "resolve_source", lambda spec: entry):
        return qpp.pipeline.quantize_job(
            SourceSpec(entry.name),
            QuantConfig(weight_bits=weight_bits, policy=policy),
            folder,
            show_progress=False,
        )


def float_bias_metric(quantized, entry, fp32) -> float:
    """The simulation's primary metric with the biases kept in float (``int32_bias`` off; the
    calibration is the same, since biases stay float while activations are observed)."""
    from qpp.api import run

    evaluation = entry.evaluation_set()
    reference = run(fp32, evaluation.batches, "fp32", False)
    for bias_quantizer in quantized.bias_quantizers():
        bias_quantizer.enabled = False
    try:
        outputs = run(quantized, evaluation.batches, "simulated", False)
    finally:
        for bias_quantizer in quantized.bias_quantizers():
            bias_quantizer.enabled = True
    return entry.metrics(outputs, reference, evaluation)[entry.primary_metric]


def measure_model(name: str, root: Path, seconds: float, threads: int) -> dict:
    from qpp.export.job import bench_job, export_run

    entry = make_entry(name, quick=True)
    fp32 = entry.load_model()
    row: dict = {"model": name, "primary": entry.primary_metric, "variants": {}}
    paths = {}
    for label, bits, policy in VARIANTS:
        log(f"{name}: quantize {label}")
        result, quantized = quantize(entry, root / f"{name}-{policy}", bits, policy)
        log(f"{name}: export {label} and check parity")
        path = root / f"{name}-{policy}.onnx"
        start = time.perf_counter()
        report, kernels, parity = export_run(quantized, entry, path, False, True, fp32)
        seconds_taken = time.perf_counter() - start
        paths[policy] = path
        row["variants"][label] = {
            "fp32": result.metrics["fp32"][entry.primary_metric],
            "float_bias": float_bias_metric(quantized, entry, fp32),
            "int32_biases": len(quantized.bias_quantizers()),
            "parity": parity,
            "kernels": kernels,
            "export": report,
            "seconds": seconds_taken,
        }
        del quantized
    log(f"{name}: latency")
    bench = bench_job(
        root / f"{name}-{VARIANTS[0][2]}",
        time_budget_s=seconds,
        extra_models={ELTWISE: paths[VARIANTS[1][2]]},
        threads=threads,
    )
    row["bench"] = bench
    return row


def fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 2 else f"{value:.2f}"


def model_table(row: dict) -> str:
    from qpp.export.job import FP32, ORT_INT8, ORT_INT8_REDUCED, QPP

    bench = row["bench"]
    primary = row["primary"]
    lines = [
        f"### {row['model']}",
        "",
        f"| variant | {primary} sim | {primary} ORT | |diff| | max steps (output: grid) "
        f"| teacher-forced max steps (tensors, differing) "
        f"| {primary} sim, float biases | integer kernels (float left) | export s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, variant in row["variants"].items():
        parity = variant["parity"]
        steps = ", ".join(
            f"{o.max_steps:.2f} ({o.name}: {'quantized' if o.quantized else 'float, range/255'})"
            for o in parity.outputs
        )
        kernels = ", ".join(f"{op} {n}" for op, n in variant["kernels"].integer.items())
        left = ", ".join(f"{op} {n}" for op, n in variant["kernels"].float_compute.items())
        teacher = parity.teacher
        forced = (
            f"{teacher.max_steps} ({len(teacher.tensors)}, {teacher.differing_fraction:.1e})"
            if teacher is not None
            else "-"
        )
        lines.append(
            f"| qpp {label} ({variant['export'].weight_format} weights) "
            f"| {fmt(parity.simulated_metrics[primary])} "
            f"| {fmt(parity.onnxruntime_metrics[primary])} | {parity.metric_difference:.3f} "
            f"| {steps} | {forced} "
            f"| {fmt(variant['float_bias'])} ({variant['int32_biases']} biases) "
            f"| {kernels}{f' ({left})' if left else ''} | {variant['seconds']:.0f} |"
        )
    lines += [
        "",
        f"| ONNX model (ORT, {bench.threads} thread(s)) | batch 1 ms | x FP32 | batch 32 ms "
        "| x FP32 | x ORT int8 (b1 / b32) | MB | x FP32 size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = [FP32, QPP, ELTWISE, ORT_INT8, ORT_INT8_REDUCED]
    for label in labels:
        latency = bench.latency[label]
        cells = [label + (f" {VARIANTS[0][0]}" if label == QPP else "")]
        for batch in (1, 32):
            cells += [f"{latency[batch].median_ms:.3f}", f"{bench.ratio(label, batch, FP32):.3f}"]
        cells.append(
            f"{bench.ratio(label, 1, ORT_INT8):.3f} / {bench.ratio(label, 32, ORT_INT8):.3f}"
        )
        size = bench.size_bytes[label]
        cells += [f"{size / 1e6:.2f}", f"{size / bench.size_bytes[FP32]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "; ".join(bench.notes) + "."]
    return "\n".join(lines)


def docs_section() -> str:
    """The bench's description; each model's tables follow in their own section."""
    return f"""{START_MARK}
## qpp ONNX QDQ export: parity and latency (`bench/export_latency.py`)

One section per model below, each with the run that measured it (its date, machine, ISA and
command): a run replaces only the models it ran. Data: the `--quick` sizes of `ort_compare.py`
({QUICK_SIZES}).

Parity: the exported file in ONNX Runtime (all graph optimizations, so the fused integer
kernels run) against qpp's simulation on the evaluation set. "max steps" is the largest
difference per output in steps of the output's grid: the quantizer's scale for a quantized
output, (max - min) / 255 of the simulated output for a float one (all zoo outputs are float:
logits, probabilities, embeddings); "teacher-forced": every activation quantizer's integers as
ORT computes them when each op is fed the simulation's integer inputs (`qpp.export.teacher`),
so one float tie does not cascade: the largest difference in steps, how many tensors, and the
share of values that differ. Without VNNI, 7-bit weights are stored as int8 (ORT's u8s8
kernels, which cannot saturate with 7-bit weights; 8-bit weights would be uint8 shifted by 128
for the exact u8u8 kernels). Latency: medians of round-robin `session.run` calls on the same
evaluation samples (batch 32: the first 32), `--threads` intra-op threads per session (the
table says how many); the machine is shared, so
ratios within one model's table are comparable, absolute times less so. ORT int8:
`quantize_static` (QDQ, per-channel QInt8 weights, QUInt8 activations, MinMax on 32
calibration samples) of the same FP32 ONNX; its default 8-bit weights saturate on this CPU,
`reduce_range` (7-bit weights) does not.

The simulation computes what the deployed graph computes: every conv/linear bias whose input
and weight are quantized is rounded onto the int32 accumulator grid s_x·s_w (white paper §2.3,
eq. 11; `QuantConfig.int32_bias`, default on), the int32 values the export writes for ORT's
QLinearConv / QGemm ("sim, float biases": the same model with that rounding off, to show its
cost on the metric), and bias-less convs followed by a per-channel constant Add (Paddle's SE
blocks) have the Add folded into their bias, so no quantizer sits between a conv and its bias.
What is left of "max steps" is float rounding at quantization ties: torch's float conv and
ORT's integer kernels (or MLAS's float conv, with ORT's optimizations off: the same
differences) put a value exactly between two grid points on different sides now and then
(ppocr-cls before the Add folding: 3 of 884,736 values of its 7th conv output one step off on
one batch, growing layer by layer to 16 % of the values of the last ones); a model that
amplifies one-step changes shows it at its outputs, the task metric does not.
{END_MARK}"""


def model_docs_section(table: str, seconds: float, command: str, isa: str) -> str:
    return f"""{table}

{machine_line()} ISA as qpp detects it: {isa}. Command: `{command}`; this model took
{seconds / 60:.1f} min."""


def write_docs(tables: dict[str, tuple[str, float]], command: str, isa: str) -> None:
    write_section(docs_section(), START_MARK, END_MARK, DOCS)
    for name, (table, seconds) in tables.items():
        section = model_docs_section(table, seconds, command, isa)
        write_model_section("export_latency", name, MODELS, section, DOCS)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency budget per batch")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("BENCH_THREADS", "2")),
        help="intra-op threads of every ORT session and of torch (default: $BENCH_THREADS or 2)",
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    from qpp.export.isa import detect_isa

    started = time.perf_counter()
    tables: dict[str, tuple[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="export_latency.") as temporary:
        for name in args.models.split(","):
            model_started = time.perf_counter()
            table = model_table(measure_model(name, Path(temporary), args.seconds, args.threads))
            print(table + "\n", flush=True)
            tables[name] = (table, time.perf_counter() - model_started)
    total = time.perf_counter() - started
    log(f"done in {total / 60:.1f} min")
    if not args.no_docs:
        command = ".venv/bin/python bench/export_latency.py " + " ".join(argv)
        write_docs(tables, command.strip(), detect_isa().summary())
        log(f"wrote {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
