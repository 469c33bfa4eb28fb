"""The oscillation regularizer: `sum over layers of mean(q_b(W)^2 - W^2)` (PAPER.md section 3), through autograd,
and its variant normalised by the number of selected weights of the whole model.

The reference formulation; training uses `fused.fused_oscillation_penalty`, which gives the same value and
gradients at a fraction of the cost and is tested against this one.

Normalizations (`PENALTY_NORMALIZATIONS`):

* `"layer_mean"`: `sum_l mean_i(q(W_l,i)^2 - W_l,i^2)`, the paper's formula. A weight of layer `l` gets the gradient
  `2 / N_l * (q - w)`: its strength depends on its layer's size (about 3,500x apart across ResNet-18's layers).
* `"global_mean"`: `sum_l sum_i(q(W_l,i)^2 - W_l,i^2) / N`, with `N` the number of selected weights of the whole model
  (all shards together under FSDP2). Every weight gets `2 / N * (q - w)`, the same strength in every layer; it equals
  the per-layer means weighted by `N_l / N`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OscqValueError
from .primitives import check_finite, fake_quantize, scale_dtype
from .selection import output_dims, select_weights
from .spec import Patterns, QuantSpec, resolve_spec

LAYER_MEAN = "layer_mean"
GLOBAL_MEAN = "global_mean"
PENALTY_NORMALIZATIONS = (LAYER_MEAN, GLOBAL_MEAN)
DEFAULT_PENALTY_NORMALIZATION = LAYER_MEAN


def validate_normalization(normalization: object) -> str:
    """Checks that `normalization` is one of `PENALTY_NORMALIZATIONS` and returns it.

    Raises:
        OscqValueError: for any other value.
    """
    if normalization not in PENALTY_NORMALIZATIONS:
        raise OscqValueError(
            f"The penalty normalization must be one of {PENALTY_NORMALIZATIONS} ('layer_mean': the paper's per-layer "
            f"mean; 'global_mean': the mean over all selected weights), got {normalization!r}."
        )
    return normalization


def penalty_divisors(numels: list[int], normalization: str) -> list[int]:
    """What each weight's sum of `q^2 - w^2` is divided by: its own size, or the size of all selected weights."""
    return list(numels) if normalization == LAYER_MEAN else [sum(numels)] * len(numels)


def oscillation_penalty(
    model: nn.Module,
    bits: int | None = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool | None = None,
    *,
    spec: QuantSpec | None = None,
    normalization: str = DEFAULT_PENALTY_NORMALIZATION,
) -> torch.Tensor:
    """The paper's regularizer on the selected weights of `model`, through autograd (the reference path).

    Per weight, its gradient is `2 / N_l * (q(w) - w)` (`"global_mean"`: `2 / N * (q(w) - w)`) plus the gradient
    through the (non-detached) scale, which pushes weights towards the rounding thresholds.

    Args:
        model: the model whose weights are regularized.
        bits: target bit-width in [2, 8] (shorthand for `spec`).
        target_modules: which modules, see `select_weights` (shorthand for `spec`).
        exclude_modules: modules left out, see `select_weights` (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        spec: the `QuantSpec`: how and which weights. Per-channel and group-wise scales follow each layer's output
            dimension (`selection.output_dim`).
        normalization: `"layer_mean"` (the paper: the sum over layers of each layer's mean) or `"global_mean"` (the
            sum over all selected weights divided by their number).

    Returns:
        A scalar tensor connected to the weights' autograd graph.

    Raises:
        OscqValueError: for an unknown normalization, or a weight holding NaN or Inf.
    """
    spec = resolve_spec("oscillation_penalty", spec, bits, per_channel, target_modules, exclude_modules)
    validate_normalization(normalization)
    weights = select_weights(model, spec=spec)
    divisors = penalty_divisors([weight.numel() for weight in weights.values()], normalization)
    terms = []
    for (name, weight), divisor, out_dim in zip(weights.items(), divisors, output_dims(model, weights)):
        check_finite(weight, name)
        weight = weight.to(scale_dtype(weight.dtype))  # half precision: the penalty of the float32 quantization
        terms.append((fake_quantize(weight, spec=spec, out_dim=out_dim).square() - weight.square()).sum() / divisor)
    return torch.stack(terms).sum()
