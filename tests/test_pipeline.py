"""The evaluation helpers of ``qpp.pipeline``."""

from __future__ import annotations

import pytest
import torch

from qpp.pipeline import evaluation_output_error


def test_evaluation_output_error_sums_every_output_of_a_tuple() -> None:
    """``sum ||y_q - y||^2 / sum ||y||^2`` over both outputs, not the first alone."""
    logits, boxes = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 12.0]])
    shifted = (logits + 1.0, boxes)
    expected = 2.0 / (9.0 + 16.0 + 144.0)
    assert evaluation_output_error(shifted, (logits, boxes)) == pytest.approx(expected)
    assert evaluation_output_error(logits, logits) == 0.0
    assert evaluation_output_error(torch.zeros(3), torch.zeros(3)) == 0.0  # no energy: no NaN
