"""AdaRound's inner loop for one layer, with the gradient of eq. 25 written out by hand.

Autograd on this tiny graph spends most of its time in bookkeeping; the gradient is short:
with ``W̃ = W₀ + s' ⊙ h(V)`` (eq. 22, where ``W₀ = s (clamp(⌊W/s⌋ + z; n, p) - z)`` and
``s' = s`` for weights whose ``⌊W/s⌋ + z + h`` stays inside ``[n, p]``, else 0) and the
rectified sigmoid ``h = clip(σ(V)(ζ - γ) + γ, 0, 1)`` (eq. 23),

    ∂L/∂V = (∂L_rec/∂W̃ ⊙ s' + λ ∂f_reg/∂h) ⊙ (ζ - γ) σ(V)(1 - σ(V)) ⊙ 1[0 < σ(V)(ζ-γ)+γ < 1]

with ``∂f_reg/∂h = -2β |2h - 1|^(β-1) sign(2h - 1)`` (eq. 24). The reconstruction term comes in
two forms that give the same loss ``L_rec = mean_rows ‖f_a(W̃ x̂ + b) - y‖²`` (eq. 25):

- **rows** (any layer): a random mini-batch of cached rows per step, one matmul forward and
  one back, ``∂L_rec/∂W̃ = (2/B) (r ⊙ f_a')ᵀ x̂`` with residual ``r``;
- **gram** (no activation folded in, one group): the loss is quadratic in ``W̃``, so with
  ``Ĥ = X̂ᵀX̂ / N`` and ``C = X̂ᵀY / N`` computed once, ``∂L_rec/∂W̃ = 2 (W̃ Ĥ - Cᵀ)`` is the
  exact gradient over *all* cached rows for one ``O×K×K`` matmul per step. It is used when that
  is cheaper than the mini-batch (``K < 2 B``).

Adam (Kingma & Ba 2015, torch's defaults β = (0.9, 0.999), ε = 1e-8) updates ``V`` in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: The rectified sigmoid's stretch (white paper eq. 23).
ZETA, GAMMA = 1.1, -0.1
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass
class RoundingProblem:
    """One layer's rounding: ``W̃ = base + step ⊙ h(V)``, flattened to ``(out, in/groups)``."""

    base: torch.Tensor
    step: torch.Tensor
    logits: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    relu: bool


class Adam:
    """Adam on one tensor, in place, without autograd."""

    def __init__(self, parameter: torch.Tensor, learning_rate: float) -> None:
        self.parameter = parameter
        self.learning_rate = learning_rate
        self.first = torch.zeros_like(parameter)
        self.second = torch.zeros_like(parameter)
        self.denominator = torch.empty_like(parameter)
        self.steps = 0

    def step(self, gradient: torch.Tensor) -> None:
        beta1, beta2 = ADAM_BETAS
        self.steps += 1
        self.first.lerp_(gradient, 1 - beta1)
        self.second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        correction2 = math.sqrt(1 - beta2**self.steps)
        torch.sqrt(self.second, out=self.denominator).div_(correction2).add_(ADAM_EPS)
        size = self.learning_rate / (1 - beta1**self.steps)
        self.parameter.addcdiv_(self.first, self.denominator, value=-size)


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``rows @ Wᵀ`` per group (a grouped conv is a block-diagonal matmul)."""
    if groups == 1:
        return rows @ weight.T
    per_group = rows.reshape(rows.shape[0], groups, -1)
    if weight.shape[0] == groups:  # depthwise: a multiply-sum is ~3x faster than einsum's bmm
        return (per_group * weight).sum(-1)
    grouped = weight.reshape(groups, weight.shape[0] // groups, -1)
    return torch.einsum("rgi,goi->rgo", per_group, grouped).reshape(rows.shape[0], -1)


def grouped_weight_gradient(
    residual: torch.Tensor, rows: torch.Tensor, groups: int, out_features: int
) -> torch.Tensor:
    """``residualᵀ @ rows`` per group: the gradient of ``rows @ Wᵀ`` with respect to ``W``."""
    if groups == 1:
        return residual.T @ rows
    per_group = rows.reshape(rows.shape[0], groups, -1)
    if out_features == groups:  # depthwise
        return (residual.unsqueeze(-1) * per_group).sum(0)
    outputs = residual.reshape(rows.shape[0], groups, -1)
    return torch.einsum("rgo,rgi->goi", outputs, per_group).reshape(out_features, -1)


def use_gram(problem: RoundingProblem, batch_rows: int) -> bool:
    """The exact full-data gradient is cheaper than a mini-batch one (see module doc)."""
    return not problem.relu and problem.groups == 1 and problem.base.shape[1] < 2 * batch_rows


def rows_gradient(
    problem: RoundingProblem,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_rows: int,
    generator: torch.Generator,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``W̃ ↦ ∂L_rec/∂W̃`` on a fresh random mini-batch of rows per call (all rows when they
    fit in one batch)."""
    count = inputs.shape[0]
    size = min(batch_rows, count)
    out_features = problem.base.shape[0]

    def gradient(weight: torch.Tensor) -> torch.Tensor:
        if count <= batch_rows:  # every row fits in one batch: the exact gradient, no draw
            rows, batch_targets = inputs, targets
        else:
            index = torch.randint(count, (size,), generator=generator)
            rows, batch_targets = inputs.index_select(0, index), targets.index_select(0, index)
        if problem.groups == 1 and problem.bias is not None:
            output = torch.addmm(problem.bias, rows, weight.T)
        else:
            output = grouped_matmul(rows, weight, problem.groups)
            if problem.bias is not None:
                output += problem.bias
        # f_a = ReLU: where W̃x̂ + b <= 0 the output is constant, so the residual carries no
        # gradient; elsewhere relu(y) - t = y - t.
        inactive = output <= 0 if problem.relu else None
        residual = output.sub_(batch_targets)
        if inactive is not None:
            residual.masked_fill_(inactive, 0)
        return grouped_weight_gradient(residual, rows, problem.groups, out_features).mul_(2 / size)

    return gradient


def gram_gradient(
    problem: RoundingProblem, inputs: torch.Tensor, targets: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``W̃ ↦ 2 (W̃ Ĥ - Cᵀ)``, exact over all rows (only for layers without an activation)."""
    count = inputs.shape[0]
    shifted = targets - problem.bias if problem.bias is not None else targets
    gram = inputs.T @ inputs / count
    cross = (shifted.T @ inputs).div_(count)

    def gradient(weight: torch.Tensor) -> torch.Tensor:
        return torch.addmm(cross, weight, gram, beta=-2.0, alpha=2.0)

    return gradient


def solve(
    problem: RoundingProblem,
    reconstruction_gradient: Callable[[torch.Tensor], torch.Tensor],
    iterations: int,
    learning_rate: float,
    regularization: float,
    beta: Callable[[int], float | None],
) -> None:
    """Adam on ``problem.logits`` for ``iterations`` steps of eq. 25's hand-written gradient."""
    logits = problem.logits
    adam = Adam(logits, learning_rate)
    sigma = torch.empty_like(logits)
    h = torch.empty_like(logits)
    weight = torch.empty_like(logits)
    slope = torch.empty_like(logits)
    centred = torch.empty_like(logits)
    for iteration in range(iterations):
        torch.sigmoid(logits, out=sigma)
        torch.mul(sigma, ZETA - GAMMA, out=h).add_(GAMMA)
        # dh/dV: (ζ - γ) σ (1 - σ) where the clip is inactive, else 0.
        torch.addcmul(sigma, sigma, sigma, value=-1, out=slope).mul_(ZETA - GAMMA)
        slope.masked_fill_((h <= 0) | (h >= 1), 0)
        h.clamp_(0, 1)
        torch.addcmul(problem.base, problem.step, h, out=weight)
        gradient = reconstruction_gradient(weight).mul_(problem.step)
        current_beta = beta(iteration)
        if current_beta is not None:
            # λ ∂/∂h Σ (1 - |2h - 1|^β) = -2λβ |2h - 1|^(β-1) sign(2h - 1)
            torch.mul(h, 2, out=centred).sub_(1)
            magnitude = centred.abs().pow_(current_beta - 1).mul_(centred.sign())
            gradient.add_(magnitude, alpha=-2 * regularization * current_beta)
        adam.step(gradient.mul_(slope))
