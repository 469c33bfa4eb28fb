"""KURE, the kurtosis regularizer of Shkolnik et al., "Robust Quantization: One Model to Rule Them All" (NeurIPS 2020,
code `moranshkolnik/RobustQuantization`, class `KurtosisWeight`): `mean over layers of (Kurt(W_l) - K_T)^2`, with
`Kurt` the kurtosis of a layer's weights and `K_T = 1.8`, the kurtosis of a uniform distribution. Uniform weights
lose the least to a change of step size or bit-width, which is the robustness it promises.

The moments are population moments (divided by the number of weights `N`); the reference code divides its standard
deviation by `N - 1` (`torch.std`), which moves a layer's kurtosis by a factor `((N-1)/N)^2`, below 0.01 % for every
layer of ResNet-18. The gradient is exact: with `d = w - mean(w)` and `m_k = mean(d^k)`,
`dKurt/dw_i = 4 / N * ((d_i^3 - m_3) / m_2^2 - m_4 / m_2^3 * d_i)`.

Weights sharded by FSDP2 are handled like the oscillation penalty's: the sums behind the moments are reduced across
the shards, every process gets the penalty of the whole model, and its rows' gradient of it. Tensor functions only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import OscqValueError
from .selection import select_weights
from .sharding import LocalShard, all_reduce, local_shard
from .spec import Patterns, QuantSpec

# The kurtosis of a uniform distribution, KURE's target.
UNIFORM_KURTOSIS = 1.8


def validate_kurtosis_target(target: object) -> float:
    """Checks that `target` is a finite number >= 1 (no distribution has a kurtosis below 1) and returns it.

    Raises:
        OscqValueError: for any other value.
    """
    if isinstance(target, bool) or not isinstance(target, int | float) or not math.isfinite(target) or target < 1:
        raise OscqValueError(
            f"The kurtosis target must be a finite number >= 1 (1.8: a uniform distribution, KURE's; 3: a normal "
            f"one), got {target!r}."
        )
    return float(target)


class _Kurtosis(torch.autograd.Function):
    """The kurtosis of each weight (population moments) and its exact gradient, computed in two passes per weight
    (mean, then the centered sums of powers 2, 3 and 4) with float64 sums, the sums reduced across shards."""

    @staticmethod
    def forward(ctx, shards: list[LocalShard], *weights: torch.Tensor) -> torch.Tensor:
        flat = [weight.detach().reshape(-1).float() for weight in weights]
        groups = [shard.groups for shard in shards]
        numels = torch.tensor([shard.numel for shard in shards], dtype=torch.float64, device=flat[0].device)
        sums = all_reduce([w.sum(dtype=torch.float64).reshape(1) for w in flat], groups, "sum")
        means = [total / numel for total, numel in zip(sums, numels)]
        powers = []
        for w, mean in zip(flat, means):
            d = w - mean.float()
            d2 = d * d
            powers.append(
                torch.stack(
                    [
                        d2.sum(dtype=torch.float64),
                        (d2 * d).sum(dtype=torch.float64),
                        (d2 * d2).sum(dtype=torch.float64),
                    ]
                )
            )
        powers = all_reduce(powers, groups, "sum")
        moments = torch.stack(powers) / numels[:, None]  # (layers, 3): m2, m3, m4
        m2, m4 = moments[:, 0], moments[:, 2]
        defined = m2 > 0
        kurtosis = torch.where(defined, m4 / torch.where(defined, m2, 1.0).square(), torch.nan)
        ctx.save_for_backward(*weights)
        ctx.means, ctx.moments, ctx.numels = means, moments, numels
        return kurtosis.to(torch.promote_types(weights[0].dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = []
        for index, weight in enumerate(ctx.saved_tensors):
            m2, m3, m4 = (float(value) for value in ctx.moments[index])
            upstream = float(grad_output[index])
            if m2 <= 0 or upstream == 0:  # no kurtosis (constant weights), or no gradient asked of it
                grads.append(torch.zeros_like(weight))
                continue
            numel = float(ctx.numels[index])
            d = weight.detach().float() - ctx.means[index].float()
            # 4/N ((d^3 - m3) / m2^2 - m4 / m2^3 d), times the upstream gradient
            scale = 4.0 * upstream / numel
            grad = (d * d - m4 / m2).mul_(d).sub_(m3).mul_(scale / (m2 * m2))
            grads.append(grad.to(weight.dtype))
        return (None, *grads)


def weight_kurtosis(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The kurtosis `mean(d^4) / mean(d^2)^2` (`d = w - mean(w)`, population moments) of each weight, differentiable.

    Args:
        weights: name -> weight (whole tensors or FSDP2 `DTensor`s, whose moments cover the whole tensor).

    Returns:
        A float32 tensor `(len(weights),)` (float64 for float64 weights); NaN for a weight whose elements are all
        equal, which has no kurtosis.

    Raises:
        OscqValueError: when no weight is given.
    """
    if not weights:
        raise OscqValueError("weight_kurtosis got no weights: select some with select_weights(model).")
    shards = [local_shard(weight) for weight in weights.values()]
    return _Kurtosis.apply(shards, *[shard.local for shard in shards])


def weights_kurtosis_penalty(weights: Mapping[str, torch.Tensor], target: float = UNIFORM_KURTOSIS) -> torch.Tensor:
    """KURE's penalty of weights already selected: `mean over weights of (Kurt(W_l) - target)^2`.

    A weight whose elements are all equal has no kurtosis: it counts as 0 in the mean and gets no gradient.

    Args:
        weights: name -> weight, as `select_weights` returns them (FSDP2 `DTensor`s included).
        target: the kurtosis the weights are pulled to (`UNIFORM_KURTOSIS`, 1.8, by default).

    Returns:
        A scalar tensor (float32, float64 for float64 weights).
    """
    target = validate_kurtosis_target(target)
    kurtosis = weight_kurtosis(weights)
    defined = torch.isfinite(kurtosis)
    return (torch.where(defined, kurtosis, target) - target).square().mean()


def kurtosis_penalty(
    model: nn.Module,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    *,
    spec: QuantSpec | None = None,
    target: float = UNIFORM_KURTOSIS,
) -> torch.Tensor:
    """KURE's penalty (Shkolnik et al. 2020): `mean over the selected layers of (Kurt(W_l) - target)^2`.

    `Kurt(W_l) = mean(d^4) / mean(d^2)^2` with `d = W_l - mean(W_l)`, population moments (the reference code's
    standard deviation divides by `N - 1`); the gradient is exact. Weights sharded by FSDP2 give the penalty of the
    whole tensors on every process, and each process the gradient of its rows.

    Args:
        model: the model whose weights are regularized.
        target_modules: which modules, see `select_weights` (shorthand for `spec`).
        exclude_modules: modules left out, see `select_weights` (shorthand for `spec`).
        spec: a `QuantSpec` whose modules select the weights (its bit-width and granularity are not used: the
            penalty does not depend on them).
        target: the target kurtosis, 1.8 (a uniform distribution) by default.

    Returns:
        A scalar tensor connected to the weights' autograd graph.

    Raises:
        OscqValueError: for a target below 1 or not finite, or when nothing is selected.

    Example:
        ```python
        loss = task_loss + 1.0 * hf_oscq.kurtosis_penalty(model)
        ```
    """
    if spec is not None:
        if target_modules is not None or exclude_modules is not None:
            raise TypeError("kurtosis_penalty: pass spec=QuantSpec(...) or target_modules/exclude_modules, not both.")
        target_modules, exclude_modules = spec.target_modules, spec.exclude_modules
    return weights_kurtosis_penalty(select_weights(model, target_modules, exclude_modules), target)
