"""Activation calibration on token batches: padding positions do not set the ranges."""

import torch

import qpp
from qpp.ptq.activations import data_positions, real_positions
from qpp.sim.config import QuantConfig

MINMAX = QuantConfig(activation_estimator="minmax", weight_estimator="minmax")


class PaddedEncoder(torch.nn.Module):
    """Embedding then a linear; the padding token's vector is 100x the others."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(20, 8)
        self.linear = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1, 1)
            self.embedding.weight[0] = 100.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embedding(input_ids)) * attention_mask[..., None]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (6, 10), generator=generator)
    mask = torch.ones(6, 10, dtype=torch.int64)
    mask[::2, 6:] = 0
    ids[mask == 0] = 0
    return [(ids, mask)]


def _input_range(real_tokens_only: bool) -> float:
    torch.manual_seed(0)
    batches = _batches()
    qmodel = qpp.prepare(PaddedEncoder().eval(), batches[0], MINMAX)
    qpp.calibrate(qmodel, batches, real_tokens_only=real_tokens_only)
    (quantizer,) = [q for q in qmodel.select(kind="activation") if "linear" in q.name]
    _, qmax = quantizer.integer_range
    assert quantizer.observed_part is None  # the hook is removed after calibration
    return float(quantizer.scale * (qmax - quantizer.zero_point))


def test_padding_sets_the_range_only_when_observed() -> None:
    assert _input_range(real_tokens_only=False) > 90.0
    assert _input_range(real_tokens_only=True) < 1.5


def test_real_positions_select_tokens_and_keep_other_layouts() -> None:
    ids, mask = _batches()[0]
    positions = data_positions((ids, mask))
    assert positions is not None
    part = real_positions(positions)
    hidden = torch.randn(6, 10, 8)
    assert part(hidden).shape == (int(mask.sum()), 8)
    scores = torch.randn(6, 2, 10, 10)
    assert part(scores) is scores
    assert data_positions((torch.randn(6, 10),)) is None
