"""Oscillation dampening, Nagel et al., "Overcoming Oscillations in Quantization-Aware Training" (ICML 2022, code
`Qualcomm-AI-research/oscillations-qat`, `utils/qat_utils.py` `dampening_loss`): `sum over layers of
mean((q(W_l).detach() - W_l)^2)`, added to the QAT loss.

With the grid point `q(w)` detached, a weight's gradient is `2 / N_l * (w - q(w))`: it pulls each weight towards its
grid point, the opposite of the oscillation regularizer's `2 / N_l * (q(w) - w)` (PAPER.md section 3), which pushes
weights towards the rounding thresholds. Differences from the reference code: its quantizer learns its range (LSQ)
and clips the weights to it before the difference, while hf_oscq's max-magnitude scale covers every weight, so the
clip does nothing here; and it aggregates each layer with `kernel_mean` (the sum over output channels of the mean
over the rest) by default, where this is the mean over the whole layer, like the regularizer's `layer_mean`.

FSDP2-sharded weights: the scale is the whole tensor's and the sums are reduced across the shards, so every process
gets the penalty of the whole model and its rows' gradient. Tensor functions only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import OscqValueError
from .layout import expand_scale
from .primitives import check_finite, sharded_codes
from .selection import output_dims, select_weights
from .sharding import sum_across_shards
from .spec import Patterns, QuantSpec, resolve_spec


def weights_dampening_penalty(
    weights: Mapping[str, torch.Tensor], spec: QuantSpec, out_dims: Sequence[int] | None = None
) -> torch.Tensor:
    """The dampening penalty of weights already selected: `sum over weights of mean((q(W).detach() - W)^2)`.

    Args:
        weights: name -> weight, as `select_weights` returns them (FSDP2 `DTensor`s included).
        spec: the `QuantSpec` of the grid `q` (bit-width and granularity).
        out_dims: each weight's output-channel dimension (`selection.output_dims`); all 0 by default.

    Returns:
        A scalar float32 tensor (float64 for float64 weights) connected to the weights' autograd graph.

    Raises:
        OscqValueError: when no weight is given, or a weight holds NaN or Inf.
    """
    if not weights:
        raise OscqValueError("The dampening penalty got no weights: select some with select_weights(model).")
    out_dims = list(out_dims) if out_dims is not None else [0] * len(weights)
    terms = []
    for (shard, codes, scale), out_dim in zip(sharded_codes(list(weights.values()), spec, out_dims), out_dims):
        local = shard.local.to(scale.dtype)
        grid = codes.to(scale.dtype) * expand_scale(scale, codes.shape, out_dim)
        total = sum_across_shards((grid - local).square().sum().reshape(1), shard.groups)
        terms.append(total / shard.numel)
    value = torch.cat(terms).sum()
    if not bool(torch.isfinite(value)):
        for name, weight in weights.items():
            check_finite(weight, name)
    return value


def dampening_penalty(
    model: nn.Module,
    bits: int | None = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool | None = None,
    *,
    spec: QuantSpec | None = None,
) -> torch.Tensor:
    """Nagel et al.'s oscillation dampening term on the selected weights of `model`: `sum over layers of
    mean((q_b(W_l).detach() - W_l)^2)`, whose gradient `2 / N_l * (w - q(w))` pulls each weight towards its grid
    point (the regularizer of PAPER.md pushes it away).

    Args:
        model: the model whose weights are dampened.
        bits: bit-width of the grid in [2, 8] (shorthand for `spec`).
        target_modules: which modules, see `select_weights` (shorthand for `spec`).
        exclude_modules: modules left out, see `select_weights` (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        spec: the `QuantSpec`: the grid and which weights.

    Returns:
        A scalar tensor connected to the weights' autograd graph.

    Raises:
        OscqValueError: when nothing is selected, or a weight holds NaN or Inf.
    """
    spec = resolve_spec("dampening_penalty", spec, bits, per_channel, target_modules, exclude_modules)
    weights = select_weights(model, spec=spec)
    return weights_dampening_penalty(weights, spec, output_dims(model, weights))
