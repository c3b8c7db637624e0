"""What every zoo entry provides: a model, its data and its task metric.

A batch is a tuple of positional model inputs. Evaluation runs the model over the evaluation
batches (``qpp.evaluate`` does that, with progress), concatenates the outputs along the batch
dimension and hands them to ``metrics`` together with the FP32 model's outputs on the same
batches, so metrics that compare against FP32 (cosine, nearest-neighbour agreement) and metrics
against labels (accuracy, CER, F1) share one signature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

Batch = tuple[torch.Tensor, ...]


@dataclass
class EvaluationSet:
    """Batches of model inputs, plus whatever the metric needs (labels, strings, boxes)."""

    batches: list[Batch]
    targets: object = None
    input_names: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(int(batch[0].shape[0]) for batch in self.batches)


class ZooEntry(ABC):
    """A real model with its calibration data, evaluation data and task metric."""

    name: str
    summary: str
    primary_metric: str
    #: True when larger values of the primary metric are better.
    higher_is_better: bool = True

    @abstractmethod
    def load_model(self) -> torch.nn.Module:
        """The FP32 model in eval mode, taking the batches' tensors as positional inputs."""

    @abstractmethod
    def calibration_set(self) -> list[Batch]:
        """Unlabeled input batches for calibration (disjoint from the evaluation set)."""

    @abstractmethod
    def evaluation_set(self) -> EvaluationSet:
        """Input batches and targets for evaluation."""

    @abstractmethod
    def metrics(
        self, outputs: torch.Tensor, reference_outputs: torch.Tensor, evaluation: EvaluationSet
    ) -> dict[str, float]:
        """Task metrics of ``outputs`` (all evaluation samples, concatenated on dim 0).

        ``reference_outputs`` are the FP32 model's outputs on the same samples. The dict's
        first key is ``primary_metric``.
        """
