"""PP-OCR zoo entries: rapidocr's conventions, deterministic data, metrics, FP32 quality."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier
from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer
from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

from qpp.errors import DataError
from qpp.zoo import get_entry
from qpp.zoo.ppocr import (
    PPOCRClassification,
    PPOCRDetection,
    PPOCRRecognition,
    character_error_rate,
    ctc_alphabet,
    ctc_greedy_decode,
    detection_scores,
    edit_distance,
    resize_normalize,
)
from qpp.zoo.render import random_style, random_text, render_line


def test_registry_builds_the_entries() -> None:
    assert isinstance(get_entry("ppocr-rec"), PPOCRRecognition)
    assert isinstance(get_entry("ppocr-cls"), PPOCRClassification)
    assert isinstance(get_entry("ppocr-det"), PPOCRDetection)


@pytest.mark.parametrize("seed", range(4))
def test_preprocessing_matches_rapidocr(seed: int) -> None:
    rng = np.random.default_rng(seed)
    crop = render_line(random_text(rng), random_style(rng, (14, 44)), rng)[..., ::-1]
    recognizer = SimpleNamespace(rec_image_shape=[3, 48, 320])
    expected = TextRecognizer.resize_norm_img(recognizer, crop, 320 / 48)
    np.testing.assert_array_equal(resize_normalize(crop, 48, 320), expected)
    classifier = SimpleNamespace(cls_image_shape=[3, 48, 192])
    expected = TextClassifier.resize_norm_img(classifier, crop)
    np.testing.assert_array_equal(resize_normalize(crop, 48, 192), expected)


def test_ctc_decoding_matches_rapidocr() -> None:
    generator = torch.Generator().manual_seed(0)
    alphabet_size = len(ctc_alphabet())
    # Few distinct classes, so repeats and blanks are common.
    indices = torch.randint(0, 6, (8, 40), generator=generator) * (alphabet_size // 7)
    logits = torch.randn(8, 40, alphabet_size, generator=generator)
    logits.scatter_(2, indices[..., None], 50.0)
    probabilities = logits.softmax(-1)
    decoder = CTCLabelDecode(character=list(ctc_alphabet()[1:-1]))
    expected = [text for text, _ in decoder(probabilities.numpy())]
    assert ctc_greedy_decode(probabilities) == expected


@pytest.mark.parametrize(
    ("source", "target", "distance"),
    [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_edit_distance(source: str, target: str, distance: int) -> None:
    assert edit_distance(source, target) == distance
    assert edit_distance(target, source) == distance


def test_character_error_rate() -> None:
    assert character_error_rate(["Total 12.50", "CITY"], ["Total 12.50", "CITY"]) == 0.0
    # one substitution and one deletion, over 9 target characters
    assert character_error_rate(["T0tal", "ITY"], ["Total", "CITY"]) == pytest.approx(200 / 9)


def test_detection_scores() -> None:
    truth = [np.array([[10, 10, 110, 30], [10, 50, 90, 70]], dtype=np.float32)]
    predicted = [
        np.array(
            [
                [8, 8, 112, 32],  # matches the first line (IoU 0.77)
                [10, 50, 30, 70],  # a quarter of the second line: IoU 0.25, a false positive
                [200, 200, 220, 210],  # nothing there
            ],
            dtype=np.float32,
        )
    ]
    scores = detection_scores(predicted, truth)
    assert scores["precision"] == pytest.approx(100 / 3)
    assert scores["recall"] == pytest.approx(50.0)
    assert scores["box_f1"] == pytest.approx(40.0)
    assert detection_scores([np.zeros((0, 4))], truth)["box_f1"] == 0.0


def test_data_is_deterministic_and_splits_are_disjoint() -> None:
    entry = PPOCRRecognition(num_eval=8, num_calib=8)
    first, second = entry.evaluation_set(), entry.evaluation_set()
    torch.testing.assert_close(first.batches[0][0], second.batches[0][0], rtol=0, atol=0)
    assert first.targets == second.targets
    calibration = entry.calibration_set()[0][0]
    assert not any(torch.equal(calibration[i], first.batches[0][0][i]) for i in range(8))
    # a shrunk set is a prefix of a larger one
    assert PPOCRRecognition(num_eval=12).evaluation_set().targets[:8] == first.targets


def test_sizes_and_batches() -> None:
    evaluation = PPOCRDetection(num_eval=10, num_calib=4).evaluation_set()
    assert [batch[0].shape[0] for batch in evaluation.batches] == [8, 2]
    assert evaluation.batches[0][0].shape[1:] == (3, 320, 320)
    assert evaluation.input_names == ["x"]
    calibration = PPOCRClassification(num_eval=4, num_calib=40).calibration_set()
    assert [batch[0].shape for batch in calibration] == [(32, 3, 48, 192), (8, 3, 48, 192)]


def test_metrics_reject_wrong_sample_count() -> None:
    entry = PPOCRClassification(num_eval=4, num_calib=4)
    evaluation = entry.evaluation_set()
    with pytest.raises(DataError, match="evaluation set has 4"):
        entry.metrics(torch.zeros(3, 2), torch.zeros(3, 2), evaluation)


def test_sizes_must_be_positive() -> None:
    with pytest.raises(DataError, match="num_eval=0"):
        PPOCRRecognition(num_eval=0)


def evaluate(entry: PPOCRRecognition | PPOCRClassification | PPOCRDetection) -> dict[str, float]:
    model = entry.load_model()
    evaluation = entry.evaluation_set()
    with torch.no_grad():
        outputs = torch.cat([model(*batch) for batch in evaluation.batches])
    metrics = entry.metrics(outputs, outputs, evaluation)
    assert next(iter(metrics)) == entry.primary_metric
    return metrics


def test_fp32_recognition_is_accurate() -> None:
    metrics = evaluate(PPOCRRecognition(num_eval=32, num_calib=1))
    assert metrics["exact_line_accuracy"] >= 80.0
    assert metrics["cer"] <= 5.0


def test_fp32_classification_is_accurate() -> None:
    assert evaluate(PPOCRClassification(num_eval=32, num_calib=1))["accuracy"] >= 85.0


def test_fp32_detection_is_accurate() -> None:
    metrics = evaluate(PPOCRDetection(num_eval=8, num_calib=1))
    assert metrics["box_f1"] >= 80.0
