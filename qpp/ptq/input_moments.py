"""Second moments of each weight layer's input on calibration data, ``H = E[x xᵀ]``.

For ``y = W x`` a weight error ``ΔW`` moves output channel ``c`` by ``Δw_cᵀ x``, so its mean
squared output error is ``Δw_cᵀ H Δw_c`` (the quadratic form behind AdaRound's and GPTQ's layer
objectives). ``x`` is one input vector of the layer: a token's features for a linear layer, an
im2col patch (``C_in/G · k_h · k_w`` values, in the weight's own order) for a convolution, one
``H`` per group of a grouped convolution. The inputs are those of the float model (every
quantizer off), as the weight encodings come before the activation ranges; padding tokens of
``(input_ids, attention_mask)`` batches are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qpp.errors import ConfigError
from qpp.graph.patterns import weight_layers
from qpp.ptq.activations import Batch, Recorder, data_positions, layer_rows
from qpp.ptq.bias_correction import float_model
from qpp.report.progress import progress
from qpp.sim.model import QuantizedModel


@torch.no_grad()
def input_moments(
    qmodel: QuantizedModel,
    data: Sequence[Batch],
    targets: set[str] | None = None,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Weight attribute path -> ``E[x xᵀ]`` ``[G, D, D]`` (float64) of that layer's input over
    ``data``, for every conv/linear layer whose weight is in ``targets`` (all when ``None``)."""
    if not data:
        raise ConfigError("output-error objectives need calibration data; pass some batches")
    layers = {
        layer.name: layer
        for layer in weight_layers(qmodel.graph_module)
        if targets is None or layer.weight in targets
    }
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: torch.Tensor | None = None

    def watch(node: object, args: tuple[object, ...], _output: object) -> None:
        layer = layers[node.name]  # type: ignore[attr-defined]
        x, weight = args[0], args[1]
        assert isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
        x = x.detach().float()
        if layer.is_conv and x.ndim not in (3, 4):
            raise ConfigError(
                f"layer '{layer.name}' is a {x.ndim - 2}-D convolution; output-error objectives "
                "support conv1d, conv2d and linear layers"
            )
        if not layer.is_conv and mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            x = x[mask]
        rows = layer_rows(layer, x, tuple(weight.shape[2:]))  # [L, G·D]
        columns = rows.T.reshape(layer.groups, -1, rows.shape[0])  # [G, D, L]
        if layer.is_conv:  # the float32 sum rounds by layout; this is the one measured with
            columns = columns.contiguous()
        moment = torch.einsum("gdl,gel->gde", columns, columns).double()
        sums[layer.name] = sums.get(layer.name, 0) + moment
        counts[layer.name] = counts.get(layer.name, 0) + rows.shape[0]

    with float_model(qmodel):
        recorder = Recorder(qmodel.graph_module, {name: watch for name in layers})
        for batch in progress(data, "input moments", show_progress):
            mask = data_positions(batch)
            recorder.run_batches([batch])
    return {layers[name].weight: total / max(counts[name], 1) for name, total in sums.items()}


def output_objective_targets(qmodel: QuantizedModel) -> set[str]:
    """Weight attribute paths whose quantizer asks for an output-error objective."""
    return {
        qmodel.weight_target(quantizer.name)
        for quantizer, _ in qmodel.weight_quantizers()
        if quantizer.spec.piecewise is not None and quantizer.spec.piecewise.objective == "output"
    }


def compute_weight_encodings(
    qmodel: QuantizedModel, data: Sequence[Batch] | None, show_progress: bool = False
) -> None:
    """Every weight encoding; the quantizers with an output-error objective get their layer's
    input moments on ``data`` (one float pass for them all)."""
    targets = output_objective_targets(qmodel)
    if not targets:
        qmodel.compute_weight_encodings()
        return
    if not data:
        raise ConfigError(
            "the PWLQ output-error objective (--breakpoint-objective output) needs calibration "
            "data; pass batches or use --breakpoint-objective weight"
        )
    qmodel.compute_weight_encodings(input_moments(qmodel, data, targets, show_progress))
