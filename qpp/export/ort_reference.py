"""ONNX Runtime's own static int8 quantization of an FP32 ONNX file: the peer qpp is compared with.

``quantize_static`` in QDQ format with per-channel QInt8 weights and QUInt8 activations (MinMax
calibration), after ``quant_pre_process``, as ``bench/ort_compare.py`` runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def pin_for_quantization(model: Path, example: dict[str, np.ndarray], output: Path) -> list[str]:
    """Opset 13 or later (per-channel DequantizeLinear needs its ``axis``, new in opset 13) and
    every input dimension but the batch pinned to ``example``'s, so that ORT's symbolic shape
    inference can follow the graph. Returns what was changed."""
    import onnx
    import onnx.version_converter

    proto = onnx.load(str(model))
    changes = []
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        proto = onnx.version_converter.convert_version(proto, 13)
        changes.append(f"opset {opset} → 13")
    for graph_input in proto.graph.input:
        if graph_input.name not in example:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        for dim, size in zip(dims[1:], example[graph_input.name].shape[1:], strict=True):
            if dim.dim_value != size:
                dim.dim_value = size
                changes.append(
                    f"{graph_input.name} pinned to batch x {example[graph_input.name].shape[1:]}"
                )
    onnx.save(proto, str(output))
    return sorted(set(changes))


def preprocess(
    model: Path, example: dict[str, np.ndarray], folder: Path
) -> tuple[Path, str, list[str]]:
    """The model ORT quantizes: pinned (``pin_for_quantization``), then ``quant_pre_process``
    (shape inference and ORT's basic optimizations, e.g. folding BatchNormalization into Conv),
    trying auto-merged and no symbolic shape inference when that fails. Returns the file, how
    it was made, and the failures on the way."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pinned, output = folder / "pinned.onnx", folder / "preprocessed.onnx"
    changes = pin_for_quantization(model, example, pinned)
    pinned_note = f"{', '.join(changes)}; " if changes else ""
    attempts = {
        "quant_pre_process": {},
        "quant_pre_process (auto_merge)": {"auto_merge": True},
        "quant_pre_process without symbolic shape inference": {"skip_symbolic_shape": True},
    }
    failures = []
    for how, options in attempts.items():
        start = time.perf_counter()
        try:
            quant_pre_process(str(pinned), str(output), **options)
        except Exception as error:  # ORT's preprocessing fails on some graphs; say so
            failures.append(f"{how} failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        return output, f"{pinned_note}{how} ({time.perf_counter() - start:.1f} s)", failures
    return pinned, f"{pinned_note}quant_pre_process failed, quantized without it", failures


def quantize_static_reference(
    model: Path,
    calibration: list[dict[str, np.ndarray]],
    output: Path,
    reduce_range: bool = False,
) -> Path:
    """ORT's ``quantize_static`` of ``model`` (QDQ, per-channel QInt8 weights, QUInt8
    activations, MinMax) calibrated on ``calibration`` feeds; ``reduce_range`` stores 7-bit
    weights, ORT's remedy for the saturating u8s8 kernel of x86 CPUs without VNNI."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        str(model),
        str(output),
        FeedReader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return output
