"""QPP: static vs predicted vs dynamic activation QPs, uniform and Dense+Sparse, per zoo model.

For each model, activation bit-width and scheme, one ``quantize_job(..., compare=True)`` (the
same as ``qpp quantize MODEL --activation-ranges predicted --scheme S --activations B
--compare``): weights W8 per channel, the predictor fitted on the zoo entry's calibration set,
the three modes evaluated on its evaluation set. Prints one table per model and writes them to
``docs/benchmarks.md`` between ``<!-- qpp_modes:start/end -->``.

    .venv/bin/python bench/qpp_modes.py [--models digits-cnn,ppocr-cls] [--bits 8,4] [--no-docs]

ONNX Runtime rows (static, and dynamic for MiniLM) are not part of this script yet; see
``bench/ort_compare.py`` for them at W8A8.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from docs_section import DOCS, write_section  # noqa: E402

from qpp.pipeline import quantize_job  # noqa: E402
from qpp.sim.config import QuantConfig  # noqa: E402
from qpp.sources import SourceSpec  # noqa: E402

START_MARK, END_MARK = "<!-- qpp_modes:start -->", "<!-- qpp_modes:end -->"
SCHEMES = ("uniform", "dense-sparse")


def model_table(model: str, bits: list[int]) -> str:
    lines = [
        "| A bits | scheme | mode | metric | outlier fraction (mean ± std over inputs) | "
        "overhead (% FLOPs) |",
        "|---|---|---|---|---|---|",
    ]
    for activation_bits in bits:
        for scheme in SCHEMES:
            config = QuantConfig(
                activation_bits=activation_bits,
                activation_ranges="predicted",
                activation_scheme=scheme,
            )
            started = time.perf_counter()
            result, _ = quantize_job(
                SourceSpec(model), config, None, show_progress=False, compare=True
            )
            primary = result.primary_metric
            print(f"  {model} A{activation_bits} {scheme}: {time.perf_counter() - started:.0f} s")
            for mode, row in result.extra["compare"]["modes"].items():
                density = row.get("outlier_density")
                spread = (
                    f"{density['mean']:.4f} ± {density['std_over_inputs']:.4f}" if density else "-"
                )
                lines.append(
                    f"| {activation_bits} | {scheme} | {mode} | {row['metrics'][primary]:.4f} | "
                    f"{spread} | {row['overhead_percent']:.3f} |"
                )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits-cnn,ppocr-cls")
    parser.add_argument("--bits", default="8,4", help="activation bit-widths")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    bits = [int(b) for b in args.bits.split(",")]
    tables = []
    for model in args.models.split(","):
        print(f"{model} ...", flush=True)
        table = model_table(model, bits)
        print(table)
        tables.append(f"### {model}\n\n{table}")
    minutes = (time.perf_counter() - started) / 60
    section = (
        f"{START_MARK}\n## QPP: static vs predicted vs dynamic activation QPs "
        "(`bench/qpp_modes.py`)\n\n"
        f"Measured {datetime.date.today()} on this machine (2 cores); command: "
        f"`.venv/bin/python bench/qpp_modes.py {' '.join(argv)}`, {minutes:.1f} min. "
        "W8 per-channel weights; uniform: per-sample MSE ranges (dynamic) and their ridge "
        "prediction from the "
        "first activation's mean, max and quantiles (predicted); Dense+Sparse: outlier "
        "fraction 1 %, static = mean calibration threshold. The metric is the zoo entry's "
        "primary one. No ONNX Runtime rows yet.\n\n" + "\n\n".join(tables) + f"\n{END_MARK}"
    )
    if not args.no_docs:
        write_section(section, START_MARK, END_MARK, DOCS)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main(sys.argv[1:])
