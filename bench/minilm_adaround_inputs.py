"""Does AdaRound on MiniLM generalize? Calibration vs held-out sentences, per input form.

W4 weights on the linear layers only (embeddings and activations float, to isolate AdaRound),
round-to-nearest vs AdaRound with ``inputs="quantized"`` (eq. 25) or ``"float"`` (eq. 32);
mean cosine to FP32 on the calibration sentences AdaRound saw and on held-out sentences.

    .venv/bin/python bench/minilm_adaround_inputs.py [--iterations 300] [--inputs quantized]

Prints one line per setting (not written to docs; the notes in docs/benchmarks.md quote it).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--inputs", default="quantized,float")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--evaluation", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

    import qpp
    from qpp.ptq.adaround import AdaRoundConfig, adaround
    from qpp.sim.config import QuantConfig
    from qpp.zoo import entry_class
    from qpp.zoo.base import EvaluationSet

    entry = entry_class("minilm")(num_calibration=args.calibration, num_evaluation=args.evaluation)
    calibration = entry.calibration_set()
    evaluation = entry.evaluation_set()
    seen = EvaluationSet(
        calibration, entry.calibration_sentences(), input_names=evaluation.input_names
    )
    model = entry.load_model()
    references = {id(s): qpp.run(model, s.batches) for s in (seen, evaluation)}

    def cosine(qmodel) -> str:
        values = [
            entry.metrics(qpp.run(qmodel, s.batches), references[id(s)], s)["mean_cosine"]
            for s in (seen, evaluation)
        ]
        return f"calibration {values[0]:.4f}, held-out {values[1]:.4f}"

    for inputs in ["nearest", *args.inputs.split(",")]:
        qmodel = qpp.prepare(model, calibration[0], QuantConfig(weight_bits=4))
        qmodel.set_enabled(False, kind="activation")
        for name in qmodel.names:
            if "embeddings" in name:
                qmodel.quantizer(name).enabled = False
        qmodel.compute_weight_encodings()
        started = time.perf_counter()
        if inputs != "nearest":
            adaround(qmodel, calibration, AdaRoundConfig(args.iterations, inputs=inputs))
        seconds = time.perf_counter() - started
        print(f"{inputs:9s} {cosine(qmodel)} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
