"""AdaRound's hand-written gradient (eqs. 22-25) matches autograd on the same loss."""

import pytest
import torch

from qpp.graph.patterns import Activation
from qpp.ptq.adaround import rectified_sigmoid, rounding_regularizer
from qpp.ptq.adaround_solver import (
    Adam,
    RoundingProblem,
    gram_gradient,
    rows_gradient,
    solve,
    use_gram,
)

ACTIVATIONS = {
    "none": None,
    "relu": Activation("relu"),
    "relu6": Activation("clamp", 0.0, 6.0),
    "hardswish": Activation("hardswish"),
    "swish": Activation("swish", slope=1.5),
    "affine": Activation("identity", scale=torch.rand(8) * 2 - 0.5, offset=torch.randn(8)),
    "affine-hardswish": Activation(
        "hardswish", scale=torch.rand(8) + 0.5, offset=torch.randn(8) * 2
    ),
    "affine-clamp": Activation("clamp", 0.0, 1.0, scale=torch.full((8,), 0.2), offset=None),
}
#: The same functions written with torch's own ops, for autograd.
REFERENCES = {
    "none": lambda y: y,
    "relu": torch.relu,
    "relu6": lambda y: torch.nn.functional.relu6(y),
    "hardswish": torch.nn.functional.hardswish,
    "swish": lambda y: y * torch.sigmoid(1.5 * y),
    "affine": lambda y: y * ACTIVATIONS["affine"].scale + ACTIVATIONS["affine"].offset,
    "affine-hardswish": lambda y: torch.nn.functional.hardswish(
        y * ACTIVATIONS["affine-hardswish"].scale + ACTIVATIONS["affine-hardswish"].offset
    ),
    "affine-clamp": lambda y: (0.2 * y).clamp(0, 1),
}


def _problem(activation: str, groups: int, bias: bool) -> RoundingProblem:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(8, 6, generator=generator)
    step = torch.rand(8, 6, generator=generator) * 0.1
    step[0, :2] = 0  # clamped weights: constant
    logits = torch.randn(8, 6, generator=generator) * 3
    offset = torch.randn(8, generator=generator) if bias else None
    return RoundingProblem(base, step, logits, offset, groups, ACTIVATIONS[activation])


def _autograd_gradient(problem, activation, inputs, targets, beta, regularization):
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
    output = REFERENCES[activation](output)
    loss = (output - targets).pow(2).sum(1).mean()
    loss = loss + regularization * rounding_regularizer(h, beta)
    loss.backward()
    return logits.grad


@pytest.mark.parametrize(
    ("activation", "groups", "bias"),
    [
        ("relu", 1, True),
        ("none", 1, False),
        ("relu", 2, True),
        ("none", 8, True),
        ("relu6", 1, True),
        ("hardswish", 1, True),
        ("hardswish", 8, True),
        ("swish", 2, False),
        ("affine", 1, True),
        ("affine-hardswish", 1, True),
        ("affine-clamp", 8, False),
    ],
)
def test_one_step_equals_an_autograd_adam_step(activation: str, groups: int, bias: bool) -> None:
    problem = _problem(activation, groups, bias)
    inputs = torch.randn(64, 6 * groups) * 4  # outputs on every piece of the activations
    targets = torch.randn(64, 8)
    expected = _autograd_gradient(problem, activation, inputs, targets, 7.0, 0.01)
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
    problem = _problem("none", groups=1, bias=True)
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


@pytest.mark.parametrize(
    "name", ["relu", "relu6", "hardswish", "swish", "affine", "affine-hardswish", "affine-clamp"]
)
def test_activation_value_and_derivative_match_torch(name: str) -> None:
    y = torch.linspace(-8, 8, 1601, dtype=torch.float64).reshape(-1, 1).repeat(1, 8)
    y.requires_grad_(True)
    REFERENCES[name](y).sum().backward()
    activation = ACTIVATIONS[name]
    torch.testing.assert_close(activation.value(y.detach()), REFERENCES[name](y.detach()))
    torch.testing.assert_close(activation.derivative(y.detach()), y.grad)


def test_gram_gradient_with_a_channel_affine_equals_the_rows_gradient() -> None:
    problem = _problem("affine", groups=1, bias=True)
    assert use_gram(problem, 64)
    inputs = torch.randn(64, 6)
    targets = ACTIVATIONS["affine"].value(torch.randn(64, 8))
    weight = torch.randn(8, 6)
    rows = rows_gradient(problem, inputs, targets, 64, torch.Generator())(weight.clone())
    torch.testing.assert_close(gram_gradient(problem, inputs, targets)(weight), rows)
