"""Softmax outputs compare as log-probabilities in the output error (``qpp.graph.outputs``)."""

import math

import pytest
import torch
from torch import nn

from qpp.api import quantize
from qpp.graph.outputs import PROBABILITY_FLOOR, comparable_outputs, softmax_outputs
from qpp.graph.segments import Segments
from qpp.pipeline import evaluation_output_error
from qpp.predict.estimator_choice import quantization_off, relative_output_error, suffix_error
from qpp.ptq.debug import model_outputs
from qpp.report.tables import compare_table
from qpp.sim.config import QuantConfig


class Classifier(nn.Module):
    """Logits, optionally turned into probabilities (and reshaped) or log-probabilities."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.logits = nn.Linear(32, 3)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        z = self.logits(torch.relu(self.body(x)))
        if self.head == "softmax":
            return torch.softmax(z, dim=-1).reshape(-1, 3, 1).clone()
        if self.head == "log_softmax":
            return torch.log_softmax(z, dim=-1)
        if self.head == "both":
            return torch.softmax(z, dim=-1), z
        return z


def _batches(count: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(3.0 * torch.randn(8, 16, generator=generator),) for _ in range(count)]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ("softmax", (True,)),
        ("log_softmax", (False,)),
        ("logits", (False,)),
        ("both", (True, False)),
    ],
)
def test_softmax_outputs_are_found_through_reshapes_and_quantizers(
    head: str, expected: tuple[bool, ...]
) -> None:
    torch.manual_seed(0)
    model = quantize(Classifier(head).eval(), _batches(2), QuantConfig(activation_bits=8))
    assert softmax_outputs(model.graph_module) == expected


def test_probabilities_become_their_log_and_other_outputs_stay() -> None:
    probabilities = torch.tensor([[0.5, 0.5, 0.0]])
    logits = torch.tensor([[1.0, -2.0, 3.0]])
    logs, same = comparable_outputs([probabilities, logits], [True, False])
    assert torch.equal(same, logits)
    assert logs[0, 0] == pytest.approx(math.log(0.5))
    assert logs[0, 2] == pytest.approx(math.log(PROBABILITY_FLOOR))
    # A structure that does not match the flags is compared as it is.
    assert comparable_outputs([probabilities], [True, False])[0] is probabilities


def test_the_output_error_of_a_softmax_model_is_its_log_probability_error() -> None:
    """The choices' error and the evaluation's error both read the saturated probabilities
    in log space, where a margin change on a confident input shows."""
    torch.manual_seed(0)
    batches = _batches(3)
    model = quantize(Classifier("softmax").eval(), batches, QuantConfig(activation_bits=4))
    with torch.no_grad(), quantization_off(model):
        float_probabilities = [model(*batch) for batch in batches]
    with torch.no_grad():
        probabilities = [model(*batch) for batch in batches]
    reference = [[p.log()] for p in float_probabilities]
    expected = sum(
        float((q.log() - p.log()).square().sum())
        for q, p in zip(probabilities, float_probabilities, strict=True)
    ) / sum(float(p.log().square().sum()) for p in float_probabilities)
    assert relative_output_error(model, batches, reference) == pytest.approx(expected, rel=1e-5)
    in_probability_space = sum(
        float((q - p).square().sum())
        for q, p in zip(probabilities, float_probabilities, strict=True)
    ) / sum(float(p.square().sum()) for p in float_probabilities)
    assert expected != pytest.approx(in_probability_space, rel=0.1)
    # The cut-cached runs of the per-layer sweeps compare the same way.
    segments = Segments(model.graph_module)
    cut = segments.cut_of(model.module_target(model.select(kind="activation")[-1].name))
    crossing = [segments.prefix(batch, cut) for batch in batches]
    assert suffix_error(segments, crossing, cut, reference) == pytest.approx(expected, rel=1e-5)
    flags = softmax_outputs(model.graph_module)
    evaluated = evaluation_output_error(
        torch.cat(probabilities), torch.cat(float_probabilities), flags
    )
    assert evaluated == pytest.approx(expected, rel=1e-5)


def test_the_debugging_flow_compares_log_probabilities() -> None:
    torch.manual_seed(0)
    batches = _batches(2)
    model = quantize(Classifier("both").eval(), batches, QuantConfig(activation_bits=8))
    with torch.no_grad():
        expected = torch.cat(
            [
                t.reshape(-1)
                for batch in batches
                for t in (model(*batch)[0].clamp_min(PROBABILITY_FLOOR).log(), model(*batch)[1])
            ]
        )
    assert torch.allclose(model_outputs(model, batches), expected)


def test_the_compare_table_says_when_it_compares_log_probabilities() -> None:
    row = {"metrics": {"top1": 90.0}, "output_error": 0.01, "overhead_percent": 0.0, "seconds": 1}
    compare = {"modes": {"static": row}, "output_error_on": "log-probabilities"}
    assert "log-probabilities" in str(compare_table(compare, "top1").caption)
    assert compare_table({**compare, "output_error_on": "outputs"}, "top1").caption is None
