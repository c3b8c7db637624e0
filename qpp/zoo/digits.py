"""A small CNN that qpp trains on scikit-learn's bundled 8x8 digits, once, deterministically.

The 1,797 images of ``sklearn.datasets.load_digits`` (pixels 0-16, scaled to [0, 1]) are split
by a seeded permutation: 360 held out for evaluation, the rest for training, of which the first
128 are the calibration set. Training runs single-threaded with deterministic algorithms, so a
machine reproduces its own weights bit for bit; they are cached as safetensors under
``qpp.zoo.cache.cache_dir()``, named by a hash of the training recipe so a changed recipe
retrains.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qpp.zoo.base import Batch, EvaluationSet, ZooEntry
from qpp.zoo.cache import cache_dir

NUM_CLASSES = 10


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that decides the trained weights; its hash names the cache file."""

    architecture: str = "digits-cnn-v1"
    split_seed: int = 0
    num_evaluation: int = 360
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.01
    weight_decay: float = 1e-4

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU → conv-BN, plus the input, then ReLU (a ResNet basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(self.conv1(x))))


class DigitsNet(nn.Module):
    """N x 1 x 8 x 8 images in [0, 1] → N x 10 logits (about 42 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 16),
            _conv_bn_relu(16, 32),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            ResidualBlock(32),
            _conv_bn_relu(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


@dataclass
class DigitsSplit:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor


def load_split(recipe: TrainingRecipe) -> DigitsSplit:
    """The digits, as float N x 1 x 8 x 8 in [0, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(recipe.split_seed))
    held_out, train = order[: recipe.num_evaluation], order[recipe.num_evaluation :]
    return DigitsSplit(images[train], labels[train], images[held_out], labels[held_out])


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, single-threaded, deterministic kernels; restores the caller's settings."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_rng_state(rng_state)


def train(recipe: TrainingRecipe, split: DigitsSplit) -> DigitsNet:
    """AdamW with a one-cycle schedule and random ±1 pixel shifts, in eval mode at the end."""
    with _deterministic(recipe.seed):
        model = DigitsNet()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        steps_per_epoch = -(-len(split.train_labels) // recipe.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, recipe.learning_rate, total_steps=recipe.epochs * steps_per_epoch
        )
        model.train()
        for _ in range(recipe.epochs):
            for indices in torch.randperm(len(split.train_labels)).split(recipe.batch_size):
                images = _random_shift(split.train_images[indices])
                loss = F.cross_entropy(model(images), split.train_labels[indices])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def _random_shift(images: torch.Tensor) -> torch.Tensor:
    """Each image moved by up to one pixel in x and y (zero fill), from the global generator."""
    count, size = images.shape[0], images.shape[-1]
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (2, count, 1))
    rows = (offsets[0] + torch.arange(size))[:, :, None]
    cols = (offsets[1] + torch.arange(size))[:, None, :]
    return padded[torch.arange(count)[:, None, None], 0, rows, cols].unsqueeze(1)


def weights_path(recipe: TrainingRecipe) -> Path:
    return cache_dir() / f"digits-cnn-{recipe.key()}.safetensors"


def trained_model(recipe: TrainingRecipe) -> DigitsNet:
    """The trained model: from the cache when this recipe was trained before, else trained now."""
    path = weights_path(recipe)
    model = DigitsNet()
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model.eval()
    model = train(recipe, load_split(recipe))
    partial = path.with_suffix(f".{os.getpid()}.partial")
    # contiguous(): safetensors refuses views; the rename makes concurrent trainings safe.
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, partial, metadata={"recipe": json.dumps(asdict(recipe), sort_keys=True)})
    partial.replace(path)
    return model


def top1_metrics(
    outputs: torch.Tensor, reference_outputs: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """``top1`` (percent correct), ``top1_agreement`` (percent with the reference's class) and
    ``output_cosine`` (mean cosine of each sample's logits with the reference's)."""
    predicted = outputs.argmax(dim=1)
    return {
        "top1": 100.0 * (predicted == labels).double().mean().item(),
        "top1_agreement": 100.0
        * (predicted == reference_outputs.argmax(dim=1)).double().mean().item(),
        "output_cosine": F.cosine_similarity(outputs.float(), reference_outputs.float(), dim=1)
        .mean()
        .item(),
    }


class DigitsCNN(ZooEntry):
    """A ~42 k-parameter residual CNN on scikit-learn's 8x8 digits, trained by qpp."""

    name = "digits-cnn"
    summary = "small residual CNN on sklearn's 8x8 digits (trained once, cached); top-1 accuracy"
    primary_metric = "top1"
    higher_is_better = True

    def __init__(
        self,
        num_calibration: int = 128,
        batch_size: int = 64,
        recipe: TrainingRecipe | None = None,
    ) -> None:
        self.num_calibration = num_calibration
        self.batch_size = batch_size
        self.recipe = recipe or TrainingRecipe()

    def load_model(self) -> torch.nn.Module:
        return trained_model(self.recipe)

    def calibration_set(self) -> list[Batch]:
        images = load_split(self.recipe).train_images[: self.num_calibration]
        return [(chunk,) for chunk in images.split(self.batch_size)]

    def evaluation_set(self) -> EvaluationSet:
        split = load_split(self.recipe)
        return EvaluationSet(
            batches=[(chunk,) for chunk in split.eval_images.split(self.batch_size)],
            targets=split.eval_labels,
            input_names=["images"],
        )

    def metrics(
        self, outputs: torch.Tensor, reference_outputs: torch.Tensor, evaluation: EvaluationSet
    ) -> dict[str, float]:
        return top1_metrics(outputs, reference_outputs, evaluation.targets)
