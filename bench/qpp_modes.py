"""QPP: static vs predicted vs dynamic activation QPs, uniform and Dense+Sparse, per zoo model,
side by side with ONNX Runtime's static (and, for MiniLM, dynamic) int8 quantization.

For each model and activation bit-width, qpp quantizes once (W8 per channel, the core's
calibration), then for each scheme fits the predictor on the zoo entry's calibration set and
evaluates the three modes on its evaluation set (``qpp.pipeline.compare_modes``, the same code
as ``qpp quantize MODEL --activation-ranges predicted --compare``). ONNX Runtime's rows come
from ``bench/ort_compare.py``'s worker on the same data (8-bit only: ORT has no 4-bit
activations and its dynamic quantization is 8-bit). "gap closed" = (predicted - static) /
(dynamic - static) on the primary metric, when dynamic is above static.

    .venv/bin/python bench/qpp_modes.py [--models digits-cnn,ppocr-cls] [--bits 8,4]
                                        [--no-ort] [--no-docs]

Writes the tables to ``docs/benchmarks.md`` between ``<!-- qpp_modes:start/end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from docs_section import DOCS, write_section  # noqa: E402

from qpp.api import calibrate, prepare, run  # noqa: E402
from qpp.pipeline import compare_modes  # noqa: E402
from qpp.predict import configure_activation_qps, settings_from_config  # noqa: E402
from qpp.predict.activation_qps import CHOSEN_MIX, DYNAMIC_MIXES  # noqa: E402
from qpp.sim.config import QuantConfig  # noqa: E402
from qpp.zoo import entry_class  # noqa: E402

START_MARK, END_MARK = "<!-- qpp_modes:start -->", "<!-- qpp_modes:end -->"
DEFAULT_MODELS = "minilm,ppocr-cls,digits-cnn,ppocr-rec,ppocr-det"
SCHEMES = ("uniform", "dense-sparse")
#: Data sizes per model: the defaults for the small models, fewer samples for the large ones
#: so the whole run fits in about an hour on 2 cores.
SIZES: dict[str, dict[str, int]] = {
    "digits-cnn": {},
    "ppocr-cls": {},
    "minilm": {"num_calibration": 128, "num_evaluation": 200},
    "ppocr-rec": {"num_calib": 128, "num_eval": 100},
    "ppocr-det": {"num_calib": 64, "num_eval": 100},
}
PREDICTOR = (
    "the default predictors (`--predictor-sources auto`: as many evenly spaced sources as 0.5 % "
    "of the FLOPs, and no more than the dynamic reductions, pay for, at most 256, each reading "
    "2048 elements, or 1024 or 512 where that buys more sources; for Dense+Sparse the sources "
    "are Dense+Sparse layers; the default features (`--predictor-features auto`): mean and the "
    "quantiles 0.99 and 0.999 and max of the positive and of the negative part of x for "
    "uniform ranges, mean, max and quantiles 0.9, 0.99 and 0.999 of |x| for Dense+Sparse "
    "thresholds; each layer's predicted QPs carry the log offset that serves its "
    "scheme best on the calibration data: density closest to 1 %, or least quantization "
    "error)"
)


def qpp_rows(
    name: str,
    entry: Any,
    bits: list[int],
    estimator: str = "auto",
    schemes: tuple[str, ...] = SCHEMES,
) -> list[str]:
    fp32 = entry.load_model()
    calibration, evaluation = entry.calibration_set(), entry.evaluation_set()
    reference = run(fp32, evaluation.batches)
    primary = entry.primary_metric
    lines = []
    for activation_bits in bits:
        config = QuantConfig(
            activation_bits=activation_bits,
            activation_ranges="predicted",
            dynamic_estimator=estimator,
        )
        quantized = prepare(fp32, calibration[0], config)
        calibrate(quantized, calibration, show_progress=False)
        for scheme in schemes:
            started = time.perf_counter()
            settings = settings_from_config(replace(config, activation_scheme=scheme))
            handle = configure_activation_qps(quantized, calibration, settings)
            comparison = compare_modes(
                entry, quantized, handle, fp32, reference, calibration[0], False
            )
            handle.detach()
            estimators = {
                "dynamic": handle.dynamic_estimator_label
                + (
                    ""
                    if handle.dynamic_mix == CHOSEN_MIX
                    else f", {DYNAMIC_MIXES[handle.dynamic_mix]}"
                ),
                "predicted": f"targets {handle.target_label}",
            }
            modes = comparison.rows["modes"]
            values = {mode: row["metrics"][primary] for mode, row in modes.items()}
            gap = values["dynamic"] - values["static"]
            closed = (
                f"{100 * (values['predicted'] - values['static']) / gap:.0f} %"
                if gap > 1e-9
                else "n/a (dynamic <= static)"
            )
            errors = {mode: row["output_error"] for mode, row in modes.items()}
            error_gap = errors["static"] - errors["dynamic"]
            closed += (
                f"; output error {100 * (errors['static'] - errors['predicted']) / error_gap:.0f} %"
                if error_gap > 0
                else "; output error n/a"
            )
            dense_sparse_layers = sum(
                s.scheme.value == "dense-sparse" for s in handle.samplers.values()
            )
            sources = f" ({len(handle.predictors)} of {len(handle.samplers)} sources)"
            print(f"  {name} A{activation_bits} {scheme}: {time.perf_counter() - started:.0f} s")
            for mode, row in modes.items():
                density = row.get("outlier_density")
                spread = (
                    f"{density['mean']:.4f} ± {density['std_over_inputs']:.4f}" if density else "-"
                )
                lines.append(
                    f"| qpp W8A{activation_bits} | {scheme}"
                    + (
                        f" ({dense_sparse_layers} of {len(handle.samplers)} layers)"
                        if density
                        else ""
                    )
                    + f" | {mode}{sources if mode == 'predicted' else ''}"
                    + (f", {estimators[mode]}" if scheme == "uniform" and mode != "static" else "")
                    + " | "
                    f"{row['metrics'][primary]:.4f} | {row['output_error']:.3g} | {spread} | "
                    f"{row['overhead_percent']:.3f} | {closed if mode == 'predicted' else ''} |"
                )
    return lines


def ort_rows(name: str, entry: Any, root: Path) -> list[str]:
    import ort_compare

    variants = (ort_compare.OrtVariant("ORT static MinMax", "static", "MinMax"),)
    if name == "minilm":
        variants += ort_compare.EXTRA_VARIANTS["minilm"][1:]  # dynamic, per tensor / channel
    args = ort_compare.parse_args(["--no-docs"])
    rows, _ = ort_compare.compare_model(name, args, root, entry, variants, with_qpp=False)
    lines = []
    for row in rows:
        if not row.label.startswith("ORT "):
            continue
        value = (
            f"{row.metrics[entry.primary_metric]:.4f}" if row.metrics is not None else row.status
        )
        lines.append(f"| {row.label} (W8A8) | uniform | - | {value} | - | - | - | |")
    return lines


def merged_tables(tables: dict[str, str]) -> list[str]:
    """This run's model tables, and the tables of the other models from the section now in
    the docs (in the default model order)."""
    text = DOCS.read_text() if DOCS.is_file() else ""
    found = re.search(re.escape(START_MARK) + ".*?" + re.escape(END_MARK), text, re.DOTALL)
    previous: dict[str, str] = {}
    for chunk in (found.group(0) if found else "").split("\n### ")[1:]:
        body = chunk.split(END_MARK)[0].strip()
        previous[body.partition("\n")[0].strip()] = f"### {body}"
    names = list(dict.fromkeys([*DEFAULT_MODELS.split(","), *tables, *previous]))
    return [tables.get(n) or previous[n] for n in names if n in tables or n in previous]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--bits", default="8,4", help="activation bit-widths")
    parser.add_argument("--no-ort", action="store_true", help="leave out ONNX Runtime's rows")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--dynamic-estimator",
        default="auto",
        help="per-input estimator of the uniform rows: auto, per-layer (slower), minmax, ...",
    )
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="uniform,dense-sparse")
    args = parser.parse_args(argv)
    schemes = tuple(s for s in args.schemes.split(",") if s)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    started = time.perf_counter()
    bits = [int(b) for b in args.bits.split(",")]
    tables: dict[str, str] = {}
    header = [
        "| method | scheme | mode | metric | output error vs FP32 | "
        "outlier fraction (mean ± std over inputs) | overhead (% FLOPs) | gap closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="qpp_modes.") as temporary:
        for name in args.models.split(","):
            print(f"{name} ...", flush=True)
            model_started = time.perf_counter()
            entry = entry_class(name)(**SIZES.get(name, {}))
            lines = header + qpp_rows(name, entry, bits, args.dynamic_estimator, schemes)
            if not args.no_ort:
                lines += ort_rows(name, entry, Path(temporary))
            table = "\n".join(lines)
            print(table, flush=True)
            evaluation = entry.evaluation_set()
            tables[name] = (
                f"### {name}\n\nMeasured {datetime.date.today()}, "
                f"{(time.perf_counter() - model_started) / 60:.1f} min, "
                f"`--dynamic-estimator {args.dynamic_estimator}`. "
                f"{evaluation.num_samples} evaluation samples, metric: "
                f"{entry.primary_metric} (vs FP32 where it is a similarity).\n\n{table}"
            )
    minutes = (time.perf_counter() - started) / 60
    section = (
        f"{START_MARK}\n## QPP: static vs predicted vs dynamic activation QPs "
        "(`bench/qpp_modes.py`)\n\n"
        f"Measured {datetime.date.today()} on this machine (2 cores, shared), "
        f"{torch.get_num_threads()} torch thread(s); command: "
        f"`.venv/bin/python bench/qpp_modes.py {' '.join(argv)}`, {minutes:.1f} min (models "
        "not in the command keep their tables from an earlier run, dated in each). "
        "W8 per-channel weights. Uniform: per-sample ranges (dynamic; the estimator named in "
        "each model's paragraph: `auto` (the default) chooses one per model and bit-width "
        "among min-max, percentile 99.99 and 99.9 and MSE (per-sample grid search, 24 coarse "
        "and 7 fine steps, on 2048 elements) by the output error vs FP32 on calibration "
        "batches, named in the mode column; `per-layer` starts from `auto`'s choice and "
        "chooses each layer's estimator by the same error, layer by layer, and may take the "
        "predictors' targets and range offsets instead where they do better (a layer that "
        "predicted mode keeps on its static range then keeps it in dynamic mode too, counted "
        "as `static`), named in the mode column as `per-layer` and the mix) and their ridge "
        f"prediction by {PREDICTOR}; the predictors' targets are the ranges of whichever of "
        "the two estimators with the lowest dynamic error gives the lower predicted-mode "
        "output error on the calibration batches, or with `per-layer` each layer's columns "
        "from whichever fit lowers that error, in two sweeps (named as `targets`); "
        "Dense+Sparse: "
        "outlier fraction 1 % on every tensor with at least 1000 elements per sample "
        "(smaller ones, e.g. squeeze-excitation vectors, "
        "keep the uniform scheme in the same mode), static = the mean calibration threshold; "
        "the dense grid spans [-t, t], or [f, t] where the tensor's least calibration value f "
        "is above -t (0 after ReLU, -0.375 after hardswish). "
        "Output error vs FP32: `sum ||y_q - y||^2 / sum ||y||^2` over the evaluation "
        "outputs, a continuous counterpart of the metric, which at 8 bits moves by single "
        "samples (tables measured before 2026-12-07 lack it); softmax outputs (ppocr-cls, "
        "ppocr-rec) compare as log-probabilities, in this column and in every calibration-time "
        "choice above (since 2026-12-07 night; before, as probabilities); the gap column "
        "gives the share of the static-to-dynamic gap closed in both. "
        "Overhead: the predictor's features and linear maps, or the dynamic reductions, per "
        "input, against the model's FLOPs. ORT rows: `quantize_static` MinMax (QDQ, "
        "per-channel QInt8 weights, QUInt8 activations) and, for MiniLM, `quantize_dynamic`, "
        "on the same data.\n\n" + "\n\n".join(merged_tables(tables)) + f"\n{END_MARK}"
    )
    if not args.no_docs:
        write_section(section, START_MARK, END_MARK, DOCS)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main(sys.argv[1:])
