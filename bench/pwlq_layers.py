"""Which layers carry a PWLQ model's loss: one weight quantizer at a time (leave-one-in).

Quantizes a zoo model's weights with PWLQ (activations in float), then evaluates with only one
weight quantizer enabled at a time and prints, per layer, the primary metric, the channels'
``m̃ = max|w| / std(w)`` (median and max: how far from bell-shaped) and the weight's relative
squared error ``||ŵ - w||² / ||w||²``, worst layers first. Prints, writes nothing.

    .venv/bin/python bench/pwlq_layers.py ppocr-rec --bits 3 [--search approx] [--samples 64]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qpp.api import quantize, run
from qpp.quant.spec import PiecewiseSpec
from qpp.sim.config import QuantConfig
from qpp.zoo import entry_class


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--search", default="approx")
    parser.add_argument("--breakpoints", type=int, default=1)
    parser.add_argument("--no-bias-correction", action="store_true")
    parser.add_argument("--samples", type=int, default=64, help="evaluation samples (ppocr)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    cls = entry_class(args.model)
    sizes = {"num_eval": args.samples, "num_calib": 32} if args.model.startswith("ppocr") else {}
    entry = cls(**sizes)
    fp32 = entry.load_model()
    calibration, evaluation = entry.calibration_set(), entry.evaluation_set()
    reference = run(fp32, evaluation.batches)
    primary = entry.primary_metric
    spec = PiecewiseSpec(
        search=args.search,
        breakpoints=args.breakpoints,
        bias_correction=not args.no_bias_correction,
    )
    config = QuantConfig(weight_bits=args.bits, weight_quantizer="pwlq", piecewise=spec)
    model = quantize(fp32, calibration, config)
    model.set_enabled(False, kind="activation")

    def score() -> float:
        return entry.metrics(run(model, evaluation.batches), reference, evaluation)[primary]

    print(f"FP32 {primary} {entry.metrics(reference, reference, evaluation)[primary]:.2f}")
    print(f"all weights W{args.bits} PWLQ, activations float: {score():.2f}")
    weights = list(model.weight_quantizers())
    rows = []
    for quantizer, weight in weights:
        for other, _ in weights:
            other.enabled = other is quantizer
        with torch.no_grad():
            flat = weight.reshape(weight.shape[0], -1)
            normalised = flat.abs().amax(1) / flat.std(1).clamp(min=1e-12)
            error = float((quantizer(weight) - weight).square().sum() / weight.square().sum())
        rows.append((score(), quantizer.name, tuple(weight.shape), normalised, error))
    print(f"\n| layer | shape | {primary} (only this layer) | m~ median | m~ max | rel. error |")
    print("|---|---|---|---|---|---|")
    for metric, name, shape, normalised, error in sorted(rows, key=lambda r: r[0]):
        print(
            f"| {name} | {shape} | {metric:.2f} | {float(normalised.median()):.1f} | "
            f"{float(normalised.max()):.1f} | {error:.2e} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
