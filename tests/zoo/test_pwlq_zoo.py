"""PWLQ on a real zoo model (digits-cnn, small data): better than uniform at low bit-widths."""

import torch

import qpp
from qpp.quant.spec import PiecewiseSpec
from qpp.sim.config import QuantConfig
from qpp.zoo.digits import DigitsCNN


def test_pwlq_beats_uniform_at_w3a8_and_w4a4() -> None:
    entry = DigitsCNN(num_calibration=64)
    model = entry.load_model()
    evaluation = entry.evaluation_set()
    batches = evaluation.batches[:2]
    reference = qpp.run(model, batches)
    calibration = entry.calibration_set()

    def cosine(config: QuantConfig) -> float:
        outputs = qpp.run(qpp.quantize(model, calibration, config), batches)
        return float(torch.nn.functional.cosine_similarity(outputs, reference).mean())

    corrected = PiecewiseSpec(bias_correction=True)
    uniform_w3 = cosine(QuantConfig(weight_bits=3))
    pwlq_w3 = cosine(QuantConfig(weight_bits=3, weight_quantizer="pwlq"))
    assert pwlq_w3 > uniform_w3 and 1 - pwlq_w3 < (1 - uniform_w3) / 2
    uniform_w4a4 = cosine(QuantConfig(weight_bits=4, activation_bits=4))
    pwlq_w4a4 = cosine(
        QuantConfig(
            weight_bits=4,
            activation_bits=4,
            weight_quantizer="pwlq",
            activation_quantizer="pwlq",
            piecewise=corrected,
        )
    )
    assert pwlq_w4a4 > uniform_w4a4
