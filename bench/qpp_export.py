"""QPP deployed: the predictors inside the ONNX graph, against static QDQ and ORT's own int8.

For each model, qpp quantizes once at W8A8 (per-channel weights, the core's calibration) and
fits the default predictors (``--activation-ranges predicted``, uniform); then:

* ``export_onnx`` twice: the static QDQ graph, and the predicted graph whose predictors compute
  every predicted activation's scale and zero point per input (``qpp.export.predictor``,
  batch 1);
* the task metric of the simulation (static and predicted modes) and of ORT running each
  graph (the predicted one sample by sample), and the largest output difference between
  ORT's predicted graph and the predicted simulation, in steps (``check_parity``);
* ONNX Runtime's own int8 of the same FP32 ONNX: ``quantize_static`` (QDQ, per channel) and,
  for transformer models, ``quantize_dynamic`` (per-tensor ranges reduced at run time);
* ORT latency at batch 1 (round-robin medians, ``--threads`` intra-op threads) of FP32, qpp
  static, qpp predicted and ORT's models.

The tables go to stdout and into ``docs/benchmarks.md`` between
``<!-- qpp_export:start/end -->``.

    .venv/bin/python bench/qpp_export.py [--models minilm,ppocr-cls] [--seconds 20]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import onnx  # noqa: E402
import torch  # noqa: E402
from docs_section import write_section  # noqa: E402

from qpp.api import calibrate, prepare, run  # noqa: E402
from qpp.export.job import bench_feed, fp32_onnx, single_samples  # noqa: E402
from qpp.export.onnx import export_onnx, output_scales  # noqa: E402
from qpp.export.ort import (  # noqa: E402
    KernelReport,
    check_parity,
    make_session,
    measure_latency,
    optimized_op_counts,
    run_session,
)
from qpp.predict import configure_activation_qps, settings_from_config  # noqa: E402
from qpp.sim.config import QuantConfig  # noqa: E402
from qpp.zoo import entry_class  # noqa: E402

START_MARK, END_MARK = "<!-- qpp_export:start -->", "<!-- qpp_export:end -->"
SIZES: dict[str, dict[str, int]] = {
    "digits-cnn": {},
    "ppocr-cls": {},
    "minilm": {"num_calibration": 64, "num_evaluation": 200},
    "ppocr-rec": {"num_calib": 64, "num_eval": 100},
    "ppocr-det": {"num_calib": 32, "num_eval": 32},
}
#: Models whose ORT baseline includes ``quantize_dynamic`` (MatMul-heavy transformers).
DYNAMIC_BASELINE = {"minilm"}
REFERENCE_CALIBRATION_SAMPLES = 32


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ort_models(entry: Any, fp32: torch.nn.Module, names: list[str], root: Path) -> dict:
    """ORT's ``quantize_static`` (and, for transformers, ``quantize_dynamic``) of the FP32 ONNX."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qpp.api import limit_samples
    from qpp.export.ort_reference import preprocess, quantize_static_reference

    example = entry.calibration_set()[0]
    paths = {"FP32": root / "fp32.onnx"}
    fp32_onnx(entry, fp32, example, paths["FP32"])
    calibration = [
        {name: tensor.numpy() for name, tensor in zip(names, batch, strict=True)}
        for batch in limit_samples(entry.calibration_set(), REFERENCE_CALIBRATION_SAMPLES)
    ]
    prepared, _, _ = preprocess(paths["FP32"], calibration[0], root)
    paths["ORT static int8"] = quantize_static_reference(prepared, calibration, root / "ort.onnx")
    if entry.name in DYNAMIC_BASELINE:
        paths["ORT dynamic int8"] = root / "ort_dynamic.onnx"
        quantize_dynamic(str(prepared), str(paths["ORT dynamic int8"]), weight_type=QuantType.QInt8)
    return paths


def measure(name: str, root: Path, seconds: float, threads: int) -> dict[str, Any]:
    entry = entry_class(name)(**SIZES.get(name, {}))
    fp32 = entry.load_model()
    calibration, evaluation = entry.calibration_set(), entry.evaluation_set()
    names = list(evaluation.input_names)
    reference = run(fp32, evaluation.batches)
    primary = entry.primary_metric

    def score(outputs: Any) -> float:
        return float(entry.metrics(outputs, reference, evaluation)[primary])

    log(f"{name}: quantize W8A8 and fit the predictors")
    config = QuantConfig(activation_ranges="predicted")
    quantized = prepare(fp32, calibration[0], config)
    calibrate(quantized, calibration)
    handle = configure_activation_qps(quantized, calibration, settings_from_config(config))
    paths = ort_models(entry, fp32, names, root)
    paths["qpp static"] = root / "qpp_static.onnx"
    paths["qpp predicted"] = root / "qpp_predicted.onnx"
    row: dict[str, Any] = {"model": name, "primary": primary, "metrics": {}}
    row["metrics"]["ORT: FP32"] = score(reference)
    handle.set_mode("static")
    log(f"{name}: export static and predicted")
    # The same calibrated model with its static encodings: the static QDQ export.
    quantized.config = replace(config, activation_ranges="static")
    export_onnx(quantized, calibration[0], paths["qpp static"], None, names)
    quantized.config = config
    row["metrics"]["sim static"] = score(run(quantized, evaluation.batches))
    handle.set_mode("predicted")
    started = time.perf_counter()
    report = export_onnx(
        quantized, calibration[0], paths["qpp predicted"], None, names, activation_qps=handle
    )
    row["export_seconds"] = time.perf_counter() - started
    row["report"] = report
    simulated = run(quantized, evaluation.batches)
    row["metrics"]["sim predicted"] = score(simulated)
    log(f"{name}: ORT accuracy")
    outputs = {}
    for label, path in paths.items():
        if label == "FP32":
            continue
        batches = single_samples(evaluation.batches) if label == "qpp predicted" else None
        deployed = run_session(make_session(path, threads), batches or evaluation.batches)
        tensors = [torch.from_numpy(d) for d in deployed]
        outputs[label] = deployed
        row["metrics"][f"ORT: {label}"] = score(tensors[0] if len(tensors) == 1 else tuple(tensors))
    simulated_list = list(simulated) if isinstance(simulated, tuple) else [simulated]
    row["parity"] = check_parity(
        simulated_list,
        outputs["qpp predicted"],
        output_scales(quantized),
        lambda out: entry.metrics(out, reference, evaluation),
        primary,
    )
    with tempfile.TemporaryDirectory() as folder:
        row["kernels"] = {
            label: KernelReport.from_counts(optimized_op_counts(path, Path(folder)))
            for label, path in paths.items()
        }
    row["nodes"] = {
        label: len(onnx.load(str(paths[label])).graph.node)
        for label in ("qpp static", "qpp predicted")
    }
    row["flops_share"] = handle_overhead(handle, quantized, calibration[0])
    log(f"{name}: latency, batch 1, {threads} thread(s)")
    sessions = {label: make_session(path, threads) for label, path in paths.items()}
    feed = bench_feed(entry, names, 1)
    row["latency"] = measure_latency(sessions, feed, 400, time_budget_s=seconds)
    row["threads"] = threads
    return row


def handle_overhead(handle: Any, quantized: Any, batch: Any) -> float:
    """The predictors' FLOPs as a share of the model's (``qpp.predict.cost``)."""
    from qpp.predict.activation_qps import static_quantizers
    from qpp.predict.cost import model_flops

    with static_quantizers(quantized):
        flops = model_flops(quantized, batch)
    return handle.overhead_flops(batch)["predictor"] / flops


def fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 2 else f"{value:.2f}"


def model_section(row: dict[str, Any]) -> str:
    primary, report, parity = row["primary"], row["report"], row["parity"]
    latency = row["latency"]
    steps = ", ".join(
        f"{o.max_steps:.2f} ({'quantized' if o.quantized else 'float, range/255'})"
        for o in parity.outputs
    )
    lines = [
        f"### {row['model']}",
        "",
        f"{report.predictors} predictors compute the QPs of {report.predicted_activations} of "
        f"{report.quantized_activations} activation quantizers in the graph "
        f"({row['nodes']['qpp predicted']} ONNX nodes vs {row['nodes']['qpp static']} static; "
        f"predictor FLOPs {100 * row['flops_share']:.3f} % of the model's); ORT's predicted "
        f"graph vs the predicted simulation: max {steps} steps per output, "
        f"{primary} differs by {parity.metric_difference:.3f} points.",
        "",
        f"| model (ORT, {row['threads']} thread) | {primary} | batch 1 ms | x qpp static "
        "| integer kernels (float compute left) |",
        "|---|---|---|---|---|",
    ]
    static_ms = latency["qpp static"].median_ms
    for label in latency:
        metric = row["metrics"].get(f"ORT: {label}")
        kernels = row["kernels"][label]
        integer = ", ".join(f"{op} {n}" for op, n in kernels.integer.items()) or "none"
        left = ", ".join(f"{op} {n}" for op, n in kernels.float_compute.items())
        lines.append(
            f"| {label} | {'' if metric is None else fmt(metric)} "
            f"| {latency[label].median_ms:.2f} | {latency[label].median_ms / static_ms:.2f} "
            f"| {integer}{f' ({left})' if left else ''} |"
        )
    lines += [
        "",
        f"Simulation: static {fmt(row['metrics']['sim static'])}, predicted "
        f"{fmt(row['metrics']['sim predicted'])}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,ppocr-cls")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = []
    with tempfile.TemporaryDirectory(prefix="qpp-export-bench.") as folder:
        for name in args.models.split(","):
            root = Path(folder) / name
            root.mkdir()
            row = measure(name, root, args.seconds, args.threads)
            section = model_section(row)
            print(section + "\n", flush=True)
            sections.append(section)
    command = f"python bench/qpp_export.py --models {args.models} --threads {args.threads}"
    text = "\n\n".join(
        [
            START_MARK,
            "## QPP deployed: predictors inside the ONNX graph (bench/qpp_export.py)",
            f"{datetime.date.today().isoformat()}, `{command}`; W8A8 per-channel weights, the "
            "default predictors; ORT latency at batch 1 (the predicted graph takes one input "
            "at a time), round-robin medians. Counts: ops in ORT's optimized graph.",
            *sections,
            END_MARK,
        ]
    )
    if not args.no_docs:
        write_section(text, START_MARK, END_MARK)


if __name__ == "__main__":
    main()
