"""The oscillation regularizer: `sum over layers of mean(q_b(W)^2 - W^2)` (PAPER.md section 3)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .quantizer import (
    _by_row,
    _Groups,
    _local_groups,
    _peak_positions,
    _scaled,
    _spanning,
    check_finite,
    fake_quantize,
    max_code,
    validate_bits,
)
from .selection import Patterns, select_weights
from .sharding import LocalShard, all_reduce, local_shard


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

    def buffers(self, weight: torch.Tensor, key: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A float buffer shaped like `weight` and two boolean ones, kept under `key` (default: `id(weight)`)."""
        key = id(weight) if key is None else key
        found = self._buffers.get(key)
        if found is None or found[0].shape != weight.shape or found[0].dtype != weight.dtype:
            found = (
                torch.empty_like(weight, memory_format=torch.contiguous_format),
                torch.empty(weight.shape, dtype=torch.bool, device=weight.device),
                torch.empty(weight.shape, dtype=torch.bool, device=weight.device),
            )
            self._buffers[key] = found
        return found


def _fused_terms(w: torch.Tensor, groups: _Groups, numel: int, buffers: tuple[torch.Tensor, ...]):
    """One weight's local penalty sums and `w - q(w)` (in a workspace buffer).

    With `d = q(w) - w`: `sum(q^2 - w^2) = 2 sum(w d) + sum(d^2)`; `dP/dw = 2/N d` (straight-through); and through the
    scale, `dP/ds = 2/N sum(q d) / s = 2/N (sum(w d) + sum(d^2)) / s`, reaching the largest-magnitude element(s) of
    each scale group as `sign(w) / top` (split evenly among ties, like `torch.amax`). The buffer holds `-d` (one pass
    fewer); the backward pass applies the factor `-2/N` together with the upstream gradient.

    Returns:
        `(value, scale_sums, negative_diff)`: this part's share of the penalty, `sum(w d) + sum(d^2)` per group, and
        the buffer.
    """
    negative_diff = buffers[0]
    codes = torch.div(w, groups.divisor, out=negative_diff).round_()
    if isinstance(groups.divisor, float):
        torch.sub(w, codes, alpha=groups.divisor, out=negative_diff)
    else:
        torch.addcmul(w, codes, groups.divisor, value=-1, out=negative_diff)
    if groups.block_extremes is not None:
        w_d = -torch.dot(w.reshape(-1), negative_diff.reshape(-1)).reshape(1)
        d_d = torch.dot(negative_diff.reshape(-1), negative_diff.reshape(-1)).reshape(1)
    else:
        rows_w, rows_d = _by_row(w, groups.rows), _by_row(negative_diff, groups.rows)
        w_d = -torch.einsum("ij,ij->i", rows_w, rows_d)
        d_d = torch.einsum("ij,ij->i", rows_d, rows_d)
    return (2 * w_d.sum() + d_d.sum()) / numel, w_d + d_d, negative_diff


class _FusedPenalty(torch.autograd.Function):
    """The penalty and its exact gradient in a few in-place passes per weight, without an autograd graph.

    Weights sharded by FSDP2 arrive as their local rows: the peaks, the penalty and the sums behind the scale
    gradient are reduced across the shards (a few collectives for all weights together), and each process returns
    the gradient of the whole penalty for its rows.
    """

    @staticmethod
    def forward(
        ctx,
        bits: int,
        per_channel: bool,
        workspace: PenaltyWorkspace,
        keys: list[int],
        shards: list[LocalShard],
        *weights: torch.Tensor,
    ):
        top = max_code(bits)
        local = [weight.detach() for weight in weights]
        spanning = [_spanning(shard, per_channel) for shard in shards]
        groups = [_local_groups(w, per_channel) for w in local]
        peaks = all_reduce([group.peak for group in groups], spanning, "max")
        groups = [_scaled(group, peak, top) for group, peak in zip(groups, peaks)]
        values, sums, diffs, peak_positions = [], [], [], []
        for w, key, group, shard in zip(local, keys, groups, shards):
            buffers = workspace.buffers(w, key)
            value, scale_sums, diff = _fused_terms(w, group, shard.numel, buffers)
            index, row, ties = _peak_positions(w, group, buffers[1:])
            values.append(value)
            sums.append(scale_sums)
            diffs.append(diff)
            peak_positions.append((index, row, ties))
        values = all_reduce([value.reshape(1) for value in values], [shard.groups for shard in shards], "sum")
        sums = all_reduce(sums, spanning, "sum")
        ties = all_reduce([positions[2] for positions in peak_positions], spanning, "sum")
        ctx.terms = []
        for w, group, shard, diff, scale_sums, (index, row, _), count in zip(
            local, groups, shards, diffs, sums, peak_positions, ties
        ):
            scale_grad = torch.sign(w.reshape(-1)[index]) * (
                scale_sums / (group.scale * top * count.clamp_min(1))
            )[row].to(w.dtype)
            ctx.terms.append((diff, index, -scale_grad, shard.numel))
        workspace.generation += 1
        ctx.workspace, ctx.generation = workspace, workspace.generation
        dtype = torch.promote_types(torch.float32, weights[0].dtype)
        return torch.stack([value.to(dtype) for value in values]).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.workspace.generation != ctx.generation:
            raise RuntimeError(
                "The oscillation penalty was computed again with the same PenaltyWorkspace before the previous "
                "one was backpropagated; use one workspace per pending penalty."
            )
        grads = []
        for negative_diff, idx, negative_scale_grad, numel in ctx.terms:
            negative_diff.reshape(-1).index_add_(0, idx, negative_scale_grad)
            grads.append(negative_diff.mul_(grad_output * (-2.0 / numel)))
        del ctx.terms
        return (None, None, None, None, None, *grads)


def fused_oscillation_penalty(
    weights: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
    bits: int,
    per_channel: bool = False,
    workspace: PenaltyWorkspace | None = None,
) -> torch.Tensor:
    """Same value and gradients as `oscillation_penalty`, for weights already selected, at training speed.

    The gradient is computed during the forward call (no autograd graph through the quantizer) and handed to
    autograd in the backward pass, so it composes with DDP, FSDP2, gradient accumulation and mixed precision.
    Weights sharded by FSDP2 (`DTensor`s) are handled shard by shard, with the scale and the sums reduced across
    processes: every process gets the penalty of the whole model, and its rows' gradient of it.

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
    shards = [local_shard(weight) for weight in named.values()]
    tensors = [shard.local for shard in shards]
    with torch.autocast(tensors[0].device.type, enabled=False):
        keys = [id(weight) for weight in named.values()]  # FSDP2 hands out a new local view at every step
        value = _FusedPenalty.apply(bits, per_channel, workspace or PenaltyWorkspace(), keys, shards, *tensors)
    if not bool(torch.isfinite(value)):
        for name, weight in named.items():
            check_finite(weight, name)
    return value
