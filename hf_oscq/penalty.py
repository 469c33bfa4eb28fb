"""The oscillation regularizer: `sum over layers of mean(q_b(W)^2 - W^2)` (PAPER.md section 3)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .quantizer import _groups, _peak_positions, check_finite, fake_quantize, max_code, validate_bits
from .selection import Patterns, select_weights


def oscillation_penalty(
    model: nn.Module,
    bits: int,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool = False,
) -> torch.Tensor:
    """The paper's regularizer on the selected weights of `model`, through autograd (the reference path).

    Per weight, its gradient is `2 / N_l * (q(w) - w)` plus the gradient through the (non-detached) scale, which
    pushes weights towards the rounding thresholds. Training uses `fused_oscillation_penalty`, which gives the same
    value and gradients at a fraction of the cost.

    Args:
        model: the model whose weights are regularized.
        bits: target bit-width in [2, 8].
        target_modules: which modules, see `select_weights`.
        exclude_modules: modules left out, see `select_weights`.
        per_channel: one scale per output channel.

    Returns:
        A scalar tensor connected to the weights' autograd graph.
    """
    validate_bits(bits)
    weights = select_weights(model, target_modules, exclude_modules)
    terms = []
    for name, weight in weights.items():
        check_finite(weight, name)
        terms.append((fake_quantize(weight, bits, per_channel).square() - weight.square()).mean())
    return torch.stack(terms).sum()


class PenaltyWorkspace:
    """Scratch buffers reused across training steps by `fused_oscillation_penalty`.

    Allocating weight-sized tensors every step costs more than the arithmetic on a CPU, so a trainer keeps one
    workspace. A penalty computed with a workspace must be backpropagated before the workspace is used again.
    """

    def __init__(self):
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.generation = 0

    def buffers(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A float buffer shaped like `weight` and two boolean ones."""
        found = self._buffers.get(id(weight))
        if found is None or found[0].shape != weight.shape or found[0].dtype != weight.dtype:
            found = (
                torch.empty_like(weight, memory_format=torch.contiguous_format),
                torch.empty(weight.shape, dtype=torch.bool, device=weight.device),
                torch.empty(weight.shape, dtype=torch.bool, device=weight.device),
            )
            self._buffers[id(weight)] = found
        return found


def _fused_terms(w: torch.Tensor, top: int, per_channel: bool, buffers: tuple[torch.Tensor, ...]):
    """One weight's penalty value, `w - q(w)` (in a workspace buffer) and its scale-gradient scatter.

    With `d = q(w) - w`: `sum(q^2 - w^2) = 2 sum(w d) + sum(d^2)`; `dP/dw = 2/N d` (straight-through); and through the
    scale, `dP/ds = 2/N sum(q d) / s = 2/N (sum(w d) + sum(d^2)) / s`, reaching the largest-magnitude element(s) of
    each scale group as `sign(w) / top` (split evenly among ties, like `torch.amax`). The buffer holds `-d` (one pass
    fewer); the backward pass applies the factor `-2/N` together with the upstream gradient.
    """
    negative_diff, at_peak, at_other_peak = buffers
    groups = _groups(w, top, per_channel)
    codes = torch.div(w, groups.divisor, out=negative_diff).round_()
    if isinstance(groups.divisor, float):
        torch.sub(w, codes, alpha=groups.divisor, out=negative_diff)
    else:
        torch.addcmul(w, codes, groups.divisor, value=-1, out=negative_diff)
    if groups.rows == 1:
        w_d = -torch.dot(w.reshape(-1), negative_diff.reshape(-1)).reshape(1)
        d_d = torch.dot(negative_diff.reshape(-1), negative_diff.reshape(-1)).reshape(1)
    else:
        rows_w, rows_d = w.reshape(groups.rows, -1), negative_diff.reshape(groups.rows, -1)
        w_d = -torch.einsum("ij,ij->i", rows_w, rows_d)
        d_d = torch.einsum("ij,ij->i", rows_d, rows_d)
    value = (2 * w_d.sum() + d_d.sum()) / w.numel()
    index, group, ties = _peak_positions(w, groups, (at_peak, at_other_peak))
    scale_grad = torch.sign(w.reshape(-1)[index]) * ((w_d + d_d) / (groups.scale * top * ties))[group].to(w.dtype)
    return value, negative_diff, index, -scale_grad


class _FusedPenalty(torch.autograd.Function):
    """The penalty and its exact gradient in a few in-place passes per weight, without an autograd graph."""

    @staticmethod
    def forward(ctx, bits: int, per_channel: bool, workspace: PenaltyWorkspace, *weights: torch.Tensor):
        top = max_code(bits)
        total = torch.zeros((), dtype=torch.promote_types(torch.float32, weights[0].dtype), device=weights[0].device)
        ctx.terms = []
        for weight in weights:
            w = weight.detach()
            value, diff, idx, scale_grad = _fused_terms(w, top, per_channel, workspace.buffers(weight))
            total += value
            ctx.terms.append((diff, idx, scale_grad))
        workspace.generation += 1
        ctx.workspace, ctx.generation = workspace, workspace.generation
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.workspace.generation != ctx.generation:
            raise RuntimeError(
                "The oscillation penalty was computed again with the same PenaltyWorkspace before the previous "
                "one was backpropagated; use one workspace per pending penalty."
            )
        grads = []
        for negative_diff, idx, negative_scale_grad in ctx.terms:
            negative_diff.reshape(-1).index_add_(0, idx, negative_scale_grad)
            grads.append(negative_diff.mul_(grad_output * (-2.0 / negative_diff.numel())))
        del ctx.terms
        return (None, None, None, *grads)


def fused_oscillation_penalty(
    weights: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
    bits: int,
    per_channel: bool = False,
    workspace: PenaltyWorkspace | None = None,
) -> torch.Tensor:
    """Same value and gradients as `oscillation_penalty`, for weights already selected, at training speed.

    The gradient is computed during the forward call (no autograd graph through the quantizer) and handed to
    autograd in the backward pass, so it composes with DDP, gradient accumulation and mixed precision.

    Args:
        weights: the selected weights (a name -> parameter mapping as returned by `select_weights`, or tensors).
        bits: target bit-width in [2, 8].
        per_channel: one scale per output channel.
        workspace: scratch buffers reused across calls (a training loop keeps one); a fresh one by default.

    Returns:
        A scalar float32 tensor whose backward adds the penalty's gradient to the weights.

    Raises:
        ValueError: when a weight holds NaN or Inf (named when a mapping is given).
    """
    bits = validate_bits(bits)
    named = dict(weights) if isinstance(weights, Mapping) else {str(i): w for i, w in enumerate(weights)}
    if not named:
        raise ValueError("fused_oscillation_penalty got no weights: select some with select_weights(model).")
    tensors = list(named.values())
    with torch.autocast(tensors[0].device.type, enabled=False):
        value = _FusedPenalty.apply(bits, per_channel, workspace or PenaltyWorkspace(), *tensors)
    if not bool(torch.isfinite(value)):
        for name, weight in named.items():
            check_finite(weight, name)
    return value
