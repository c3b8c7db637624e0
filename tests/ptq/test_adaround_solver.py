"""AdaRound's hand-written gradient (eqs. 22-25) matches autograd on the same loss."""

import pytest
import torch

from qpp.ptq.adaround import rectified_sigmoid, rounding_regularizer
from qpp.ptq.adaround_solver import (
    Adam,
    RoundingProblem,
    gram_gradient,
    rows_gradient,
    solve,
    use_gram,
)


def _problem(relu: bool, groups: int, bias: bool) -> RoundingProblem:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(8, 6, generator=generator)
    step = torch.rand(8, 6, generator=generator) * 0.1
    step[0, :2] = 0  # clamped weights: constant
    logits = torch.randn(8, 6, generator=generator) * 3
    offset = torch.randn(8, generator=generator) if bias else None
    return RoundingProblem(base, step, logits, offset, groups, relu)


def _autograd_gradient(problem, inputs, targets, beta, regularization):
    logits = problem.logits.clone().requires_grad_(True)
    h = rectified_sigmoid(logits)
    weight = problem.base + problem.step * h
    if problem.groups == 1:
        output = inputs @ weight.T
    else:
        grouped = weight.reshape(problem.groups, -1, weight.shape[1])
        per_group = inputs.reshape(inputs.shape[0], problem.groups, -1)
        output = torch.einsum("rgi,goi->rgo", per_group, grouped).reshape(inputs.shape[0], -1)
    if problem.bias is not None:
        output = output + problem.bias
    if problem.relu:
        output = torch.relu(output)
    loss = (output - targets).pow(2).sum(1).mean()
    loss = loss + regularization * rounding_regularizer(h, beta)
    loss.backward()
    return logits.grad


@pytest.mark.parametrize(
    ("relu", "groups", "bias"),
    [(True, 1, True), (False, 1, False), (True, 2, True), (False, 8, True)],
)
def test_one_step_equals_an_autograd_adam_step(relu: bool, groups: int, bias: bool) -> None:
    problem = _problem(relu, groups, bias)
    inputs = torch.randn(64, 6 * groups)
    targets = torch.randn(64, 8)
    expected = _autograd_gradient(problem, inputs, targets, 7.0, 0.01)
    reference = problem.logits.clone().requires_grad_(True)
    reference.grad = expected
    torch.optim.Adam([reference], lr=0.05).step()

    # batch_rows = all rows: both forms see exactly these rows.
    if use_gram(problem, 64):
        gradient = gram_gradient(problem, inputs, targets)
    else:
        gradient = rows_gradient(problem, inputs, targets, 64, torch.Generator())
    with torch.no_grad():
        solve(problem, gradient, 1, 0.05, 0.01, lambda _: 7.0)
    torch.testing.assert_close(problem.logits, reference.detach(), rtol=1e-5, atol=1e-6)


def test_gram_gradient_equals_the_rows_gradient_over_all_rows() -> None:
    problem = _problem(relu=False, groups=1, bias=True)
    inputs = torch.randn(256, 6, dtype=torch.float64)
    targets = torch.randn(256, 8, dtype=torch.float64)
    problem.bias = problem.bias.double()
    weight = torch.randn(8, 6, dtype=torch.float64)
    exact = 2 * ((inputs @ weight.T + problem.bias - targets).T @ inputs) / 256
    torch.testing.assert_close(gram_gradient(problem, inputs, targets)(weight), exact)


def test_adam_matches_torch() -> None:
    parameter = torch.randn(5, 3)
    reference = parameter.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=0.01)
    adam = Adam(parameter, 0.01)
    for seed in range(5):
        gradient = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
        reference.grad = gradient.clone()
        optimizer.step()
        adam.step(gradient)
    torch.testing.assert_close(parameter, reference.detach())
