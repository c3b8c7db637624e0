"""Every zoo model goes through the core at W8A8 and keeps its task quality (small data)."""

import pytest
import torch

import qpp
from qpp.zoo.base import ZooEntry
from qpp.zoo.digits import DigitsCNN
from qpp.zoo.minilm import MiniLM
from qpp.zoo.ppocr import PPOCRClassification, PPOCRDetection, PPOCRRecognition

# (entry, the largest allowed drop of the primary metric on this small evaluation set)
CASES = {
    "digits-cnn": (lambda: DigitsCNN(num_calibration=64), 1.0),
    "minilm": (lambda: MiniLM(num_calibration=32, num_evaluation=48), 0.02),
    "ppocr-cls": (lambda: PPOCRClassification(num_eval=32, num_calib=16), 3.2),
    "ppocr-rec": (lambda: PPOCRRecognition(num_eval=24, num_calib=16), 8.4),
    "ppocr-det": (lambda: PPOCRDetection(num_eval=8, num_calib=8), 5.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_w8a8_keeps_task_quality(name: str) -> None:
    make_entry, allowed_drop = CASES[name]
    entry: ZooEntry = make_entry()
    model = entry.load_model()
    evaluation = entry.evaluation_set()
    reference = qpp.run(model, evaluation.batches)
    quantized = qpp.quantize(model, entry.calibration_set())
    outputs = qpp.run(quantized, evaluation.batches)
    fp32 = entry.metrics(reference, reference, evaluation)[entry.primary_metric]
    w8a8 = entry.metrics(outputs, reference, evaluation)[entry.primary_metric]
    assert fp32 - w8a8 <= allowed_drop, (fp32, w8a8)
    # The simulation really quantizes: outputs differ from FP32, weights sit on their grids.
    assert not torch.equal(outputs, reference)
    name_, weight_quantizer = next(
        (n, q) for n in quantized.names if (q := quantized.quantizer(n)).kind.value == "weight"
    )
    weight = quantized.weight(name_)
    assert torch.equal(weight_quantizer.integer(weight).dequantize(), weight_quantizer(weight))
