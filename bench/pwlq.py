"""PWLQ (piecewise linear weights, Fang et al. 2020) against the core's uniform quantization.

For each zoo model, in one run, on the zoo entry's calibration and evaluation data:

* W4A8 and W3A8, per-channel weights: uniform with the MSE range (the core's default),
  PWLQ (one breakpoint from ``--search``, default ``auto``: per channel the better of the
  closed-form Gaussian approximation and the L2 search; the official code's non-overlapping
  form), PWLQ with the paper's bias correction (+BC), and +BC followed by the white paper's
  empirical bias correction on the calibration data (eq. 19), and PWLQ and PWLQ +BC with the
  breakpoints judged by each layer's output error on the calibration data (``--breakpoint-
  objective output``, ours); W3A8 also with the
  coarse-to-fine L2 grid search (+BC, supplement Algorithm 1) and with two breakpoints per
  side (+BC, paper Table 1); W4A8 also with AdaRound on the uniform grid
  (``--adaround-iterations``, 0 leaves it out);
* W4A4: uniform (MSE ranges) against PWLQ on weights (+BC) and activations (one breakpoint, and
  two), the activations' breakpoints from a histogram of the calibration data.

Activations are 8-bit per-tensor with the core's MSE range unless stated. Every metric compares
against the FP32 model's outputs on the evaluation set; "gap / uniform gap" is the loss of the
primary metric against FP32 divided by the uniform row's loss at the same bit-widths.
"weight MSE lower" counts the layers whose PWLQ weight MSE is below the uniform one's.
Each model's lines in docs/benchmarks.md are replaced as soon as it is done.

    .venv/bin/python bench/pwlq.py [--models digits-cnn,ppocr-cls] [--search auto] [--quick]
        [--skip AdaRound,"2 breakpoints"] [--eval-samples 100]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from docs_section import write_section  # noqa: E402

from qpp.api import calibrate, prepare, quantize, run  # noqa: E402
from qpp.pipeline import quantized_size_bytes, weight_bits_per_element  # noqa: E402
from qpp.ptq.adaround import AdaRoundConfig, adaround  # noqa: E402
from qpp.quant.spec import PiecewiseSpec  # noqa: E402
from qpp.sim.config import QuantConfig  # noqa: E402
from qpp.sim.model import QuantizedModel  # noqa: E402
from qpp.zoo import entry_class  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
START_MARK, END_MARK = "<!-- pwlq:start -->", "<!-- pwlq:end -->"
MODELS = ("minilm", "ppocr-rec", "ppocr-cls", "ppocr-det", "digits-cnn")
QUICK_SIZES: dict[str, dict[str, int]] = {
    "minilm": {"num_calibration": 32, "num_evaluation": 32},
    "ppocr-rec": {"num_eval": 32, "num_calib": 32},
    "ppocr-cls": {"num_eval": 32, "num_calib": 32},
    "ppocr-det": {"num_eval": 8, "num_calib": 8},
    "digits-cnn": {"num_calibration": 32},
}
#: The constructor argument that sizes each entry's evaluation set (``--eval-samples``).
EVAL_SIZE_KEYS = {
    "minilm": "num_evaluation",
    "ppocr-rec": "num_eval",
    "ppocr-cls": "num_eval",
    "ppocr-det": "num_eval",
}
ADAROUND_SAMPLES = 32
#: The W3A8 "split" row: layers whose relative weight error with one breakpoint is above this
#: get two per side (``PiecewiseSpec.split_above``).
SPLIT_ABOVE = 0.015
#: The label of the rows with the white paper's empirical bias correction on top of +BC.
EMPIRICAL_BC = "empirical bias correction"
#: The label of the rows whose breakpoints minimise each layer's output error on the
#: calibration data (``PiecewiseSpec(objective="output")``, ours) instead of the weight error.
OUTPUT_OBJECTIVE = "output objective"
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Variant:
    label: str
    group: str  # rows of one group share the uniform baseline ("W4A8", "W3A8", "W4A4")
    config: QuantConfig
    baseline: bool = False
    #: AdaRound iterations on top of the uniform config (0: none).
    adaround: int = 0


def variants(search: str, adaround_iterations: int) -> list[Variant]:
    pwlq = PiecewiseSpec(search=search)
    corrected = PiecewiseSpec(search=search, bias_correction=True)
    searched = PiecewiseSpec(search="grid", bias_correction=True)
    two = PiecewiseSpec(search=search, breakpoints=2, bias_correction=True)
    split = PiecewiseSpec(search=search, bias_correction=True, split_above=SPLIT_ABOVE)
    on_output = {
        corrected: PiecewiseSpec(search=search, bias_correction=corrected, objective="output")
        for corrected in (False, True)
    }
    rows = []
    for bits in (4, 3):
        group = f"W{bits}A8"
        rows += [
            Variant(f"{group} uniform (MSE range)", group, QuantConfig(weight_bits=bits), True),
            Variant(
                f"{group} PWLQ",
                group,
                QuantConfig(weight_bits=bits, weight_quantizer="pwlq", piecewise=pwlq),
            ),
            Variant(
                f"{group} PWLQ +BC",
                group,
                QuantConfig(weight_bits=bits, weight_quantizer="pwlq", piecewise=corrected),
            ),
            Variant(
                f"{group} PWLQ +BC, {EMPIRICAL_BC}",
                group,
                QuantConfig(
                    weight_bits=bits,
                    weight_quantizer="pwlq",
                    piecewise=corrected,
                    empirical_bias_correction=True,
                ),
            ),
            *(
                Variant(
                    f"{group} PWLQ{' +BC' if corrected else ''}, {OUTPUT_OBJECTIVE}",
                    group,
                    QuantConfig(weight_bits=bits, weight_quantizer="pwlq", piecewise=spec),
                )
                for corrected, spec in on_output.items()
            ),
        ]
        if bits == 4 and adaround_iterations:
            rows.append(
                Variant(
                    f"{group} uniform + AdaRound ({adaround_iterations} it.)",
                    group,
                    QuantConfig(weight_bits=bits),
                    adaround=adaround_iterations,
                )
            )
        if bits == 3:
            if search != "grid":
                rows.append(
                    Variant(
                        f"{group} PWLQ grid search +BC",
                        group,
                        QuantConfig(weight_bits=bits, weight_quantizer="pwlq", piecewise=searched),
                    )
                )
            rows.append(
                Variant(
                    f"{group} PWLQ +BC, 2 breakpoints above {SPLIT_ABOVE:.1%} error",
                    group,
                    QuantConfig(weight_bits=bits, weight_quantizer="pwlq", piecewise=split),
                )
            )
            rows.append(
                Variant(
                    f"{group} PWLQ 2 breakpoints +BC",
                    group,
                    QuantConfig(weight_bits=bits, weight_quantizer="pwlq", piecewise=two),
                )
            )
    rows += [
        Variant(
            "W4A4 uniform (MSE ranges)",
            "W4A4",
            QuantConfig(weight_bits=4, activation_bits=4),
            True,
        ),
        Variant(
            "W4A4 PWLQ weights +BC and activations",
            "W4A4",
            QuantConfig(
                weight_bits=4,
                activation_bits=4,
                weight_quantizer="pwlq",
                activation_quantizer="pwlq",
                piecewise=corrected,
            ),
        ),
        Variant(
            "W4A4 PWLQ 2 breakpoints, weights +BC and activations",
            "W4A4",
            QuantConfig(
                weight_bits=4,
                activation_bits=4,
                weight_quantizer="pwlq",
                activation_quantizer="pwlq",
                piecewise=two,
            ),
        ),
    ]
    return rows


@dataclass
class Row:
    variant: Variant
    metrics: dict[str, float]
    bits_per_weight: float | None
    size_bytes: int
    seconds: float
    weight_mse: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def weight_errors(model: QuantizedModel) -> dict[str, float]:
    """Mean squared weight error of every enabled weight quantizer."""
    with torch.no_grad():
        return {
            q.name: float((q(w) - w).square().mean())
            for q, w in model.weight_quantizers()
            if q.enabled
        }


def quantize_variant(fp32: torch.nn.Module, calibration: list, variant: Variant) -> QuantizedModel:
    """``variant``'s quantized model: plain calibration, or AdaRound on the frozen MSE weight
    encodings (the first ``ADAROUND_SAMPLES`` calibration samples) then activation ranges."""
    if not variant.adaround:
        return quantize(fp32, calibration, variant.config)
    quantized = prepare(fp32, calibration[0], variant.config)
    quantized.compute_weight_encodings()
    config = AdaRoundConfig(iterations=variant.adaround, samples=ADAROUND_SAMPLES)
    adaround(quantized, calibration, config)
    calibrate(quantized, calibration, weights=False)
    return quantized


def entry_sizes(name: str, quick: bool, eval_samples: int | None) -> dict[str, int]:
    """The zoo entry's constructor sizes: ``--quick``'s, then ``--eval-samples`` on top (for
    the entries whose evaluation set has a size: not digits-cnn, whose set is small)."""
    sizes = dict(QUICK_SIZES[name]) if quick else {}
    if eval_samples is not None:
        key = EVAL_SIZE_KEYS.get(name)
        if key is not None:
            sizes[key] = eval_samples
    return sizes


def skipped(label: str, skip: list[str]) -> bool:
    return any(word.lower() in label.lower() for word in skip)


def bench_model(
    name: str,
    quick: bool,
    search: str,
    adaround_iterations: int,
    skip: list[str] | None = None,
    eval_samples: int | None = None,
    exact_plateaus: bool = False,
) -> tuple[str, list[Row], dict[str, float], str]:
    cls = entry_class(name)
    entry = cls(**entry_sizes(name, quick, eval_samples))
    fp32 = entry.load_model()
    calibration = entry.calibration_set()
    evaluation = entry.evaluation_set()
    reference = run(fp32, evaluation.batches)
    fp32_metrics = entry.metrics(reference, reference, evaluation)
    log(f"{name}: FP32 {entry.primary_metric} {fp32_metrics[entry.primary_metric]:.4f}")
    rows = []
    for variant in variants(search, adaround_iterations):
        if skipped(variant.label, skip or []):
            continue
        if exact_plateaus:  # every row alike, uniform included
            config = replace(variant.config, exact_activation_plateaus=True)
            variant = replace(variant, config=config)
        start = time.perf_counter()
        quantized = quantize_variant(fp32, calibration, variant)
        seconds = time.perf_counter() - start
        outputs = run(quantized, evaluation.batches)
        metrics = entry.metrics(outputs, reference, evaluation)
        rows.append(
            Row(
                variant,
                metrics,
                weight_bits_per_element(quantized),
                quantized_size_bytes(quantized),
                seconds,
                {} if variant.group == "W4A4" or variant.adaround else weight_errors(quantized),
            )
        )
        log(
            f"{name}: {variant.label}: {entry.primary_metric} "
            f"{metrics[entry.primary_metric]:.4f} ({seconds:.1f} s to quantize)"
        )
    return entry.primary_metric, rows, fp32_metrics, entry.summary


def gap_ratio(row: Row, baseline: Row, fp32: dict[str, float], primary: str, higher: bool) -> str:
    sign = 1.0 if higher else -1.0
    gap = sign * (fp32[primary] - row.metrics[primary])
    base = sign * (fp32[primary] - baseline.metrics[primary])
    if row is baseline:
        return "1.00"
    if abs(base) < 1e-12:
        return "n/a (no uniform loss)"
    return f"{gap / base:.2f}"


def mse_cell(row: Row, baseline: Row) -> str:
    if not row.weight_mse or row is baseline:
        return ""
    lower = sum(row.weight_mse[k] < baseline.weight_mse[k] for k in baseline.weight_mse)
    ratios = torch.tensor(
        [row.weight_mse[k] / max(baseline.weight_mse[k], 1e-30) for k in baseline.weight_mse]
    )
    geometric = float(ratios.log().mean().exp())
    return f"{lower} of {len(ratios)} (mean ratio {geometric:.2f})"


def model_table(
    name: str, primary: str, rows: list[Row], fp32: dict[str, float], higher: bool
) -> str:
    keys = list(fp32)
    header = [
        "method",
        *[f"**{k}**" if k == primary else k for k in keys],
        "bits / weight",
        "size MB",
        "quantize s",
        "gap / uniform gap",
        "weight MSE lower",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(
        "| FP32 (reference) | "
        + " | ".join(f"{fp32[k]:.4f}" if abs(fp32[k]) < 10 else f"{fp32[k]:.2f}" for k in keys)
        + " | 32 |  |  |  |  |"
    )
    baselines = {r.variant.group: r for r in rows if r.variant.baseline}
    for row in rows:
        base = baselines[row.variant.group]
        cells = [row.variant.label]
        for k in keys:
            value = row.metrics.get(k, float("nan"))
            cells.append(f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}")
        cells += [
            "" if row.bits_per_weight is None else f"{row.bits_per_weight:g}",
            f"{row.size_bytes / 1e6:.2f}",
            f"{row.seconds:.1f}",
            gap_ratio(row, base, fp32, primary, higher),
            mse_cell(row, base),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chain(uniform: Row, plain: Row, corrected: Row, primary: str, sign: float) -> str:
    """The issue's chain for one PWLQ row and its +BC row against the uniform baseline."""
    every_layer = all(plain.weight_mse[k] < uniform.weight_mse[k] for k in uniform.weight_mse)
    better = sign * (plain.metrics[primary] - uniform.metrics[primary]) > 0
    bc_better = sign * (corrected.metrics[primary] - plain.metrics[primary]) > 0
    return (
        f"weight MSE lower on every layer {'yes' if every_layer else 'NO'}, "
        f"metric better than uniform {'yes' if better else 'NO'}, "
        f"+BC better still {'yes' if bc_better else 'NO'}"
    )


def verdict(name: str, primary: str, rows: list[Row], higher: bool) -> str:
    """The issue's claims, checked on one model's numbers."""
    sign = 1.0 if higher else -1.0
    by_label = {r.variant.label: r for r in rows}
    claims = []
    for group in ("W4A8", "W3A8"):
        uniform = by_label[f"{group} uniform (MSE range)"]
        plain, corrected = by_label.get(f"{group} PWLQ"), by_label.get(f"{group} PWLQ +BC")
        if plain is None or corrected is None:
            claims.append(f"{group}: PWLQ or PWLQ +BC skipped in this run")
            continue
        claims.append(f"{group}: " + chain(uniform, plain, corrected, primary, sign))
        empirical = by_label.get(f"{group} PWLQ +BC, {EMPIRICAL_BC}")
        if empirical is not None:
            beats = sign * (empirical.metrics[primary] - plain.metrics[primary]) > 0
            claims[-1] += f", +BC and {EMPIRICAL_BC} better still {'yes' if beats else 'NO'}"
        on_output = by_label.get(f"{group} PWLQ, {OUTPUT_OBJECTIVE}")
        corrected_on_output = by_label.get(f"{group} PWLQ +BC, {OUTPUT_OBJECTIVE}")
        if on_output is not None and corrected_on_output is not None:
            claims[-1] += f"; {group} with the {OUTPUT_OBJECTIVE}: " + chain(
                uniform, on_output, corrected_on_output, primary, sign
            )
    split_label = f"W3A8 PWLQ +BC, 2 breakpoints above {SPLIT_ABOVE:.1%} error"
    for label in ("W3A8 PWLQ grid search +BC", split_label, "W3A8 PWLQ 2 breakpoints +BC"):
        row = by_label.get(label)
        if row is not None:
            uniform = by_label["W3A8 uniform (MSE range)"]
            beats = sign * (row.metrics[primary] - uniform.metrics[primary]) > 0
            claims.append(f"{label[5:]} better than uniform {'yes' if beats else 'NO'}")
    w4a4 = [r for r in rows if r.variant.group == "W4A4"]
    parts = [
        f"{'PWLQ' if '2 breakpoints' not in r.variant.label else '2 breakpoints'} beats uniform "
        + ("yes" if sign * (r.metrics[primary] - w4a4[0].metrics[primary]) > 0 else "NO")
        for r in w4a4[1:]
    ]
    claims.append("W4A4: " + (", ".join(parts) if parts else "PWLQ skipped in this run"))
    return f"- **{name}**: " + "; ".join(claims) + "."


def machine_line(total: float, command: str) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return (
        f"Measured {datetime.date.today().isoformat()} on this machine: {os.cpu_count()} cores "
        f"({model.group(1).strip() if model else platform.processor()}), torch "
        f"{torch.__version__} with {torch.get_num_threads()} thread(s), Python "
        f"{platform.python_version()}. Command: `{command}`; this model took "
        f"{total / 60:.1f} min."
    )


EARLIER_RUN = (
    "Earlier run (2026-11-23, `python bench/pwlq.py`, all models, 53.3 min): PWLQ breakpoints "
    "from the closed-form Gaussian approximation, no AdaRound or two-breakpoint rows; not rerun "
    "with this version yet."
)
EARLIER_MARK = " (earlier run)"
ACTIVATION_TEXT = {
    "auto": "the clip range m and the breakpoints searched jointly on the calibration "
    "histogram's squared error, clipping included (one breakpoint: a grid of m and p/m, coarse "
    "to fine; two: a search over m with eq. 6's breakpoints for each m); a tensor that goes "
    "below zero gets the better, on that error, of the signed grid on [-m, m] and a one-sided "
    "grid on [f, m] from its least value f (after hardswish or GELU; zero exact)",
    "approx": "the MSE range of the activation; one breakpoint from the closed form with σ the "
    "calibration histogram's root mean square, two from eq. 6 on its CDF",
    "bisection": "the MSE range of the activation; the breakpoints from eq. 6 on the calibration "
    "histogram's CDF",
    "grid": "as `auto`: the clip range m and the breakpoints searched jointly on the calibration "
    "histogram's squared error, signed or from the floor f",
}
TWO_TEXT = {
    "auto": "per channel the better of eq. 6 solved by bisection on a fitted Gaussian and the "
    "coordinate-wise L2 search from it, judged after +BC",
    "approx": "eq. 6 solved by bisection on a fitted Gaussian",
    "bisection": "eq. 6 solved by bisection on a fitted Gaussian",
    "grid": "the coordinate-wise L2 search from eq. 6's bisection solution",
}
SEARCH_TEXT = {
    "auto": "`auto`: per channel the better of the closed-form Gaussian approximation "
    "(supplement §1.1) and the coarse-to-fine L2 search, judged by the weight error after +BC "
    "when +BC is on",
    "approx": "the closed-form Gaussian approximation (supplement §1.1)",
    "bisection": "the bisection solve of eq. 6 on a fitted Gaussian",
    "grid": "the coarse-to-fine grid search on each channel's L2 error (supplement Algorithm 1)",
}


def section_text(search: str, adaround_iterations: int, verdicts: str, blocks: str) -> str:
    adaround_text = (
        f"W4A8 uniform + AdaRound: the core's MSE weight ranges, then AdaRound "
        f"(`qpp.ptq.adaround`, {adaround_iterations} iterations, the first "
        f"{ADAROUND_SAMPLES} calibration samples, otherwise its defaults), then activation "
        "ranges."
        if adaround_iterations
        else "AdaRound is not in this run (`--adaround-iterations 0`)."
    )
    return f"""{START_MARK}
## PWLQ vs uniform weights (`bench/pwlq.py`)

Per-channel weights; W4A8 and W3A8 keep the core's 8-bit per-tensor activations with the MSE
range. Uniform: symmetric per-channel grid with the MSE range (the core's default). PWLQ:
`--weight-quantizer pwlq --breakpoint-search {search}`: one breakpoint per side from
{SEARCH_TEXT[search]}, the official code's non-overlapping form, `m = max|w|` per channel, every
conv and linear quantized (first and last included); +BC: `--bias-correction` (per-channel mean
and std, as the paper's code); "+BC, {EMPIRICAL_BC}": `--bias-correction
--empirical-bias-correction`, +BC and then the white paper's bias correction on data (eq. 19:
each layer's bias minus its output mean shift on the calibration set, layer by layer; ours on
PWLQ, not the paper's). "grid search": `--breakpoint-search grid`, the coarse-to-fine
search on each channel's L2 error (supplement Algorithm 1). "2 breakpoints": `--breakpoints 2`
(supplement eq. 1, paper Table 1; {TWO_TEXT[search]}), two region
bits per weight. "2 breakpoints above {SPLIT_ABOVE:.1%} error": `--split-above {SPLIT_ABOVE}`,
one breakpoint, but two on the layers whose relative squared weight error with one is above
{SPLIT_ABOVE:.1%} (ours, not the paper's; "bits / weight" counts their second region bit).
"{OUTPUT_OBJECTIVE}": `--breakpoint-objective output` (ours, not the paper's): the same
searches judge each channel's breakpoint by the layer's mean squared output error on the
calibration data, `(ŵ - w)ᵀ E[x xᵀ] (ŵ - w)` with the float model's inputs x, instead of the
weight error `||ŵ - w||²`; in its "+BC" row, +BC is the per-channel constant weight shift that
minimises that output error (gain 1), not the paper's match of the weights' mean and std.
W4A4 PWLQ adds `--activation-quantizer pwlq`: {ACTIVATION_TEXT[search]}.
{adaround_text} "bits / weight" is the stored cost: PWLQ stores
its region index (1 bit for one breakpoint, 2 for two) on top of the b-bit value. "gap / uniform
gap": the loss of the primary metric against FP32 over the uniform row's loss at the same
bit-widths (below 1 is better). "weight MSE lower": layers where PWLQ's weight MSE is below
uniform's, and the geometric mean of PWLQ/uniform weight MSE. Data: each zoo entry's default
calibration set; its evaluation set, of the size in each model's command (`--eval-samples N`:
the first N samples; digits-cnn always its whole set); `--skip` rows are left out; with
`--exact-plateaus` in a model's command, every one of its rows, uniform included, holds
activation floors and ceilings exactly on the grid (`qpp quantize --exact-plateaus`; off by
default in qpp).
At equal storage, PWLQ at b bits (b + 1 stored) compares with
uniform at b + 1 bits: read the W3A8 PWLQ rows against the W4A8 uniform rows (both 4 bits per
weight). Each model runs alone (`--models NAME`) and replaces only its own lines below.

{verdicts}

{blocks}
{END_MARK}"""


def merge_section(
    previous: str, verdicts: dict[str, str], blocks: dict[str, str]
) -> tuple[str, str]:
    """The verdict lines and model blocks of ``previous`` (the section now in the docs) with
    this run's models replaced, in the order of ``MODELS``."""
    old_verdicts = {}
    for match in re.finditer(r"^- \*\*([\w-]+)\*\*:.*$", previous, re.MULTILINE):
        line, block = match.group(0), previous.split(f"### {match.group(1)}\n")[-1][:800]
        earlier = "Measured " not in block and not line.endswith(EARLIER_MARK)
        old_verdicts[match.group(1)] = line + EARLIER_MARK if earlier else line
    old_blocks = {}
    for chunk in previous.split("\n### ")[1:]:
        name, _, body = chunk.split(END_MARK)[0].strip().partition("\n")
        body = body.strip("\n")
        if "Measured " not in body and EARLIER_RUN not in body:  # the bench's first version
            body = f"{EARLIER_RUN}\n\n{body}"
        old_blocks[name.strip()] = f"### {name.strip()}\n\n{body}\n"
    names = [n for n in MODELS if n in blocks or n in old_blocks]
    lines = [verdicts.get(n) or old_verdicts.get(n, "") for n in names]
    return (
        "\n".join(line for line in lines if line),
        "\n".join(blocks.get(n) or old_blocks[n] for n in names),
    )


def write_docs(search: str, adaround_iterations: int, verdicts: dict, blocks: dict) -> None:
    text = DOCS.read_text() if DOCS.is_file() else ""
    found = re.search(re.escape(START_MARK) + ".*?" + re.escape(END_MARK), text, re.DOTALL)
    previous = found.group(0) if found else ""
    merged_verdicts, merged_blocks = merge_section(previous, verdicts, blocks)
    section = section_text(search, adaround_iterations, merged_verdicts, merged_blocks)
    write_section(section, START_MARK, END_MARK, DOCS)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--quick", action="store_true", help="small data; does not write docs")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: a shared machine)"
    )
    parser.add_argument(
        "--search", default="auto", choices=sorted(SEARCH_TEXT), help="PWLQ breakpoint search"
    )
    parser.add_argument(
        "--adaround-iterations", type=int, default=200, help="W4A8 AdaRound row (0: none)"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated words: leave out the rows whose label contains one "
        "(e.g. 'AdaRound,2 breakpoints'); the uniform rows cannot be left out",
    )
    parser.add_argument(
        "--exact-plateaus",
        action="store_true",
        help="every row with `--exact-plateaus` (activation floors held on the grid)",
    )
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="evaluation set size (minilm, ppocr-*; digits-cnn keeps its own)",
    )
    args = parser.parse_args(argv)
    skip = [word.strip() for word in args.skip.split(",") if word.strip()]
    if any(skipped(v.label, skip) for v in variants(args.search, 1) if v.baseline):
        parser.error("--skip would leave out a uniform baseline row; skip only PWLQ/AdaRound rows")
    if args.eval_samples is not None and args.eval_samples < 1:
        parser.error("--eval-samples must be at least 1")
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    command = "python bench/pwlq.py" + (" " + " ".join(argv) if argv else "")
    for name in names:
        torch.manual_seed(0)
        started = time.perf_counter()
        primary, rows, fp32, summary = bench_model(
            name,
            args.quick,
            args.search,
            args.adaround_iterations,
            skip,
            args.eval_samples,
            args.exact_plateaus,
        )
        higher = entry_class(name).higher_is_better
        table = model_table(name, primary, rows, fp32, higher)
        line = verdict(name, primary, rows, higher)
        print(f"\n## {name}\n\n{table}\n\n{line}\n", flush=True)
        measured = machine_line(time.perf_counter() - started, command)
        block = f"### {name}\n\n{measured}\n\n{summary}\n\n{table}\n"
        if not args.quick and not args.no_docs:
            # Each model as soon as it is done: a long run that stops keeps what it measured.
            write_docs(args.search, args.adaround_iterations, {name: line}, {name: block})
            log(f"wrote {name} to {DOCS}")


if __name__ == "__main__":
    main(sys.argv[1:])
