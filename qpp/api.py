"""The Python API: ``quantize`` a model on calibration data, ``run`` it over batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qpp.data import check_batches
from qpp.graph.capture import capture
from qpp.graph.fold import fold_batch_norms, fold_bias_adds, fold_scalar_affines
from qpp.graph.placement import place_quantizers
from qpp.predict import configure_activation_qps, settings_from_config
from qpp.ptq.activations import data_positions, real_positions
from qpp.ptq.bias_correction import BiasCorrectionConfig, BiasCorrectionReport, bias_correction
from qpp.ptq.input_moments import compute_weight_encodings
from qpp.report.progress import progress
from qpp.sim.config import QuantConfig
from qpp.sim.model import QuantizedModel

Batch = Sequence[torch.Tensor]


def prepare(model: torch.nn.Module, example: Batch, config: QuantConfig) -> QuantizedModel:
    """Capture ``model``, fold batch norms, bias adds and scalar affines into their layers, and
    insert quantizers (not yet calibrated)."""
    graph_module = capture(model, example)
    if config.fold_batch_norm:
        fold_batch_norms(graph_module)
        fold_bias_adds(graph_module)
        fold_scalar_affines(graph_module)
    return QuantizedModel(graph_module, place_quantizers(graph_module, config.policy), config)


def quantize(
    model: torch.nn.Module,
    calibration_data: Sequence[Batch],
    config: QuantConfig | None = None,
    show_progress: bool = False,
) -> QuantizedModel:
    """A calibrated simulated-quantized copy of ``model`` (the original is left untouched)."""
    config = config or QuantConfig()
    batches = check_batches(calibration_data, "calibration")
    batches = limit_samples(batches, config.calibration_samples)
    activation_qps = settings_from_config(config)
    quantized = prepare(model, batches[0], config)
    calibrate_and_correct(quantized, batches, show_progress)
    if activation_qps.needs_per_sample:  # dynamic or predicted QPs, or Dense+Sparse (QPP)
        configure_activation_qps(quantized, batches, activation_qps, show_progress)
    return quantized


def calibrate(
    model: QuantizedModel,
    batches: Sequence[Batch],
    show_progress: bool = False,
    weights: bool = True,
    real_tokens_only: bool = False,
) -> None:
    """Compute every quantizer's encoding from ``batches`` (weights first, then activations);
    ``weights=False`` keeps the weight encodings already set. ``real_tokens_only``: for token
    batches (``input_ids, attention_mask``) per-tensor activation ranges see only the positions
    the attention mask marks as tokens, not the padding."""
    observers = (
        [q for q in model.select(kind="activation") if q.axis is None] if real_tokens_only else []
    )
    if weights:
        compute_weight_encodings(model, batches, show_progress)
    try:
        with torch.no_grad(), model.calibration(weights=False):
            for batch in progress(batches, "calibrate", show_progress):
                mask = data_positions(batch)
                for quantizer in observers:
                    quantizer.observed_part = None if mask is None else real_positions(mask)
                model(*batch)
    finally:
        for quantizer in observers:
            quantizer.observed_part = None


def calibrate_and_correct(
    model: QuantizedModel, batches: Sequence[Batch], show_progress: bool = False
) -> BiasCorrectionReport | None:
    """``calibrate``; with ``config.empirical_bias_correction``, the white paper's empirical
    bias correction (eq. 19: each layer's bias minus ``E[ŷ] - E[y]`` on ``batches``) runs
    between the weight encodings and the activation ranges, and its report is returned."""
    if not model.config.empirical_bias_correction:
        calibrate(model, batches, show_progress)
        return None
    compute_weight_encodings(model, batches, show_progress)
    report = bias_correction(model, batches, BiasCorrectionConfig("empirical"), show_progress)
    calibrate(model, batches, show_progress, weights=False)
    return report


def limit_samples(batches: list[Batch], samples: int | None) -> list[Batch]:
    """The first ``samples`` samples of ``batches`` (all of them for ``None``)."""
    if samples is None:
        return batches
    kept: list[Batch] = []
    remaining = samples
    for batch in batches:
        if remaining <= 0:
            break
        kept.append(tuple(x[:remaining] for x in batch))
        remaining -= int(batch[0].shape[0])
    return kept


def run(
    model: Callable[..., torch.Tensor],
    batches: Sequence[Batch],
    label: str = "evaluate",
    show_progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run ``model`` over ``batches`` without gradients; outputs concatenated on dim 0."""
    outputs: list[object] = []
    with torch.no_grad():
        for batch in progress(batches, label, show_progress):
            outputs.append(model(*batch))
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)  # type: ignore[arg-type]
    if isinstance(first, tuple | list):
        return tuple(torch.cat([o[i] for o in outputs]) for i in range(len(first)))  # type: ignore[index]
    raise TypeError(
        f"model returned {type(first).__name__}; qpp expects tensors or tuples of tensors"
    )
