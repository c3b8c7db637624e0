"""The MiniLM zoo entry: sentence-transformers' embedding, offline sentences and metrics."""

import pytest
import torch
import torch.nn.functional as F

from qpp.zoo.minilm import (
    EMBEDDING_DIM,
    MAX_WORDS,
    MIN_WORDS,
    MiniLM,
    mean_cosine_metrics,
    model_folder,
    offline_sentences,
    split_sentences,
)


@pytest.fixture(scope="module")
def entry() -> MiniLM:
    return MiniLM(num_calibration=8, num_evaluation=12, batch_size=8)


@pytest.fixture(scope="module")
def model(entry: MiniLM) -> torch.nn.Module:
    return entry.load_model()


def test_matches_sentence_transformers(entry: MiniLM, model: torch.nn.Module) -> None:
    from sentence_transformers import SentenceTransformer

    sentences = entry.evaluation_sentences()
    reference = SentenceTransformer(str(model_folder()), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    with torch.no_grad():
        embeddings = torch.cat([model(*batch) for batch in entry.evaluation_set().batches])
    assert embeddings.shape == (len(sentences), EMBEDDING_DIM)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(sentences)))
    assert F.cosine_similarity(embeddings, reference.cpu(), dim=1).min() > 0.9999


def test_exports_with_dynamic_batch(entry: MiniLM, model: torch.nn.Module) -> None:
    input_ids, attention_mask = entry.calibration_set()[0]
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        model,
        (input_ids, attention_mask),
        strict=False,
        dynamic_shapes=({0: batch}, {0: batch}),
    )
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(input_ids[:3], attention_mask[:3]),
            model(input_ids[:3], attention_mask[:3]),
        )


def test_batches(entry: MiniLM) -> None:
    calibration = entry.calibration_set()
    evaluation = entry.evaluation_set()
    assert [len(batch[0]) for batch in calibration] == [8]
    assert [len(batch[0]) for batch in evaluation.batches] == [8, 4]
    assert evaluation.num_samples == len(evaluation.targets) == 12
    for input_ids, attention_mask in [*calibration, *evaluation.batches]:
        assert input_ids.dtype == attention_mask.dtype == torch.int64
        assert input_ids.shape == attention_mask.shape == (len(input_ids), entry.max_length)


def test_sentences_are_deterministic_and_disjoint() -> None:
    sentences = offline_sentences()
    offline_sentences.cache_clear()
    assert offline_sentences() == sentences
    assert len(sentences) >= 600
    assert len({s.lower() for s in sentences}) == len(sentences)
    assert all(MIN_WORDS <= len(s.split()) <= MAX_WORDS for s in sentences)

    calibration, evaluation = split_sentences(128, 400)
    assert (len(calibration), len(evaluation)) == (128, 400)
    assert not set(calibration) & set(evaluation)
    # Shrinking one set keeps a prefix and leaves the other alone.
    assert split_sentences(16, 400) == (calibration[:16], evaluation)
    assert MiniLM(num_evaluation=10).evaluation_sentences() == evaluation[:10]


def test_metrics_identical() -> None:
    embeddings = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    metrics = mean_cosine_metrics(embeddings, embeddings.clone())
    assert next(iter(metrics)) == MiniLM.primary_metric
    assert metrics["mean_cosine"] == pytest.approx(1.0)
    assert metrics["min_cosine"] == pytest.approx(1.0)
    assert metrics["nn_agreement"] == 100.0


def test_metrics_perturbed() -> None:
    # Two tight pairs far apart: (0, 1) and (2, 3); each one's neighbour is its partner.
    reference = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 0.99, 0.0]])
    # Sentence 1 leaves the first pair: 0 and 1 lose their neighbours, 2 and 3 keep theirs.
    outputs = reference.clone()
    outputs[1] = torch.tensor([-1.0, 0.0, 0.2])
    metrics = mean_cosine_metrics(outputs, reference)
    assert metrics["nn_agreement"] == pytest.approx(50.0)
    cosine_moved = F.cosine_similarity(outputs[1], reference[1], dim=0).item()
    assert metrics["min_cosine"] == pytest.approx(cosine_moved)
    assert metrics["mean_cosine"] == pytest.approx((3 + cosine_moved) / 4)

    # Shuffled embeddings keep no neighbours and point elsewhere.
    embeddings = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    shuffled = mean_cosine_metrics(embeddings[torch.arange(49, -1, -1)], embeddings)
    assert shuffled["mean_cosine"] < 0.5
    assert shuffled["nn_agreement"] < 20.0
