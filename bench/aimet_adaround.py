"""AIMET's AdaRound on a qpp zoo model (run by bench/wp_ptq.py in the AIMET venv, one process).

Usage: ``/work/venvs/aimet/bin/python bench/aimet_adaround.py SPEC.json`` where the spec names
the zoo model and its data sizes, the bit-widths, AdaRound iterations and calibration samples,
and the output ``.npz`` for the evaluation outputs. AIMET: BN folded, per-channel symmetric
weights (AIMET's per-channel config), ``post_training_tf_enhanced`` (MSE-like) ranges,
AdaRound with its defaults (λ = 0.01, β 20 -> 2, warm start 0.2, Adam), then activation
encodings on the calibration data with the AdaRounded weight encodings frozen.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ONNX_MODULES = ("onnx2torch", "qpp.graph.onnx_import")
#: Hugging Face modules torch.fx cannot trace (BERT's embeddings slice ``position_ids`` by the
#: input's length); AIMET keeps them as leaves like the onnx2torch modules.
UNTRACEABLE_HF = ("BertEmbeddings",)


def main(spec_path: str) -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import aimet_torch
    from aimet_common.defs import QuantScheme
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    from bench.wp_ptq import limit, make_entry

    config_file = os.path.join(
        os.path.dirname(aimet_torch.__file__),
        "common",
        "quantsim_config",
        "default_config_per_channel.json",
    )
    entry = make_entry(spec["model"], spec["quick"])
    calibration = limit(entry.calibration_set(), spec["samples"])
    evaluation = entry.evaluation_set()
    model = entry.load_model().eval()
    dummy = tuple(calibration[0])
    started = time.perf_counter()
    # onnx2torch's op modules (and qpp's ONNX import fixes) branch on tensor values or assign
    # into index lists in forward, which torch.fx cannot trace; they stay leaf modules (same
    # model, same function), the rest is traced as usual.
    leaves = sorted(
        {
            type(m)
            for m in model.modules()
            if type(m).__module__.startswith(ONNX_MODULES) or type(m).__name__ in UNTRACEABLE_HF
        },
        key=lambda kind: kind.__name__,
    )
    if any(type(m).__name__ in UNTRACEABLE_HF for m in model.modules()):
        # The BERT forward branches on the attention mask, so torch.fx cannot trace it at all:
        # AIMET quantizes its modules (Linear, Embedding, LayerNorm, GELU) as they stand, and
        # the functional ops between them (attention matmuls, softmax, adds) stay float.
        model.eval()
    else:
        model = prepare_model(model, module_classes_to_exclude=leaves)
        register_output_quantized(leaves)
    fold_all_batch_norms(model, None, dummy_input=dummy)
    scheme = QuantScheme.post_training_tf_enhanced
    params = AdaroundParameters(
        data_loader=calibration,
        num_batches=len(calibration),
        default_num_iterations=spec["iterations"],
        forward_fn=lambda m, batch: m(*batch),
    )
    with tempfile.TemporaryDirectory() as folder:
        adarounded = Adaround.apply_adaround(
            model,
            dummy,
            params,
            folder,
            "adaround",
            default_param_bw=spec["weight_bits"],
            default_quant_scheme=scheme,
            default_config_file=config_file,
        )
        adaround_seconds = time.perf_counter() - started
        sim = QuantizationSimModel(
            adarounded,
            dummy,
            quant_scheme=scheme,
            default_output_bw=spec["activation_bits"],
            default_param_bw=spec["weight_bits"],
            config_file=config_file,
        )
        sim.set_and_freeze_param_encodings(os.path.join(folder, "adaround.encodings"))

        def calibrate(m: torch.nn.Module, _: object) -> None:
            with torch.no_grad():
                for batch in calibration:
                    m(*batch)

        sim.compute_encodings(calibrate, None)
    total_seconds = time.perf_counter() - started
    with torch.no_grad():
        outputs = torch.cat([sim.model(*batch) for batch in evaluation.batches])
    np.savez(spec["output"], outputs=outputs.numpy())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "adaround_seconds": round(adaround_seconds, 2),
                "total_seconds": round(total_seconds, 2),
                "peak_rss_mb": round(peak),
            }
        )
    )


def register_output_quantized(classes: list[type]) -> None:
    """Tell AIMET's QuantSim how to quantize onnx2torch leaf modules: the output only, as AIMET
    does for its own elementwise ops (qpp quantizes the same op outputs)."""
    from aimet_torch.nn import QuantizationMixin

    for kind in classes:

        def forward(self, *args, _kind=kind, **kwargs):
            output = _kind.forward(self, *args, **kwargs)
            quantizer = self.output_quantizers[0]
            return quantizer(output) if quantizer is not None else output

        quantized = type(
            f"Quantized{kind.__name__}",
            (QuantizationMixin, kind),
            {"__quant_init__": QuantizationMixin.__unary__, "forward": forward},
        )
        QuantizationMixin.implements(kind)(quantized)


if __name__ == "__main__":
    main(sys.argv[1])
