"""Biases on the int32 accumulator grid, as integer kernels add them.

An integer conv or linear computes ``W_int x_int`` in an int32 accumulator at scale ``s_x s_w``
(white paper eq. 11) and adds the bias there, so the bias is stored as int32 on that grid
(§2.3: "kept at higher precision", not in float). Its rounding error is at most ``s_x s_w / 2``,
negligible for the task metric, but a model that amplifies one-step changes of its
pre-activations shows it at its outputs; simulating it makes the simulation compute exactly what
the deployed model computes.
"""

from __future__ import annotations

import torch

from qpp.quant.affine import fake_quantize_bias
from qpp.sim.quantizer import Mode, Quantizer


def quantizes(quantizer: Quantizer) -> bool:
    """True when ``quantizer`` fake-quantizes on one static uniform grid in the simulation."""
    return (
        quantizer.enabled
        and quantizer.mode is Mode.QUANTIZE
        and quantizer.spec.piecewise is None
        and quantizer.per_sample is None
    )


class BiasQuantizer(torch.nn.Module):
    """Rounds a bias onto the accumulator grid ``s_x s_w`` of its layer's input and weight
    quantizers, while both quantize (per-tensor input; per-tensor or per-channel weight).

    It has no encoding of its own: the grid follows the two quantizers, so recalibrating or
    disabling either one takes effect at once.
    """

    def __init__(self, name: str, activation: Quantizer, weight: Quantizer) -> None:
        super().__init__()
        self.name = name
        self.enabled = True
        # Plain references, not submodules: the quantizers are registered once, in the model.
        self.__dict__["activation"] = activation
        self.__dict__["weight"] = weight

    @property
    def activation(self) -> Quantizer:
        return self.__dict__["activation"]

    @property
    def weight(self) -> Quantizer:
        return self.__dict__["weight"]

    @property
    def active(self) -> bool:
        return (
            self.enabled
            and quantizes(self.activation)
            and quantizes(self.weight)
            and self.activation.axis is None
        )

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return bias
        return fake_quantize_bias(bias, self.activation.scale, self.weight.scale)

    def extra_repr(self) -> str:
        return f"{self.name!r}, grid {self.activation.name!r} x {self.weight.name!r}"
