"""PWLQ weights in ONNX: integer branches against dequantized float weights, in ONNX Runtime.

For each zoo model, W4A8 per-channel weights, the core's 8-bit activations: the uniform QDQ
export (reference), PWLQ exported as integer branches (``qpp export --pwlq-export branches``,
the default) with and without bias correction, and PWLQ dequantized to float weights
(``--pwlq-export dequantized``), run in ORT both with its default optimizations and with its
``WeightBiasQuantization`` pass disabled. Per row: file size, the kernels ORT runs, the task
metric of the simulation and of ORT, the largest output difference in quantization steps, and
the median latency at batch 1 and 32.

    .venv/bin/python bench/pwlq_export.py [--models digits-cnn,ppocr-cls] [--no-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from docs_section import write_section  # noqa: E402

from qpp.api import quantize, run  # noqa: E402
from qpp.export.job import bench_feed, export_float_onnx  # noqa: E402
from qpp.export.onnx import export_onnx, output_scales  # noqa: E402
from qpp.export.ort import (  # noqa: E402
    KernelReport,
    check_parity,
    measure_latency,
    optimized_op_counts,
    run_session,
)
from qpp.quant.spec import PiecewiseSpec  # noqa: E402
from qpp.sim.config import QuantConfig  # noqa: E402
from qpp.zoo import entry_class  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- pwlq-export:start -->", "<!-- pwlq-export:end -->"
MODELS = ("digits-cnn", "ppocr-cls")
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def session(path: Path, disabled: list[str] | None = None) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or []
    )


def kernels_cell(path: Path, folder: Path) -> str:
    kernels = KernelReport.from_counts(optimized_op_counts(path, folder))
    parts = [f"{op} {n}" for op, n in sorted(kernels.integer.items())]
    parts += [f"float {op} {n}" for op, n in sorted(kernels.float_compute.items())]
    return ", ".join(parts)


def latency_ms(ort_session: object, entry: object, names: list[str], repeats: int) -> list[float]:
    """Median milliseconds per call at batch 1 and 32."""
    return [
        measure_latency({"s": ort_session}, bench_feed(entry, names, b), repeats)["s"].median_ms
        for b in (1, 32)
    ]


def bench_model(name: str, folder: Path, repeats: int) -> str:
    entry = entry_class(name)()
    fp32 = entry.load_model()
    calibration, evaluation = entry.calibration_set(), entry.evaluation_set()
    example = calibration[0]
    names = list(evaluation.input_names)
    reference = run(fp32, evaluation.batches)
    primary = entry.primary_metric
    float_path = folder / f"{name}.fp32.onnx"
    export_float_onnx(fp32, example, float_path, names)
    pwlq = QuantConfig(weight_bits=4, weight_quantizer="pwlq", piecewise=PiecewiseSpec())
    corrected = QuantConfig(
        weight_bits=4, weight_quantizer="pwlq", piecewise=PiecewiseSpec(bias_correction=True)
    )
    models = {
        "uniform": quantize(fp32, calibration, QuantConfig(weight_bits=4)),
        "pwlq": quantize(fp32, calibration, pwlq),
        "pwlq+bc": quantize(fp32, calibration, corrected),
    }
    rows = [  # label, model key, export form, ORT passes to disable
        ("uniform W4A8 (QDQ)", "uniform", "branches", None),
        ("PWLQ W4A8, branches", "pwlq", "branches", None),
        ("PWLQ W4A8 +BC, branches", "pwlq+bc", "branches", None),
        ("PWLQ W4A8, dequantized", "pwlq", "dequantized", None),
        ("PWLQ W4A8, dequantized, WeightBiasQuantization off", "pwlq", "dequantized", ["x"]),
    ]
    lines = [
        "| export | file KB | kernels ORT runs | sim "
        + primary
        + " | ORT "
        + primary
        + " | max output diff (steps) | ms batch 1 | ms batch 32 |",
        "|---|---|---|---|---|---|---|---|",
        f"| FP32 | {float_path.stat().st_size / 1e3:.0f} | "
        f"{kernels_cell(float_path, folder)} | | | | "
        + " | ".join(f"{ms:.2f}" for ms in latency_ms(session(float_path), entry, names, repeats))
        + " |",
    ]
    simulated = {key: run(model, evaluation.batches) for key, model in models.items()}
    for label, key, form, disabled in rows:
        model = models[key]
        path = folder / f"{name}.{key}.{form}.onnx"
        if not path.exists():
            export_onnx(model, example, path, None, names, piecewise=form)
        passes = ["WeightBiasQuantization"] if disabled else None
        ort_session = session(path, passes)
        outputs = simulated[key]
        outputs_list = list(outputs) if isinstance(outputs, tuple) else [outputs]
        parity = check_parity(
            outputs_list,
            run_session(ort_session, evaluation.batches),
            output_scales(model),
            lambda o: entry.metrics(o, reference, evaluation),
            primary,
        )
        latency = latency_ms(ort_session, entry, names, repeats)
        kernels = "" if disabled else kernels_cell(path, folder)
        lines.append(
            f"| {label} | {path.stat().st_size / 1e3:.0f} | {kernels} | "
            f"{parity.simulated_metrics[primary]:.2f} | "
            f"{parity.onnxruntime_metrics[primary]:.2f} | "
            f"{max(o.max_steps for o in parity.outputs):.3f} | "
            f"{latency[0]:.2f} | {latency[1]:.2f} |"
        )
        print(lines[-1], flush=True)
    return f"### {name}\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=20, help="latency calls per batch size")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    blocks = []
    with tempfile.TemporaryDirectory(prefix="qpp-pwlq-export.") as folder:
        for name in [n.strip() for n in args.models.split(",") if n.strip()]:
            blocks.append(bench_model(name, Path(folder), args.repeats))
    command = "python bench/pwlq_export.py" + (" " + " ".join(argv) if argv else "")
    section = (
        f"""{START_MARK}
## PWLQ export forms in ONNX Runtime (`bench/pwlq_export.py`)

Measured {datetime.date.today().isoformat()}, onnxruntime with {THREADS} intra-op thread(s),
torch {torch.__version__}; command `{command}`, {(time.perf_counter() - started) / 60:.1f} min.
"branches" (`qpp export --pwlq-export branches`, the default): each PWLQ weight as int8 terms
whose sum is the PWLQ weight (centre and tail: 2 per weight; +BC adds the constant shift as a
third), one conv/linear per term, convs written as ConvInteger -> Cast -> Mul because ORT's
QLinearConv would requantize each term before the sum. "dequantized": the PWLQ weights as float
initializers; ORT's default `WeightBiasQuantization` pass then re-quantizes them to its own
int8 grid (the PWLQ grid is lost), so that file matches the simulation only with the pass
disabled. "max output diff (steps)": the largest |ORT - simulation| over the evaluation set,
in the output quantizer's steps (1/255 of the output's span for float outputs). Latency:
median of {args.repeats} calls, on a machine shared with other jobs.

"""
        + "\n".join(blocks)
        + f"\n{END_MARK}"
    )
    print(section)
    if not args.no_docs:
        write_section(section, START_MARK, END_MARK, DOCS)


if __name__ == "__main__":
    main(sys.argv[1:])
