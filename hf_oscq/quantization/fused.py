"""Fused kernels: `fake_quantize` and the oscillation penalty with their exact gradients, computed in a few in-place
passes per weight instead of through an autograd graph. Training uses these; `primitives.fake_quantize` and
`penalty.oscillation_penalty` are the references they are tested against (same values, same gradients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ..errors import OscqValueError
from .layout import resolve_out_dim
from .penalty import DEFAULT_PENALTY_NORMALIZATION, penalty_divisors, validate_normalization
from .primitives import check_finite, scale_dtype
from .scale_groups import (
    ScaleGroups,
    as_group_rows,
    by_row,
    from_group_rows,
    local_groups,
    peak_positions,
    scale_groups,
    with_peaks,
)
from .sharding import LocalShard, all_reduce, check_shard_layout, local_shard, scale_process_groups
from .spec import QuantSpec, resolve_spec


class _FusedFakeQuantize(torch.autograd.Function):
    """`fake_quantize` in a few passes, with the same value and gradient (STE plus the scale path)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, spec: QuantSpec, out_dim: int) -> torch.Tensor:
        # A copy for half-precision weights, or output channels not in dim 0, only.
        w = as_group_rows(weight.detach().to(scale_dtype(weight.dtype)), spec, out_dim)
        groups = scale_groups(w, spec)
        quantized = torch.div(w, groups.divisor).round_().mul_(groups.divisor)
        ctx.save_for_backward(w, quantized)
        ctx.top, ctx.groups, ctx.peaks = spec.max_code, groups, peak_positions(w, groups)
        ctx.spec, ctx.out_dim, ctx.shape = spec, out_dim, weight.shape
        return from_group_rows(quantized, weight.shape, spec, out_dim).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        w, quantized = ctx.saved_tensors
        groups, (index, group, ties) = ctx.groups, ctx.peaks
        # dq/ds = round(w/s) - w/s = (q - w) / s, so dL/ds = sum(g q - g w) / s per group; ds/dw = sign(w) / top.
        grad = as_group_rows(grad_output, ctx.spec, ctx.out_dim).clone(memory_format=torch.contiguous_format)
        g = grad.to(w.dtype).reshape(groups.rows, -1)
        dl_ds = (
            torch.einsum("ij,ij->i", g, quantized.reshape(groups.rows, -1))
            - torch.einsum("ij,ij->i", g, w.reshape(groups.rows, -1))
        ) / groups.scale
        scatter = (torch.sign(w.reshape(-1)[index]) * (dl_ds / (ctx.top * ties.clamp_min(1)))[group]).to(grad.dtype)
        grad.reshape(-1).index_add_(0, index, scatter)
        return from_group_rows(grad, ctx.shape, ctx.spec, ctx.out_dim), None, None


def fused_fake_quantize(
    weight: torch.Tensor,
    bits: int | None = None,
    per_channel: bool | None = None,
    *,
    spec: QuantSpec | None = None,
    out_dim: int | None = None,
) -> torch.Tensor:
    """Same value and gradient as `fake_quantize`, computed without an autograd graph through the quantizer.

    QAT uses it in every forward pass; `fake_quantize` stays the plain autograd formulation it is checked against.

    Args: as `fake_quantize` (`bits` / `per_channel` are shorthand for `spec`; `out_dim` is the output-channel
    dimension, needed where it matters).
    """
    spec = resolve_spec("fused_fake_quantize", spec, bits, per_channel)
    return _FusedFakeQuantize.apply(weight, spec, resolve_out_dim("fused_fake_quantize", weight.shape, spec, out_dim))


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


def _penalty_terms(w: torch.Tensor, groups: ScaleGroups, numel: int, buffers: tuple[torch.Tensor, ...]):
    """One weight's local penalty sums and `w - q(w)` (in a workspace buffer).

    With `d = q(w) - w` and `N` the divisor (`numel`: the layer's size, or all selected weights' for "global_mean"):
    `sum(q^2 - w^2) = 2 sum(w d) + sum(d^2)`; `dP/dw = 2/N d` (straight-through); and through the scale,
    `dP/ds = 2/N sum(q d) / s = 2/N (sum(w d) + sum(d^2)) / s`, reaching the largest-magnitude element(s) of each scale
    group as `sign(w) / top` (split evenly among ties, like `torch.amax`). The buffer holds `-d` (one pass fewer); the
    backward pass applies the factor `-2/N` together with the upstream gradient.

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
        rows_w, rows_d = by_row(w, groups.rows), by_row(negative_diff, groups.rows)
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
        spec: QuantSpec,
        normalization: str,
        workspace: PenaltyWorkspace,
        keys: list[int],
        shards: list[LocalShard],
        out_dims: list[int],
        *weights: torch.Tensor,
    ):
        top = spec.max_code
        # Half-precision weights are quantized in float32 (`scale_dtype`), as everywhere else in hf_oscq; per channel
        # and group-wise, each weight is seen as the matrix of its scale groups (`as_group_rows`).
        local = [
            as_group_rows(weight.detach().to(scale_dtype(weight.dtype)), spec, out_dim)
            for weight, out_dim in zip(weights, out_dims)
        ]
        spanning = [scale_process_groups(shard, spec) for shard in shards]
        groups = [local_groups(w, spec) for w in local]
        peaks = all_reduce([group.peak for group in groups], spanning, "max")
        groups = [with_peaks(group, peak, top) for group, peak in zip(groups, peaks)]
        # shard.numel is the whole tensor's size on every process, so the divisors are the whole model's too.
        divisors = penalty_divisors([shard.numel for shard in shards], normalization)
        values, sums, diffs, positions = [], [], [], []
        for w, key, group, divisor in zip(local, keys, groups, divisors):
            buffers = workspace.buffers(w, key)
            value, scale_sums, diff = _penalty_terms(w, group, divisor, buffers)
            values.append(value)
            sums.append(scale_sums)
            diffs.append(diff)
            positions.append(peak_positions(w, group, buffers[1:]))
        values = all_reduce([value.reshape(1) for value in values], [shard.groups for shard in shards], "sum")
        sums = all_reduce(sums, spanning, "sum")
        ties = all_reduce([position[2] for position in positions], spanning, "sum")
        ctx.terms = []
        for w, group, divisor, diff, scale_sums, (index, row, _), count in zip(
            local, groups, divisors, diffs, sums, positions, ties
        ):
            scale_grad = torch.sign(w.reshape(-1)[index]) * (scale_sums / (group.scale * top * count.clamp_min(1)))[
                row
            ].to(w.dtype)
            ctx.terms.append((diff, index, -scale_grad, divisor))
        workspace.generation += 1
        ctx.workspace, ctx.generation = workspace, workspace.generation
        ctx.dtypes = [weight.dtype for weight in weights]
        ctx.layouts = [(weight.shape, out_dim) for weight, out_dim in zip(weights, out_dims)]
        ctx.spec = spec
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
        for (negative_diff, idx, negative_scale_grad, divisor), dtype, (shape, out_dim) in zip(
            ctx.terms, ctx.dtypes, ctx.layouts
        ):
            negative_diff.reshape(-1).index_add_(0, idx, negative_scale_grad)
            grad = negative_diff.mul_(grad_output * (-2.0 / divisor)).to(dtype)
            grads.append(from_group_rows(grad, shape, ctx.spec, out_dim))
        del ctx.terms
        return (None, None, None, None, None, None, *grads)


def fused_oscillation_penalty(
    weights: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
    bits: int | None = None,
    per_channel: bool | None = None,
    workspace: PenaltyWorkspace | None = None,
    *,
    spec: QuantSpec | None = None,
    normalization: str = DEFAULT_PENALTY_NORMALIZATION,
    out_dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """Same value and gradients as `oscillation_penalty`, for weights already selected, at training speed.

    The gradient is computed during the forward call (no autograd graph through the quantizer) and handed to
    autograd in the backward pass, so it composes with DDP, FSDP2, gradient accumulation and mixed precision.
    Weights sharded by FSDP2 (`DTensor`s) are handled shard by shard, with the scale and the sums reduced across
    processes: every process gets the penalty of the whole model, and its rows' gradient of it.

    Args:
        weights: the selected weights (a name -> parameter mapping as returned by `select_weights`, or tensors).
        bits: target bit-width in [2, 8] (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        workspace: scratch buffers reused across calls (a training loop keeps one); a fresh one by default.
        spec: the `QuantSpec` (its modules are not used: the weights are already selected).
        normalization: `"layer_mean"` or `"global_mean"`, as in `oscillation_penalty`. With `"global_mean"` the
            divisor is the size of all `weights` together (whole tensors, also when sharded): pass every selected
            weight of the model in one call.
        out_dims: each weight's output-channel dimension, in order (`selection.output_dims(model, weights)`: 1 for
            GPT-2's `Conv1D`). Per-channel and group-wise scales follow it, so those need it for weights of 2 or
            more dimensions (`layout.resolve_out_dim`).

    Returns:
        A scalar float32 tensor whose backward adds the penalty's gradient to the weights.

    Raises:
        OscqValueError: when no weight is given, a weight holds NaN or Inf (named when a mapping is given), the
            normalization is unknown, or `group_size` does not divide a weight's input features.
    """
    spec = resolve_spec("fused_oscillation_penalty", spec, bits, per_channel)
    validate_normalization(normalization)
    named = dict(weights) if isinstance(weights, Mapping) else {str(i): w for i, w in enumerate(weights)}
    if not named:
        raise OscqValueError("fused_oscillation_penalty got no weights: select some with select_weights(model).")
    out_dims = list(out_dims) if out_dims is not None else [None] * len(named)
    if len(out_dims) != len(named):
        raise OscqValueError(f"fused_oscillation_penalty got {len(named)} weights but {len(out_dims)} out_dims.")
    out_dims = [
        resolve_out_dim("fused_oscillation_penalty", weight.shape, spec, out_dim)
        for weight, out_dim in zip(named.values(), out_dims)
    ]
    shards = [local_shard(weight) for weight in named.values()]
    for name, shard, out_dim in zip(named, shards, out_dims):
        check_shard_layout(shard, spec, out_dim, name)
    tensors = [shard.local for shard in shards]
    with torch.autocast(tensors[0].device.type, enabled=False):
        keys = [id(weight) for weight in named.values()]  # FSDP2 hands out a new local view at every step
        value = _FusedPenalty.apply(
            spec, normalization, workspace or PenaltyWorkspace(), keys, shards, out_dims, *tensors
        )
    if not bool(torch.isfinite(value)):
        for name, weight in named.items():
            check_finite(weight, name)
    return value
