"""The white paper's PTQ pipeline, step by step, against ORT and AIMET on the zoo models.

For each model and W8A8 / W4A8, in one run on the same calibration and evaluation samples:
round-to-nearest with min-max and with MSE ranges, + CLE, + empirical bias correction,
+ AdaRound, the full ``wp-ptq`` recipe; ONNX Runtime's ``quantize_static`` (MinMax, QDQ,
per-channel) at W8A8 (via ``bench/ort_compare.py``'s worker); AIMET's AdaRound at W4A8 (in
its own venv, ``bench/aimet_adaround.py``) with the same AdaRound iterations and calibration
samples. Time and peak memory (RSS growth over the step, sampled) per algorithm.

    .venv/bin/python bench/wp_ptq.py [--models digits-cnn,ppocr-cls] [--iterations 1000]

Writes its table into ``docs/benchmarks.md`` between ``<!-- wp_ptq:start/end -->``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docs_section import model_marks, write_model_section, write_section

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- wp_ptq:start -->", "<!-- wp_ptq:end -->"
#: AIMET lives in its own venv so qpp's stays clean; make it with
#: ``python3 -m venv /work/venvs/aimet && /work/venvs/aimet/bin/pip install torch==2.14.1
#: torchvision==0.29.1 aimet-torch`` (or point ``QPP_AIMET_PYTHON`` at another interpreter).
AIMET_PYTHON = Path(os.environ.get("QPP_AIMET_PYTHON", "/work/venvs/aimet/bin/python"))
MODELS = ("digits-cnn", "ppocr-cls", "ppocr-rec", "ppocr-det", "minilm")
SIZES: dict[str, dict[str, int]] = {
    "digits-cnn": {},
    "ppocr-cls": {"num_eval": 200, "num_calib": 64},
    "ppocr-rec": {"num_eval": 100, "num_calib": 32},
    "ppocr-det": {"num_eval": 16, "num_calib": 16},
    "minilm": {"num_calibration": 64, "num_evaluation": 200},
}
QUICK_SIZES: dict[str, dict[str, int]] = {
    "digits-cnn": {"num_calibration": 32},
    "ppocr-cls": {"num_eval": 32, "num_calib": 16},
    "ppocr-rec": {"num_eval": 16, "num_calib": 8},
    "ppocr-det": {"num_eval": 4, "num_calib": 4},
    "minilm": {"num_calibration": 16, "num_evaluation": 32},
}
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def make_entry(name: str, quick: bool):
    from qpp.zoo import entry_class

    return entry_class(name)(**(QUICK_SIZES if quick else SIZES)[name])


def limit(batches: list, samples: int | None) -> list:
    from qpp.api import limit_samples

    return limit_samples(list(batches), samples)


class PeakMemory:
    """Peak RSS growth (MB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self) -> PeakMemory:
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *_: object) -> None:
        self.running = False
        self.thread.join()
        self.growth_mb = (self.peak - self.start) / 2**20


@dataclass
class Row:
    label: str
    metrics: dict[str, float] | None
    seconds: float | None = None
    memory_mb: float | None = None
    notes: list[str] = field(default_factory=list)


# --- qpp variants ------------------------------------------------------------------------------


def qpp_variants(
    weight_bits: int, activation_bits: int, iterations: int, samples: int | None
) -> list[tuple[str, Any, Callable]]:
    """(label, QuantConfig, step) where ``step(qmodel, batches)`` replaces plain calibration."""
    from qpp.api import calibrate
    from qpp.ptq.adaround import AdaRoundConfig, adaround
    from qpp.ptq.bias_correction import bias_correction
    from qpp.ptq.cle import cross_layer_equalization
    from qpp.ptq.recipes import WhitePaperRecipe, white_paper_ptq
    from qpp.sim.config import QuantConfig

    mse = QuantConfig(weight_bits=weight_bits, activation_bits=activation_bits)
    minmax = QuantConfig(
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        weight_estimator="minmax",
        activation_estimator="minmax",
    )

    def plain(qmodel, batches) -> dict:
        calibrate(qmodel, batches)
        return {}

    def with_cle(qmodel, batches) -> dict:
        report = cross_layer_equalization(qmodel, batches)
        calibrate(qmodel, batches)
        return {"pairs": len(report.pairs)}

    def with_bias_correction(qmodel, batches) -> dict:
        qmodel.compute_weight_encodings()
        report = bias_correction(qmodel, batches)
        calibrate(qmodel, batches, weights=False)
        return {"corrected": len(report.corrected)}

    def with_adaround(qmodel, batches) -> dict:
        qmodel.compute_weight_encodings()
        report = adaround(qmodel, batches, AdaRoundConfig(iterations=iterations, samples=samples))
        calibrate(qmodel, batches, weights=False)
        kept = sum(r.kept == "adaround" for r in report.layers.values())
        return {"layers": len(report.layers), "kept": kept, "adaround_s": report.seconds}

    def recipe(qmodel, batches) -> dict:
        report = white_paper_ptq(
            qmodel,
            batches,
            WhitePaperRecipe(adaround_iterations=iterations, adaround_samples=samples),
        )
        return {"steps": ",".join(report.steps)}

    return [
        ("RTN, min-max ranges", minmax, plain),
        ("RTN, MSE ranges", mse, plain),
        ("MSE + CLE", mse, with_cle),
        ("MSE + bias correction", mse, with_bias_correction),
        (f"MSE + AdaRound ({iterations} it.)", mse, with_adaround),
        (f"wp-ptq recipe ({iterations} it.)", mse, recipe),
    ]


# --- ORT and AIMET -----------------------------------------------------------------------------


def ort_compare_module():
    spec = importlib.util.spec_from_file_location("ort_compare", REPO / "bench" / "ort_compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ort_compare"] = module
    spec.loader.exec_module(module)
    return module


def ort_static_minmax(entry, model, calibration, evaluation, reference, folder: Path) -> Row:
    """ORT ``quantize_static`` MinMax (per-channel QInt8 weights, QUInt8 activations), W8A8."""
    import torch

    ort = ort_compare_module()
    args = ort.parse_args([])
    names = evaluation.input_names
    ort.save_batches(folder / "calibration.npz", calibration, names)
    ort.save_batches(folder / "evaluation.npz", evaluation.batches, names)
    fp32_path, _ = ort.fp32_onnx(entry, model, calibration[0], names, folder)
    example = ort.load_batches(str(folder / "calibration.npz"))[0]
    prepared, how = ort.preprocess(fp32_path, example, folder)
    spec = {
        "tag": "static_minmax",
        "kind": "static",
        "model": str(prepared),
        "calibration": str(folder / "calibration.npz"),
        "evaluation": str(folder / "evaluation.npz"),
        "calibrate_method": "MinMax",
        "op_types": None,
        "stride": None,
        "per_channel": False,
    }
    result = ort.run_worker(spec, folder, args)
    if result.outputs is None:
        return Row("ORT quantize_static MinMax (W8A8)", None, notes=[result.status])
    outputs = torch.from_numpy(result.outputs)
    return Row(
        "ORT quantize_static MinMax (W8A8)",
        entry.metrics(outputs, reference, evaluation),
        result.seconds,
        notes=[f"peak RSS {result.peak_rss_mb:.0f} MB (child)", f"ORT input: {how}"],
    )


def aimet_adaround(
    name: str,
    quick: bool,
    iterations: int,
    samples: int | None,
    entry,
    reference,
    evaluation,
    folder: Path,
) -> Row:
    import numpy as np
    import torch

    label = f"AIMET AdaRound ({iterations} it.)"
    if not AIMET_PYTHON.exists():
        return Row(label, None, notes=[f"{AIMET_PYTHON} missing"])
    # QPP_AIMET_CACHE=DIR keeps AIMET's outputs and timings (an hour on MiniLM) for a later
    # run with the same model, data sizes, iterations and samples.
    cache = os.environ.get("QPP_AIMET_CACHE")
    stem = f"aimet_{name}_W4A8_{iterations}it_{samples}s{'_quick' if quick else ''}"
    output = (Path(cache) if cache else folder) / f"{stem}.npz"
    info_path = output.with_suffix(".json")
    if cache and output.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        outputs = torch.from_numpy(np.load(output)["outputs"])
        return Row(
            label,
            entry.metrics(outputs, reference, evaluation),
            info["total_seconds"],
            notes=[
                f"AdaRound {info['adaround_seconds']:.1f} s",
                f"peak RSS {info['peak_rss_mb']} MB (child)",
                f"child wall {info['wall_seconds']:.0f} s, run {info['date']} (cached)",
            ],
        )
    spec = {
        "model": name,
        "quick": quick,
        "iterations": iterations,
        "samples": samples,
        "weight_bits": 4,
        "activation_bits": 8,
        "output": str(output),
        "threads": int(os.environ.get("BENCH_THREADS", "1")),
    }
    spec_path = folder / f"aimet_{name}.json"
    spec_path.write_text(json.dumps(spec))
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    process = subprocess.run(
        [str(AIMET_PYTHON), str(REPO / "bench" / "aimet_adaround.py"), str(spec_path)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=7200,
    )
    wall = time.perf_counter() - started
    if process.returncode != 0:
        last = [line for line in process.stderr.strip().splitlines() if line.strip()]
        return Row(label, None, notes=[f"failed: {last[-1][:200] if last else process.returncode}"])
    info = json.loads(process.stdout.strip().splitlines()[-1])
    if cache:
        import datetime

        info |= {"wall_seconds": round(wall, 1), "date": datetime.date.today().isoformat()}
        info_path.write_text(json.dumps(info))
    outputs = torch.from_numpy(np.load(output)["outputs"])
    return Row(
        label,
        entry.metrics(outputs, reference, evaluation),
        info["total_seconds"],
        notes=[
            f"AdaRound {info['adaround_seconds']:.1f} s",
            f"peak RSS {info['peak_rss_mb']} MB (child)",
            f"child wall {wall:.0f} s",
        ],
    )


# --- one model ---------------------------------------------------------------------------------


def bench_model(name: str, args: argparse.Namespace, root: Path) -> tuple[str, list[Row], dict]:
    import torch

    from qpp.api import prepare, run

    entry = make_entry(name, args.quick)
    calibration = entry.calibration_set()
    evaluation = entry.evaluation_set()
    model = entry.load_model()
    reference = run(model, evaluation.batches)
    rows = {"fp32": [Row("FP32", entry.metrics(reference, reference, evaluation))]}
    adaround_seconds: dict[str, float] = {}
    for weight_bits, activation_bits in ((8, 8), (4, 8)):
        key = f"W{weight_bits}A{activation_bits}"
        rows[key] = []
        skipped = [prefix.strip() for prefix in args.skip.split(",") if prefix.strip()]
        for label, config, step in qpp_variants(
            weight_bits, activation_bits, args.iterations, args.samples
        ):
            if any(f"{key}:{label}".startswith(p) or label.startswith(p) for p in skipped):
                continue
            log(f"{name} {key}: {label}")
            started = time.perf_counter()
            with PeakMemory() as memory:
                qmodel = prepare(model, calibration[0], config)
                details = step(qmodel, calibration)
            seconds = time.perf_counter() - started
            outputs = run(qmodel, evaluation.batches)
            row = Row(
                label, entry.metrics(outputs, reference, evaluation), seconds, memory.growth_mb
            )
            row.notes = [f"{k}={v}" for k, v in details.items()]
            if "adaround_s" in details:
                adaround_seconds[key] = details["adaround_s"]
            rows[key].append(row)
            del qmodel
        if key == "W8A8" and not args.no_ort:
            log(f"{name} {key}: ORT quantize_static MinMax")
            folder = root / name
            folder.mkdir(exist_ok=True)
            try:
                rows[key].append(
                    ort_static_minmax(entry, model, calibration, evaluation, reference, folder)
                )
            except Exception as error:  # record and go on: a bench reports failures
                rows[key].append(
                    Row("ORT quantize_static MinMax (W8A8)", None, notes=[str(error)[:200]])
                )
        if key == "W4A8" and not args.no_aimet:
            log(f"{name} {key}: AIMET AdaRound")
            folder = root / name
            folder.mkdir(exist_ok=True)
            rows[key].append(
                aimet_adaround(
                    name,
                    args.quick,
                    args.iterations,
                    args.samples,
                    entry,
                    reference,
                    evaluation,
                    folder,
                )
            )
    del torch
    flat = [row for group in rows.values() for row in group]
    return entry.primary_metric, flat, {"groups": rows, "adaround_seconds": adaround_seconds}


# --- tables ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def table(name: str, primary: str, groups: dict[str, list[Row]], higher_is_better: bool) -> str:
    fp32 = groups["fp32"][0].metrics[primary]
    keys = list(groups["fp32"][0].metrics)
    lines = [f"### {name}", ""]
    header = [
        "bits",
        "method",
        *(f"**{k}**" if k == primary else k for k in keys),
        "gap closed vs RTN-MSE",
        "time s",
        "peak MB",
        "notes",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(
        "| FP32 | FP32 | "
        + " | ".join(fmt(groups["fp32"][0].metrics[k], 4) for k in keys)
        + " | | | | |"
    )
    for key in ("W8A8", "W4A8"):
        baseline = [r for r in groups[key] if r.label == "RTN, MSE ranges" and r.metrics]
        rtn = baseline[0].metrics[primary] if baseline else float("nan")  # skipped: no gap
        for row in groups[key]:
            if row.metrics is None:
                lines.append(
                    f"| {key} | {row.label} | "
                    + " | ".join("failed" for _ in keys)
                    + f" | | | | {'; '.join(row.notes)} |"
                )
                continue
            value = row.metrics[primary]
            gap = fp32 - rtn if higher_is_better else rtn - fp32
            closed = (
                ((value - rtn) if higher_is_better else (rtn - value)) / gap
                if abs(gap) > 1e-9
                else float("nan")
            )
            closed_text = f"{closed * 100:.0f}%" if closed == closed else ""
            cells = [
                *(fmt(row.metrics[k], 4) for k in keys),
                closed_text,
                fmt(row.seconds, 1),
                fmt(row.memory_mb, 0),
                "; ".join(row.notes),
            ]
            lines.append(f"| {key} | {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(section: str) -> None:
    write_section(section, START_MARK, END_MARK, DOCS)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--iterations", type=int, default=1000, help="AdaRound iterations (both tools)"
    )
    parser.add_argument(
        "--samples", type=int, default=32, help="AdaRound calibration samples (both tools)"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated method labels (prefixes) to leave out, optionally for one bit "
        "setting ('W8A8:wp-ptq'); e.g. 'MSE + AdaRound' where the recipe is the same steps "
        "(models without depthwise convs)",
    )
    parser.add_argument("--quick", action="store_true", help="small data; does not write docs")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--no-aimet", action="store_true")
    args = parser.parse_args(argv)
    import datetime
    import platform

    import torch

    from qpp.zoo import entry_class

    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    command = "BENCH_THREADS=1 .venv/bin/python bench/wp_ptq.py " + shlex.join(argv)
    with tempfile.TemporaryDirectory(prefix="wp_ptq.") as temporary:
        for name in args.models.split(","):
            started = time.perf_counter()
            primary, _, info = bench_model(name, args, Path(temporary))
            text = table(name, primary, info["groups"], entry_class(name).higher_is_better)
            start, end = model_marks("wp_ptq", name)
            section = f"""{text}

Measured {datetime.date.today().isoformat()}, torch {torch.__version__}, {threads} torch
thread(s), Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the
end; {args.iterations} AdaRound iterations per layer and {args.samples} AdaRound calibration
samples for qpp and AIMET alike; this model took {(time.perf_counter() - started) / 60:.1f} min.
Command: `{command}`."""
            print(f"{start}\n{section}\n{end}\n", flush=True)
            if not args.quick and not args.no_docs:
                write_model_section("wp_ptq", name, MODELS, section, DOCS)
    header = f"""{START_MARK}
## White-paper PTQ pipeline vs ORT and AIMET (`bench/wp_ptq.py`)

One table per model below, each with its own date, command and budget (models are run one at
a time on a shared 2-core machine). Every method sees the same calibration samples (AdaRound:
the first `--samples`, both tools) and evaluation samples; metrics compare against the FP32
torch model's outputs. qpp weights: symmetric per-channel; activations: asymmetric per-tensor;
"RTN" = round to nearest. AdaRound: `--iterations` per layer for qpp and AIMET alike (AIMET's
default is 10k; budgeted for 2 cores). "gap closed" = (method - RTN-MSE) / (FP32 - RTN-MSE) on
the primary metric. "time s" = prepare + algorithm + calibration (AIMET: BN fold + AdaRound +
QuantSim encodings); "peak MB" = RSS growth during that step (qpp, sampled) or the child's peak
RSS (ORT, AIMET). AIMET: `aimet-torch` 2.42.0 beside torch 2.14.1 in `/work/venvs/aimet`,
per-channel config, `post_training_tf_enhanced` ranges; on the ONNX-imported models its
`prepare_model` keeps onnx2torch's op modules as leaves (they do not trace) and quantizes their
outputs.
{END_MARK}"""
    if not args.quick and not args.no_docs:
        write_docs(header)


if __name__ == "__main__":
    main(sys.argv[1:])
