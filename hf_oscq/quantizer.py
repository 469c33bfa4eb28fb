"""The paper's weight quantizer: symmetric, uniform, max-magnitude scale, round-half-to-even.

Pure tensor functions, no modules. Everything else in hf_oscq (penalty, QAT, PTQ, export) quantizes through
this file, so "how to quantize" is defined exactly once.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .sharding import LocalShard, ProcessGroups, all_reduce, local_shard

MIN_BITS = 2
MAX_BITS = 8


def validate_bits(bits: object) -> int:
    """Checks that `bits` is an integer bit-width the quantizer supports and returns it as `int`.

    Raises:
        ValueError: when `bits` is not an integer in [2, 8].
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits must be an integer between {MIN_BITS} and {MAX_BITS} (2 = ternary, 8 = 255 levels), got {bits!r}."
        )
    return int(bits)


def max_code(bits: int) -> int:
    """Largest integer code at `bits` bits: codes lie in [-max_code, +max_code], i.e. 2**bits - 1 levels."""
    return 2 ** (validate_bits(bits) - 1) - 1


def compute_scale(weight: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Scale `s = max|W| / (2**(bits-1) - 1)`, differentiable through the max like the reference code.

    Args:
        weight: the tensor to quantize.
        bits: bit-width in [2, 8].
        per_channel: one scale per output channel (dim 0) instead of one per tensor.

    Returns:
        A 0-d tensor, or with `per_channel` a tensor of shape `(out, 1, ..., 1)` that broadcasts against `weight`.
    """
    if per_channel and weight.dim() > 0:
        reduce_dims = tuple(range(1, weight.dim()))
        magnitude = weight.abs().amax(dim=reduce_dims, keepdim=True) if reduce_dims else weight.abs()
    else:
        magnitude = weight.abs().amax()
    return magnitude / max_code(bits)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero tensor has scale 0; dividing by the smallest normal float keeps its codes at 0 (no NaN), and
    # clamp passes no gradient there, exactly as the unclamped formula would if it were defined.
    return scale.clamp_min(torch.finfo(scale.dtype).tiny)


class _RoundSTE(torch.autograd.Function):
    """Round-half-to-even forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


def fake_quantize(weight: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Quantizes and dequantizes `weight`: `q_b(W) = s * round(W / s)`, with the straight-through estimator.

    The scale is not detached, so the largest-magnitude element also receives gradient through `s`
    (as in the paper's reference code). The forward value equals `dequantize(*quantize_codes(weight, bits))`
    bit for bit.

    Args:
        weight: the full-precision tensor.
        bits: bit-width in [2, 8]; codes lie in [-(2**(bits-1) - 1), 2**(bits-1) - 1].
        per_channel: one scale per output channel (dim 0).

    Returns:
        A tensor of the same shape and dtype holding values on the quantization grid.
    """
    scale = _nonzero(compute_scale(weight, bits, per_channel))
    return _RoundSTE.apply(weight / scale) * scale


_SAME_SIZE_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


_BLOCK = 4096  # elements per block when searching a whole tensor for its largest magnitude


class _Groups(NamedTuple):
    """The scale groups of a weight (one per tensor, or one per output channel), in the form fast kernels want."""

    rows: int  # number of scale groups
    shape: tuple[int, ...]  # broadcast shape of a per-group value against the weight
    peak: torch.Tensor  # (rows,) largest magnitude per group
    scale: torch.Tensor  # (rows,), never zero
    divisor: torch.Tensor | float  # the scale as the fastest elementwise operand
    block_extremes: tuple[torch.Tensor, torch.Tensor] | None  # per-tensor: max and min of each _BLOCK elements


def _by_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` as a `(rows, -1)` matrix, also when a shard holds no row."""
    return t.reshape(rows, t.numel() // rows if rows else 0)


def _local_groups(w: torch.Tensor, per_channel: bool) -> _Groups:
    """The groups of `w` with the peaks of these elements only; `_scaled` completes them once peaks are final."""
    if per_channel and w.dim() > 0:
        rows, shape = w.shape[0], (w.shape[0],) + (1,) * (w.dim() - 1)
        flat = _by_row(w, rows)
        peak = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1)) if flat.shape[1] else flat.new_zeros(rows)
        return _Groups(rows, shape, peak, peak, peak, None)
    # Block-wise extremes cost one read like a global max, and later tell where the peak is without another scan.
    flat = w.reshape(-1)
    whole = flat.numel() - flat.numel() % _BLOCK
    highs, lows = [flat.new_zeros(0)], [flat.new_zeros(0)]  # a shard may hold no element at all
    for part in (flat[:whole].view(-1, _BLOCK), flat[whole:].view(1, -1)):
        if part.numel():
            highs.append(part.amax(dim=1))
            lows.append(part.amin(dim=1))
    highs, lows = torch.cat(highs), torch.cat(lows)
    peak = torch.maximum(highs.amax(), -lows.amin()).reshape(1) if highs.numel() else flat.new_zeros(1)
    return _Groups(1, (), peak, peak, peak, (highs, lows))


def _scaled(groups: _Groups, peak: torch.Tensor, top: int) -> _Groups:
    """`groups` with their final peaks (reduced across shards) and the scales they give."""
    scale = _nonzero(peak / top)
    if groups.block_extremes is None:
        return groups._replace(peak=peak, scale=scale, divisor=scale.reshape(groups.shape))
    # CPU kernels broadcast a 0-d tensor operand much slower than a Python number, and reading one back is free there.
    divisor = scale.item() if peak.device.type == "cpu" else scale[0]
    return groups._replace(peak=peak, scale=scale, divisor=divisor)


def _groups(w: torch.Tensor, top: int, per_channel: bool) -> _Groups:
    groups = _local_groups(w, per_channel)
    return _scaled(groups, groups.peak, top)


def _spanning(shard: LocalShard, per_channel: bool) -> ProcessGroups:
    """The process groups a scale group spans: all of the shard's for one scale per tensor, none per channel
    (FSDP2 splits by rows, so every output channel lies on one process)."""
    return () if per_channel else shard.groups


def _peak_positions(
    w: torch.Tensor, groups: _Groups, masks: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices of the elements with |w| == max|w| of their group, their group, and the tie count per group."""
    flat = w.reshape(-1)
    if groups.rows == 0:  # a shard without rows
        empty = torch.zeros(0, dtype=torch.long, device=w.device)
        return empty, empty, empty
    if groups.block_extremes is None:
        # Every row holds a peak: compare the whole tensor, on the bit patterns (exact, and several times faster
        # than a float compare on CPU).
        as_int, peak = w.view(_SAME_SIZE_INT[w.dtype]), groups.peak.reshape(groups.shape)
        masks = masks or (None, None)
        at_peak = torch.eq(as_int, peak.view(as_int.dtype), out=masks[0])
        at_peak.logical_or_(torch.eq(as_int, (-peak).view(as_int.dtype), out=masks[1]))
        index = torch.nonzero(at_peak.reshape(-1)).squeeze(1)
    else:
        highs, lows = groups.block_extremes
        peak = groups.peak[0]
        blocks = torch.nonzero((highs == peak) | (lows == -peak)).squeeze(1)
        candidates = (blocks[:, None] * _BLOCK + torch.arange(_BLOCK, device=w.device)).reshape(-1)
        candidates = candidates[candidates < flat.numel()]
        values = flat[candidates]
        index = candidates[(values == peak) | (values == -peak)]
    group = index // max(1, flat.numel() // groups.rows)
    return index, group, torch.bincount(group, minlength=groups.rows)


class _FusedFakeQuantize(torch.autograd.Function):
    """`fake_quantize` in a few passes, with the same value and gradient (STE plus the scale path)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
        top = max_code(bits)
        w = weight.detach()
        groups = _groups(w, top, per_channel)
        quantized = torch.div(w, groups.divisor).round_().mul_(groups.divisor)
        ctx.save_for_backward(w, quantized)
        ctx.top, ctx.groups, ctx.peaks = top, groups, _peak_positions(w, groups)
        return quantized

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        w, quantized = ctx.saved_tensors
        groups, (index, group, ties) = ctx.groups, ctx.peaks
        # dq/ds = round(w/s) - w/s = (q - w) / s, so dL/ds = sum(g q - g w) / s per group; ds/dw = sign(w) / top.
        g = grad_output.reshape(groups.rows, -1)
        dl_ds = (
            torch.einsum("ij,ij->i", g, quantized.reshape(groups.rows, -1))
            - torch.einsum("ij,ij->i", g, w.reshape(groups.rows, -1))
        ) / groups.scale
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        scatter = torch.sign(w.reshape(-1)[index]) * (dl_ds / (ctx.top * ties.clamp_min(1)))[group].to(grad.dtype)
        grad.reshape(-1).index_add_(0, index, scatter)
        return grad, None, None


def fused_fake_quantize(weight: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Same value and gradient as `fake_quantize`, computed without an autograd graph through the quantizer.

    QAT uses it in every forward pass; `fake_quantize` stays the plain autograd formulation it is checked against.
    """
    return _FusedFakeQuantize.apply(weight, validate_bits(bits), per_channel)


def quantize_codes(weight: torch.Tensor, bits: int, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and scale(s) of `weight` (no gradient).

    Returns:
        `(codes, scale)`: `codes` is an int8 tensor shaped like `weight` with values in
        [-(2**(bits-1) - 1), 2**(bits-1) - 1]; `scale` is as in `compute_scale` (0 for an all-zero tensor).
    """
    with torch.no_grad():
        scale = compute_scale(weight, bits, per_channel)
        codes = torch.round(weight / _nonzero(scale)).to(torch.int8)
    return codes, scale


def sharded_codes(
    weights: list[torch.Tensor], bits: int, per_channel: bool = False
) -> list[tuple[LocalShard, torch.Tensor, torch.Tensor]]:
    """`quantize_codes` of each weight's local rows, with the scale of the whole tensor (FSDP2-sharded or not).

    Returns:
        One `(shard, codes, scale)` per weight: `codes` covers `shard.local`; `scale` broadcasts against it.
    """
    shards = [local_shard(weight) for weight in weights]
    with torch.no_grad():
        # The largest of the shards' scales is the whole tensor's: rounding a quotient is monotonic.
        scales = [
            compute_scale(local, bits, per_channel) if local.numel() else local.new_zeros(())
            for local in (shard.local.detach() for shard in shards)
        ]
        scales = all_reduce(scales, [_spanning(shard, per_channel) for shard in shards], "max")
        return [
            (shard, torch.round(shard.local.detach() / _nonzero(scale)).to(torch.int8), scale)
            for shard, scale in zip(shards, scales)
        ]


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weights from integer codes: `codes * scale`, in the dtype of `scale`."""
    return codes.to(scale.dtype) * scale


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Raises `ValueError` naming the parameter if `weight` holds NaN or Inf (on every process, for a shard)."""
    shard = local_shard(weight)
    flag = torch.isfinite(shard.local).all().to(torch.int32).reshape(1)
    if shard.groups:
        flag = -all_reduce([-flag], [shard.groups], "max")[0]  # the minimum: finite everywhere
    if not bool(flag):
        raise ValueError(
            f"Weight {name!r} contains NaN or Inf values and cannot be quantized. The model diverged or the "
            "checkpoint is corrupt: lower the learning rate (or osc_lambda), or load a healthy checkpoint."
        )
