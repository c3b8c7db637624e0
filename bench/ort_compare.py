"""qpp W8A8 against ONNX Runtime's own quantization, on every zoo model, in one run.

For each model, on the zoo entry's calibration and evaluation data:

* FP32 torch (the reference every metric compares against) and FP32 ONNX in ORT: the original
  ONNX file for PP-OCR, ``torch.onnx.export`` of ``load_model()`` for MiniLM and digits-cnn;
* ORT ``quantize_static`` (QDQ, per-channel QInt8 weights, QUInt8 activations) with the MinMax,
  Entropy and Percentile calibrators, after ``quant_pre_process``; for MiniLM also MatMul-only
  static and ``quantize_dynamic``;
* qpp's ``quantize_job`` with the default ``QuantConfig()``.

Every ORT quantization and evaluation runs in a child process (``--worker``) under an address
space limit, so a calibrator that runs out of memory becomes an "OOM" row instead of killing
the run; it is then retried collecting one calibration batch at a time
(``CalibStridedMinMax``, which every ORT calibrator honours). The tables go to stdout and,
for a full run, into ``docs/benchmarks.md`` between ``<!-- ort_compare:start/end -->``.

    .venv/bin/python bench/ort_compare.py [--models minilm,ppocr-cls] [--quick] [--no-docs]

Only numpy, onnx and onnxruntime are imported at module level: the worker never loads torch,
so its memory limit and peak RSS measure ORT alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from docs_section import write_section

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- ort_compare:start -->", "<!-- ort_compare:end -->"
MODELS = ("minilm", "ppocr-rec", "ppocr-cls", "ppocr-det", "digits-cnn")
CALIBRATORS = ("MinMax", "Entropy", "Percentile")
ORT_THREADS = 2
#: Data sizes for --quick (constructor arguments of each zoo entry).
QUICK_SIZES: dict[str, dict[str, int]] = {
    "minilm": {"num_calibration": 32, "num_evaluation": 32},
    "ppocr-rec": {"num_eval": 32, "num_calib": 32},
    "ppocr-cls": {"num_eval": 32, "num_calib": 32},
    "ppocr-det": {"num_eval": 16, "num_calib": 16},
    "digits-cnn": {"num_calibration": 32},
}
OOM_MARKERS = (
    "MemoryError",
    "bad_alloc",
    "Failed to allocate",
    "Unable to allocate",
    "out of memory",
)
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- ORT variants ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrtVariant:
    """One ORT model to build and evaluate: FP32 as is, static QDQ, or dynamic."""

    label: str
    kind: str  # "fp32" | "static" | "dynamic"
    calibrate_method: str | None = None
    op_types: tuple[str, ...] | None = None
    per_channel: bool = False  # dynamic only; static is always per channel


FP32_VARIANT = OrtVariant("FP32 ONNX (ORT)", "fp32")
PREPARED_VARIANT = OrtVariant("FP32 ONNX preprocessed (ORT)", "fp32")
STATIC_VARIANTS = tuple(OrtVariant(f"ORT static {m}", "static", m) for m in CALIBRATORS)
EXTRA_VARIANTS: dict[str, tuple[OrtVariant, ...]] = {
    "minilm": (
        OrtVariant("ORT static MinMax, MatMul only", "static", "MinMax", ("MatMul",)),
        OrtVariant("ORT dynamic (QInt8 weights)", "dynamic"),
        OrtVariant("ORT dynamic (QInt8 weights, per channel)", "dynamic", per_channel=True),
    ),
}


@dataclass
class Row:
    """One line of a model's table."""

    label: str
    metrics: dict[str, float] | None  # None: the variant failed (see status)
    calibration_seconds: float | None = None
    status: str = "ok"
    notes: list[str] = field(default_factory=list)


# --- worker (child process: numpy + onnxruntime only) ------------------------------------------


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
    """Feeds saved by ``save_batches``: one dict of input name → array per batch."""
    with np.load(path) as data:
        sizes = data["__sizes__"]
        names = [name for name in data.files if name != "__sizes__"]
        split = {name: np.split(data[name], np.cumsum(sizes)[:-1]) for name in names}
    return [{name: split[name][i] for name in names} for i in range(len(sizes))]


def make_reader(batches: list[dict[str, np.ndarray]]):
    """A ``CalibrationDataReader`` over ``batches``, with the ``set_range`` that strided
    calibration (``CalibStridedMinMax``) needs."""
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.iterator, None)

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.iterator = iter(batches[start_index:end_index])

    return BatchReader()


def quantize_variant(spec: dict[str, Any]) -> None:
    """Write the quantized model ``spec["output_model"]`` as ``spec`` asks."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if spec["kind"] == "dynamic":
        quantize_dynamic(
            spec["model"],
            spec["output_model"],
            per_channel=spec["per_channel"],
            weight_type=QuantType.QInt8,
        )
        return
    extra_options = {"CalibStridedMinMax": spec["stride"]} if spec["stride"] else {}
    quantize_static(
        spec["model"],
        spec["output_model"],
        make_reader(load_batches(spec["calibration"])),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=spec["op_types"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[spec["calibrate_method"]],
        extra_options=extra_options,
    )


def evaluate_onnx(model: str, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The model's first output over ``batches``, concatenated (default optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in batches])


def largest_activation_scale(model: str) -> tuple[float, str] | None:
    """The largest per-tensor scale of a QuantizeLinear in ``model`` (static QDQ quantizes only
    activations with QuantizeLinear; weights are stored quantized), with the op producing it: a
    huge one means a range was blown up by an outlier such as a -3.4e38 attention mask."""
    import onnx
    from onnx.numpy_helper import to_array

    graph = onnx.load(model).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node.op_type for node in graph.node for output in node.output}
    scales = [
        (float(to_array(initializers[node.input[1]]).max()), node.input[0])
        for node in graph.node
        if node.op_type == "QuantizeLinear" and node.input[1] in initializers
    ]
    if not scales:
        return None
    scale, tensor = max(scales)
    return scale, f"{tensor} ({producers.get(tensor, 'graph input')})"


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that
    over from the parent across fork and exec, so it would report the bench's own size."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s*(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def worker(spec_path: str) -> None:
    """Child process: limit memory, quantize (timed), evaluate, save outputs and a report."""
    spec = json.loads(Path(spec_path).read_text())
    limit = spec["memory_limit_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    seconds = 0.0
    model = spec["model"]
    if spec["kind"] != "fp32":
        start = time.perf_counter()
        quantize_variant(spec)
        seconds = time.perf_counter() - start
        model = spec["output_model"]
    peak_calibration = peak_rss_mb()
    np.save(spec["outputs"], evaluate_onnx(model, load_batches(spec["evaluation"])))
    report = {
        "seconds": seconds,
        "peak_rss_mb": peak_calibration,
        "largest_scale": largest_activation_scale(model) if spec["kind"] == "static" else None,
    }
    Path(spec["report"]).write_text(json.dumps(report))


# --- parent: running the worker ----------------------------------------------------------------


def save_batches(path: Path, batches: list[tuple[Any, ...]], names: list[str]) -> None:
    """Torch batches → one npz: each input concatenated, plus the batch sizes."""
    arrays = {
        name: np.concatenate([batch[i].numpy() for batch in batches])
        for i, name in enumerate(names)
    }
    np.savez(path, __sizes__=np.array([int(b[0].shape[0]) for b in batches]), **arrays)


def memory_limit_bytes(requested_gb: float | None) -> int:
    """The worker's address-space limit: as asked, else what is available now less 1.5 GB."""
    import psutil

    if requested_gb is not None:
        return int(requested_gb * 2**30)
    return max(2 * 2**30, int(psutil.virtual_memory().available - 1.5 * 2**30))


@dataclass
class WorkerResult:
    outputs: np.ndarray | None
    seconds: float | None
    peak_rss_mb: float | None
    status: str  # "ok", "OOM", "timeout" or "failed: ..."
    largest_scale: tuple[float, str] | None = None


def run_worker(spec: dict[str, Any], folder: Path, args: argparse.Namespace) -> WorkerResult:
    """Run one variant in a child process; failures come back as a status, never raise."""
    tag = spec["tag"]
    spec = {
        **spec,
        "output_model": str(folder / f"{tag}.onnx"),
        "outputs": str(folder / f"{tag}.outputs.npy"),
        "report": str(folder / f"{tag}.report.json"),
        "memory_limit_bytes": memory_limit_bytes(args.memory_limit_gb),
    }
    spec_path = folder / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = folder / f"{tag}.log"
    try:
        with log_path.open("w") as log_file:
            process = subprocess.run(
                [sys.executable, __file__, "--worker", str(spec_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=args.worker_timeout,
                check=False,
            )
    except subprocess.TimeoutExpired:
        return WorkerResult(None, None, None, "timeout")
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        log(f"  worker {tag} exited with {process.returncode}:\n    " + "\n    ".join(tail))
        out_of_memory = process.returncode == -9 or any(
            marker in line for line in tail for marker in OOM_MARKERS
        )
        if out_of_memory:
            limit_gb = spec["memory_limit_bytes"] / 2**30
            return WorkerResult(None, None, None, f"OOM (address space > {limit_gb:.1f} GB)")
        last = tail[-1] if tail else ""
        return WorkerResult(None, None, None, f"failed ({process.returncode}): {last[:120]}")
    report = json.loads(Path(spec["report"]).read_text())
    outputs = np.load(spec["outputs"])
    Path(spec["outputs"]).unlink()  # rec outputs are 300 MB; keep the temp folder small
    return WorkerResult(
        outputs, report["seconds"], report["peak_rss_mb"], "ok", report["largest_scale"]
    )


# --- parent: models, references, qpp ----------------------------------------------------------


def make_entry(name: str, quick: bool):
    from qpp.zoo import entry_class

    return entry_class(name)(**(QUICK_SIZES[name] if quick else {}))


def export_onnx(model, example: tuple[Any, ...], names: list[str], path: Path) -> str:
    """``torch.onnx.export`` with a dynamic batch axis: dynamo first, the legacy exporter if
    that fails. Returns which exporter wrote ``path``."""
    import torch

    try:
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=True,
            input_names=names,
            output_names=["output"],
            dynamic_shapes=tuple({0: batch} for _ in names),
        )
        return "dynamo"
    except Exception as error:  # any exporter failure: fall back, and say why
        log(f"  dynamo export failed ({type(error).__name__}: {str(error)[:200]}); legacy export")
    torch.onnx.export(
        model,
        example,
        str(path),
        dynamo=False,
        input_names=names,
        output_names=["output"],
        dynamic_axes={name: {0: "batch"} for name in [*names, "output"]},
        opset_version=17,
    )
    return "legacy TorchScript"


def fp32_onnx(entry, model, example, names: list[str], folder: Path) -> tuple[Path, str]:
    """The FP32 ONNX model: the shipped file when the entry wraps one (PP-OCR), else exported."""
    model_file = getattr(entry, "model_file", None)
    if model_file is not None:
        from qpp.zoo.ppocr import model_path

        return model_path(model_file), "original ONNX from rapidocr-onnxruntime"
    path = folder / "fp32.onnx"
    exporter = export_onnx(model, example, names, path)
    return path, f"torch.onnx.export ({exporter})"


def preprocess(model: Path, example: dict[str, np.ndarray], folder: Path) -> tuple[Path, str]:
    """The model ORT quantizes (``qpp.export.ort_reference.preprocess``), logging failures."""
    from qpp.export.ort_reference import preprocess as ort_preprocess

    output, how, failures = ort_preprocess(model, example, folder)
    for failure in failures:
        log(f"  {failure}")
    return output, how


def qpp_w8a8(entry) -> tuple[dict[str, float], float, dict[str, float]]:
    """qpp's ``quantize_job`` with ``QuantConfig()``: quantized metrics, calibration seconds
    and the FP32 metrics the job measured (a cross-check of the bench's reference)."""
    from unittest import mock

    import qpp.pipeline
    from qpp.sim.config import QuantConfig
    from qpp.sources import SourceSpec

    # quantize_job resolves the name to a default-size entry; hand it this one so --quick
    # shrinks qpp's data too and every method sees exactly the same samples.
    with mock.patch.object(qpp.pipeline, "resolve_source", lambda spec: entry):
        result, _ = qpp.pipeline.quantize_job(
            SourceSpec(entry.name), QuantConfig(), output_dir=None, show_progress=False
        )
    return result.metrics["quantized"], result.seconds["calibrate"], result.metrics["fp32"]


def first_output(outputs):
    return outputs[0] if isinstance(outputs, tuple) else outputs


def compare_model(
    name: str,
    args: argparse.Namespace,
    root: Path,
    entry: Any = None,
    variants: tuple[OrtVariant, ...] | None = None,
    with_qpp: bool = True,
) -> tuple[list[Row], list[str]]:
    """Every method's row for zoo model ``name``, and notes for the table.

    Another bench can pass its own ``entry`` (data sizes), the ORT ``variants`` to run
    (default: every static calibrator and the model's extras) and leave out qpp's row."""
    import torch

    from qpp.api import run

    folder = root / name
    folder.mkdir()
    entry = entry if entry is not None else make_entry(name, args.quick)
    calibration, evaluation = entry.calibration_set(), entry.evaluation_set()
    names = evaluation.input_names
    log(
        f"{name}: {evaluation.num_samples} evaluation samples, "
        f"{sum(int(b[0].shape[0]) for b in calibration)} calibration samples"
    )
    save_batches(folder / "calibration.npz", calibration, names)
    save_batches(folder / "evaluation.npz", evaluation.batches, names)

    model = entry.load_model()
    reference = first_output(run(model, evaluation.batches))
    fp32_metrics = entry.metrics(reference, reference, evaluation)
    rows = [Row("FP32 torch (reference)", fp32_metrics)]
    fp32_path, source = fp32_onnx(entry, model, calibration[0], names, folder)
    del model
    notes = [f"FP32 ONNX: {source}."]

    def evaluate_variant(variant: OrtVariant, model_path: Path, stride: int | None) -> Row:
        tag = re.sub(r"\W+", "_", variant.label).strip("_") + (f"_stride{stride}" if stride else "")
        spec = {
            "tag": tag,
            "kind": variant.kind,
            "model": str(model_path),
            "calibration": str(folder / "calibration.npz"),
            "evaluation": str(folder / "evaluation.npz"),
            "calibrate_method": variant.calibrate_method,
            "op_types": list(variant.op_types) if variant.op_types else None,
            "stride": stride,
            "per_channel": variant.per_channel,
        }
        result = run_worker(spec, folder, args)
        if result.outputs is None:
            return Row(variant.label, None, status=result.status)
        outputs = torch.from_numpy(result.outputs)
        row = Row(variant.label, entry.metrics(outputs, reference, evaluation))
        if variant.kind == "fp32":
            difference = (outputs - reference).abs().max().item()
            row.notes.append(f"max abs diff vs torch {difference:.2e}")
        else:
            row.calibration_seconds = result.seconds
            row.notes.append(f"peak RSS {result.peak_rss_mb / 1024:.1f} GB")
        if result.largest_scale is not None:
            scale, tensor = result.largest_scale
            row.notes.append(f"largest activation scale {scale:.3g} at {tensor}")
        return row

    log(f"{name}: FP32 ONNX in ORT")
    rows.append(evaluate_variant(FP32_VARIANT, fp32_path, None))
    example = load_batches(str(folder / "calibration.npz"))[0]
    prepared, how = preprocess(fp32_path, example, folder)
    notes.append(f"ORT quantizes the FP32 ONNX after: {how}.")
    rows.append(evaluate_variant(PREPARED_VARIANT, prepared, None))
    chosen = variants if variants is not None else STATIC_VARIANTS + EXTRA_VARIANTS.get(name, ())
    for variant in chosen:
        log(f"{name}: {variant.label}")
        row = evaluate_variant(variant, prepared, None)
        if row.status.startswith("OOM") and variant.kind == "static":
            log(f"{name}: {variant.label} ran out of memory; retrying one batch per collection")
            retry = evaluate_variant(variant, prepared, stride=1)
            retry.label += " (strided)"
            retry.notes.append(
                f"all {len(calibration)} calibration batches at once: OOM; "
                "this row collects one batch at a time (CalibStridedMinMax=1)"
            )
            rows.append(row)
            row = retry
        rows.append(row)

    if not with_qpp:
        return rows, notes
    log(f"{name}: qpp W8A8 (quantize_job, default QuantConfig)")
    qpp_metrics, qpp_seconds, qpp_fp32 = qpp_w8a8(entry)
    rows.append(Row("qpp W8A8 (default QuantConfig)", qpp_metrics, qpp_seconds))
    primary = entry.primary_metric
    if abs(qpp_fp32[primary] - fp32_metrics[primary]) > 1e-6:
        notes.append(
            f"quantize_job measured FP32 {primary} {qpp_fp32[primary]:.4f}, "
            f"this bench {fp32_metrics[primary]:.4f}."
        )
    return rows, notes


# --- tables and docs ---------------------------------------------------------------------------


def format_value(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 2 else f"{value:.2f}"


def gap_ratio(row: Row, reference: Row, qpp: Row, primary: str, higher_is_better: bool) -> str:
    """(FP32 − method) / (FP32 − qpp) on the primary metric (signs flipped when lower is
    better): 1 is qpp's loss, 3 is three times qpp's loss."""
    if row.metrics is None or qpp.metrics is None or row is reference:
        return ""
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * (reference.metrics[primary] - row.metrics[primary])
    qpp_gap = sign * (reference.metrics[primary] - qpp.metrics[primary])
    if qpp_gap <= 1e-9:
        return "n/a (qpp lost nothing)"
    return f"{gap / qpp_gap:.2f}"


def markdown_table(primary: str, higher_is_better: bool, rows: list[Row]) -> str:
    """A Markdown table: method, primary metric, the others, calibration s, gap ratio, notes."""
    reference, qpp = rows[0], rows[-1]
    others = [key for key in reference.metrics if key != primary]
    header = ["method", f"**{primary}**", *others, "calib. s", "gap / qpp gap", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.metrics is None:
            cells = [row.label, row.status, *["" for _ in others]]
        else:
            cells = [row.label, *(format_value(row.metrics[k]) for k in [primary, *others])]
        seconds = "" if row.calibration_seconds is None else f"{row.calibration_seconds:.1f}"
        ratio = gap_ratio(row, reference, qpp, primary, higher_is_better)
        cells += [seconds, ratio, "; ".join(row.notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line() -> str:
    import onnxruntime
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    flags = set(re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE).group(1).split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)
    return (
        f"Measured {datetime.date.today().isoformat()} on this machine: {os.cpu_count()} cores, "
        f"{model.group(1).strip() if model else platform.processor()} ({present}), "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}."
    )


def docs_section(tables: str, total_seconds: float, command: str) -> str:
    return f"""{START_MARK}
## qpp W8A8 vs ONNX Runtime quantization (`bench/ort_compare.py`)

{machine_line()} Command: `{command}`; the whole run took {total_seconds / 60:.1f} min.

Every method sees the zoo entry's calibration and evaluation samples, and every metric compares
against the FP32 torch model's outputs on the evaluation set. ORT: `quantize_static` in QDQ
format, per-channel QInt8 weights, QUInt8 activations, after `quant_pre_process` (and, where
needed, conversion to opset 13 and pinned input sizes: see each model's note), calibrators with
`quantize_static`'s defaults (Percentile: 99.999, symmetric, 2048 bins; Entropy: 128 bins and
128 quantized bins, which leaves its KL search one candidate, the full range, so it gives
MinMax's ranges unless strided collection widened the histogram); sessions with default graph
optimizations and {ORT_THREADS} intra-op threads. qpp: `quantize_job` with
`QuantConfig()` (per-channel symmetric weights, static per-tensor activations, MSE ranges),
evaluated in qpp's simulation (fake quantization in torch). "calib. s" is the wall time of
`quantize_static`/`quantize_dynamic` (calibration, graph rewrite, save) and of qpp's
prepare + calibrate. "gap / qpp gap" is the method's loss of the primary metric against FP32
divided by qpp's loss. ORT runs each variant in a child process with an address-space limit;
"OOM" marks one that ran out of it, and peak RSS is that process's up to the end of
quantization. "largest activation scale" is the largest QuantizeLinear scale in the quantized
model: one near 1e36 means a calibrated range holds float32's minimum, which Hugging Face's
eager attention adds at padded positions, so every value of that tensor quantizes to 0 or
-3.4e38 (the same value makes ORT's Entropy histogram fail with "Too many bins").

{tables}
{END_MARK}"""


def write_docs(section: str) -> None:
    write_section(section, START_MARK, END_MARK, DOCS)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--quick", action="store_true", help="small data; does not write docs")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="address-space limit of each ORT child process (default: available memory - 1.5)",
    )
    parser.add_argument("--worker-timeout", type=float, default=3600, help="seconds per variant")
    parser.add_argument("--keep-temp", action="store_true", help="keep ONNX files and logs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown and not args.worker:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(MODELS)}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    import torch

    from qpp.zoo import entry_class

    torch.set_num_threads(ORT_THREADS)
    tables = []
    with tempfile.TemporaryDirectory(prefix="ort_compare.") as temporary:
        root = Path(tempfile.mkdtemp(prefix="ort_compare.")) if args.keep_temp else Path(temporary)
        log(f"temporary folder {root}")
        for name in args.models.split(","):
            rows, notes = compare_model(name, args, root)
            entry = entry_class(name)
            table = markdown_table(entry.primary_metric, entry.higher_is_better, rows)
            text = f"### {name}\n\n{entry.summary}. " + " ".join(notes) + "\n\n" + table + "\n"
            print(text, flush=True)
            tables.append(text)
    total = time.perf_counter() - STARTED
    log(f"done in {total / 60:.1f} min")
    if not (args.quick or args.no_docs):
        command = ".venv/bin/python bench/ort_compare.py " + " ".join(argv)
        write_docs(docs_section("\n".join(tables), total, command.strip()))
        log(f"wrote {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
