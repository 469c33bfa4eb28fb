"""The paper's toy model of weight oscillations (PAPER.md section 2): linear regression on a fixed rounding grid.

`f(x) = q(w) . x` with `q(w) = round(w)` (levels ..., 0, 1, ...; the grid is fixed: with one weight a max-magnitude
scale would make every weight its own level). Gradient descent with the straight-through estimator (QAT) makes `w`
oscillate around the threshold 0.5 so that the time-average of `q(w)` approaches the full-precision optimum. The
oscillation regularizer gives the same dynamics from the full-precision loss when its weight per coordinate is
`E[x_i^2] / 2` and the inputs are uncorrelated (`E[x x^T] = I` below, so `osc_lambda = 0.5`).
"""

from __future__ import annotations

import torch

from ..errors import OscqValueError

# Inputs with E[x x^T] = I: the QAT gradient and the regularized gradient are then identical (PAPER.md section 2).
TOY_INPUTS = {1: torch.tensor([[1.0]]), 2: torch.tensor([[1.0, 1.0], [1.0, -1.0]])}


def _round_ste(w: torch.Tensor) -> torch.Tensor:
    return w + (torch.round(w) - w).detach()


def toy_trajectory(
    optimum: tuple[float, ...] = (0.75,),
    start: tuple[float, ...] | None = None,
    method: str = "qat",
    steps: int = 400,
    learning_rate: float = 0.05,
    osc_lambda: float = 0.5,
) -> torch.Tensor:
    """Gradient descent on the toy model; returns the latent weights after every step.

    Args:
        optimum: the full-precision optimum `w*` (targets are `y = x . w*`); one or two weights.
        start: initial weights (default: all 0.2).
        method: "qat" (loss on `q(w) . x`, STE), "oscillation" (full-precision loss + `osc_lambda` x
            `sum(q(w)^2 - w^2)`, STE) or "fp" (full-precision loss only).
        steps: number of steps.
        learning_rate: step size of plain gradient descent.
        osc_lambda: weight of the regularizer; 0.5 reproduces QAT exactly here.

    Returns:
        A float64 tensor `(steps + 1, n_weights)`, the initial weights first.
    """
    if len(optimum) not in TOY_INPUTS:
        raise OscqValueError(f"The toy model has one or two weights, got optimum={optimum!r}.")
    if method not in ("qat", "oscillation", "fp"):
        raise OscqValueError(f"method must be 'qat', 'oscillation' or 'fp', got {method!r}.")
    inputs = TOY_INPUTS[len(optimum)].double()
    targets = inputs @ torch.tensor(optimum, dtype=torch.float64)
    weight = torch.tensor(start if start is not None else [0.2] * len(optimum), dtype=torch.float64)
    weight.requires_grad_(True)
    history = [weight.detach().clone()]
    for _ in range(steps):
        used = _round_ste(weight) if method == "qat" else weight
        loss = 0.5 * (targets - inputs @ used).square().mean()
        if method == "oscillation":
            loss = loss + osc_lambda * (_round_ste(weight).square() - weight.square()).sum()
        (gradient,) = torch.autograd.grad(loss, weight)
        with torch.no_grad():
            weight -= learning_rate * gradient
        history.append(weight.detach().clone())
    return torch.stack(history)
