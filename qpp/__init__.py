"""qpp: post-training quantization of PyTorch models, simulated, evaluated and saved.

``qpp.quantize(model, calibration_batches, QuantConfig(...))`` returns a ``QuantizedModel``.
"""

from qpp.api import calibrate, prepare, quantize, run
from qpp.sim.config import LayerOverride, QuantConfig
from qpp.sim.model import QuantizedModel

__all__ = [
    "LayerOverride",
    "QuantConfig",
    "QuantizedModel",
    "calibrate",
    "prepare",
    "quantize",
    "run",
]
