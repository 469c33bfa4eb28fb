"""The oscillation regularizer: `sum over layers of mean(q_b(W)^2 - W^2)` (PAPER.md section 3), through autograd.

The reference formulation; training uses `fused.fused_oscillation_penalty`, which gives the same value and
gradients at a fraction of the cost and is tested against this one.
"""

from __future__ import annotations

import torch
from torch import nn

from .primitives import check_finite, fake_quantize, scale_dtype
from .selection import select_weights
from .spec import Patterns, QuantSpec, resolve_spec


def oscillation_penalty(
    model: nn.Module,
    bits: int | None = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool | None = None,
    *,
    spec: QuantSpec | None = None,
) -> torch.Tensor:
    """The paper's regularizer on the selected weights of `model`, through autograd (the reference path).

    Per weight, its gradient is `2 / N_l * (q(w) - w)` plus the gradient through the (non-detached) scale, which
    pushes weights towards the rounding thresholds.

    Args:
        model: the model whose weights are regularized.
        bits: target bit-width in [2, 8] (shorthand for `spec`).
        target_modules: which modules, see `select_weights` (shorthand for `spec`).
        exclude_modules: modules left out, see `select_weights` (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        spec: the `QuantSpec`: how and which weights.

    Returns:
        A scalar tensor connected to the weights' autograd graph.
    """
    spec = resolve_spec("oscillation_penalty", spec, bits, per_channel, target_modules, exclude_modules)
    terms = []
    for name, weight in select_weights(model, spec=spec).items():
        check_finite(weight, name)
        weight = weight.to(scale_dtype(weight.dtype))  # half precision: the penalty of the float32 quantization
        terms.append((fake_quantize(weight, spec=spec).square() - weight.square()).mean())
    return torch.stack(terms).sum()
