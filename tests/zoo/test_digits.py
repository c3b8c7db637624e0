"""The digits CNN zoo entry: deterministic cached training, its split and its metrics."""

from pathlib import Path

import pytest
import torch

from qpp.zoo import digits
from qpp.zoo.digits import DigitsCNN, TrainingRecipe, load_split, top1_metrics, weights_path


@pytest.fixture(scope="module")
def trained_twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The default recipe trained from scratch into two empty cache folders."""
    folders = tmp_path_factory.mktemp("cache-a"), tmp_path_factory.mktemp("cache-b")
    with pytest.MonkeyPatch.context() as patch:
        for folder in folders:
            patch.setenv("QPP_CACHE_DIR", str(folder))
            DigitsCNN().load_model()
    return folders


def _state(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("QPP_CACHE_DIR", str(folder))
    return DigitsCNN().load_model().state_dict()


def test_training_is_deterministic(
    trained_twice: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = (_state(folder, monkeypatch) for folder in trained_twice)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_cached_weights_are_reused(
    trained_twice: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: object) -> None:
        raise AssertionError("trained again despite cached weights")

    monkeypatch.setattr(digits, "train", no_training)
    monkeypatch.setenv("QPP_CACHE_DIR", str(trained_twice[0]))
    assert weights_path(TrainingRecipe()).is_file()
    DigitsCNN().load_model()
    # A changed recipe is a different cache file, so it would train.
    assert weights_path(TrainingRecipe(epochs=11)) != weights_path(TrainingRecipe())
    with pytest.raises(AssertionError, match="trained again"):
        DigitsCNN(recipe=TrainingRecipe(epochs=11)).load_model()


def test_accuracy(trained_twice: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPP_CACHE_DIR", str(trained_twice[0]))
    entry = DigitsCNN()
    model = entry.load_model()
    assert not model.training
    assert 10_000 < sum(p.numel() for p in model.parameters()) < 100_000
    evaluation = entry.evaluation_set()
    with torch.no_grad():
        outputs = torch.cat([model(*batch) for batch in evaluation.batches])
    assert outputs.shape == (360, 10)
    metrics = entry.metrics(outputs, outputs, evaluation)
    assert next(iter(metrics)) == entry.primary_metric
    assert metrics["top1"] > 95.0
    assert metrics["top1_agreement"] == 100.0
    assert metrics["output_cosine"] == pytest.approx(1.0)


def test_split() -> None:
    split = load_split(TrainingRecipe())
    assert split.eval_images.shape == (360, 1, 8, 8)
    assert len(split.train_images) + len(split.eval_images) == 1797
    assert split.train_images.min() >= 0.0 and split.train_images.max() <= 1.0
    torch.testing.assert_close(load_split(TrainingRecipe()).eval_labels, split.eval_labels)

    entry = DigitsCNN(num_calibration=128, batch_size=64)
    calibration = torch.cat([batch[0] for batch in entry.calibration_set()])
    torch.testing.assert_close(calibration, split.train_images[:128])
    evaluation = entry.evaluation_set()
    assert evaluation.num_samples == 360
    torch.testing.assert_close(evaluation.targets, split.eval_labels)


def test_metrics_by_hand() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    reference = torch.nn.functional.one_hot(labels, 10).float()
    metrics = top1_metrics(reference, reference, labels)
    assert metrics == pytest.approx({"top1": 100.0, "top1_agreement": 100.0, "output_cosine": 1.0})

    wrong = reference.clone()
    wrong[0] = torch.nn.functional.one_hot(torch.tensor(5), 10).float()
    metrics = top1_metrics(wrong, reference, labels)
    assert metrics == pytest.approx({"top1": 75.0, "top1_agreement": 75.0, "output_cosine": 0.75})


def test_deterministic_context_restores_settings() -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with digits._deterministic(0):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
