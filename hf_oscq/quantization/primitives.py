"""The paper's weight quantizer, the reference formulation: symmetric, uniform, max-magnitude scale,
round-half-to-even (PAPER.md section 1).

Pure tensor functions, no modules. Everything else in hf_oscq (penalty, QAT, PTQ, export) quantizes through this
file or through `fused.py`, whose kernels are tested against it.
"""

from __future__ import annotations

import torch

from ..errors import OscqValueError
from .layout import expand_scale, group_layout, grouped, resolve_out_dim, scale_shape, ungrouped
from .sharding import LocalShard, all_reduce, check_shard_layout, local_shard, scale_process_groups
from .spec import PER_CHANNEL, PER_TENSOR, QuantSpec, resolve_spec


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales, codes and quantized values are computed in: float32, or float64 for float64 weights.

    float16 and bfloat16 weights convert to float32 exactly, so a half-precision model gets exactly the codes and
    scales of the same weights in float32. Computing in half precision instead would round `W / s` before rounding
    to the nearest code, and a float16 scale below the smallest normal float16 would lose precision.
    """
    return torch.promote_types(dtype, torch.float32)


def compute_scale(
    weight: torch.Tensor,
    bits: int | None = None,
    per_channel: bool | None = None,
    *,
    spec: QuantSpec | None = None,
    out_dim: int | None = None,
) -> torch.Tensor:
    """Scale `s = max|W| / (2**(bits-1) - 1)` of each scale group, differentiable through the max like the reference
    code.

    Computed and returned in `scale_dtype(weight.dtype)` (float32 for float32, float16 and bfloat16 weights).

    Args:
        weight: the tensor to quantize.
        bits: bit-width in [2, 8] (shorthand for `spec`).
        per_channel: one scale per output channel instead of one per tensor (shorthand for `spec`).
        spec: the `QuantSpec` (its modules are not used here); `granularity="group"` gives one scale per
            `group_size` input features of each output channel.
        out_dim: the dimension of `weight` that indexes output channels: 0 for Linear, Conv and Embedding weights,
            1 for GPT-2's `Conv1D` and transposed convolutions (`hf_oscq.output_dim(module)` says which). Needed for
            per-channel and group-wise scales of a weight of 2 or more dimensions, whose tensor cannot say it.

    Returns:
        A 0-d tensor per tensor; per channel `(out, 1, ..., 1)`; group-wise `(out, groups)` (output channel first
        whatever `out_dim`, see `layout.py`; `layout.expand_scale` broadcasts it against `weight`).

    Raises:
        OscqValueError: for per-channel or group-wise scales of a weight of 2 or more dimensions without `out_dim`
            (`layout.resolve_out_dim`).
    """
    spec = resolve_spec("compute_scale", spec, bits, per_channel)
    out_dim = resolve_out_dim("compute_scale", weight.shape, spec, out_dim)
    magnitude = grouped(weight, spec, out_dim).abs().amax(dim=2)
    magnitude = magnitude.reshape(scale_shape(weight.shape, spec, out_dim))
    return magnitude.to(scale_dtype(weight.dtype)) / spec.max_code


def nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` with zeros replaced by 1, to divide by.

    An all-zero tensor has scale 0: dividing by 1 keeps its codes at 0 (no NaN), and masked_fill passes no gradient
    there, exactly as the undefined formula would. Every other scale, however small, is divided by as it is, so the
    codes are always those of the scale that is stored and multiplied back.
    """
    return scale.masked_fill(scale == 0, 1.0)


class _RoundSTE(torch.autograd.Function):
    """Round-half-to-even forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


def fake_quantize(
    weight: torch.Tensor,
    bits: int | None = None,
    per_channel: bool | None = None,
    *,
    spec: QuantSpec | None = None,
    out_dim: int | None = None,
) -> torch.Tensor:
    """Quantizes and dequantizes `weight`: `q_b(W) = s * round(W / s)`, with the straight-through estimator.

    The scale is not detached, so the largest-magnitude element of each scale group also receives gradient through
    its `s` (as in the paper's reference code). The forward value equals `dequantize(*quantize_codes(weight, bits))`
    bit for bit, cast to `weight.dtype` (the arithmetic runs in `scale_dtype(weight.dtype)`).

    Args:
        weight: the full-precision tensor.
        bits: bit-width in [2, 8]; codes lie in [-(2**(bits-1) - 1), 2**(bits-1) - 1] (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        spec: the `QuantSpec`.
        out_dim: the output-channel dimension of `weight`, as in `compute_scale` (needed where it matters).

    Returns:
        A tensor of the same shape and dtype holding values on the quantization grid.
    """
    spec = resolve_spec("fake_quantize", spec, bits, per_channel)
    out_dim = resolve_out_dim("fake_quantize", weight.shape, spec, out_dim)
    scale = nonzero_scale(compute_scale(weight, spec=spec, out_dim=out_dim))
    out, groups, _ = group_layout(weight.shape, spec, out_dim)
    scale = scale.reshape(out, groups, 1)
    values = _RoundSTE.apply(grouped(weight.to(scale.dtype), spec, out_dim) / scale) * scale
    return ungrouped(values, weight.shape, out_dim).to(weight.dtype)


def quantize_codes(
    weight: torch.Tensor,
    bits: int | None = None,
    per_channel: bool | None = None,
    *,
    spec: QuantSpec | None = None,
    out_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and scale(s) of `weight` (no gradient).

    Args: as `fake_quantize`.

    Returns:
        `(codes, scale)`: `codes` is an int8 tensor shaped like `weight` with values in
        [-(2**(bits-1) - 1), 2**(bits-1) - 1]; `scale` is as in `compute_scale` (0 for an all-zero group).
        `dequantize(codes, scale, out_dim=out_dim)` gives the quantized weight.
    """
    spec = resolve_spec("quantize_codes", spec, bits, per_channel)
    out_dim = resolve_out_dim("quantize_codes", weight.shape, spec, out_dim)
    with torch.no_grad():
        scale = compute_scale(weight, spec=spec, out_dim=out_dim)
        divisor = nonzero_scale(expand_scale(scale, weight.shape, out_dim))
        codes = torch.round(weight.to(scale.dtype) / divisor).to(torch.int8)
    return codes, scale


def sharded_codes(
    weights: list[torch.Tensor], spec: QuantSpec, out_dims: list[int] | None = None
) -> list[tuple[LocalShard, torch.Tensor, torch.Tensor]]:
    """`quantize_codes` of each weight's local rows, with the scale of the whole tensor (FSDP2-sharded or not).

    Args:
        weights: the weights (whole tensors or FSDP2 `DTensor`s).
        spec: the `QuantSpec`.
        out_dims: each weight's output-channel dimension (`selection.output_dims`); all 0 by default.

    Returns:
        One `(shard, codes, scale)` per weight: `codes` covers `shard.local`; `scale` as in `compute_scale`.
    """
    out_dims = out_dims or [0] * len(weights)
    shards = [local_shard(weight) for weight in weights]
    for shard, out_dim in zip(shards, out_dims):
        check_shard_layout(shard, spec, out_dim)
    with torch.no_grad():
        # The largest of the shards' scales is the whole tensor's: rounding a quotient is monotonic.
        scales = [
            compute_scale(shard.local.detach(), spec=spec, out_dim=out_dim)
            if shard.local.numel()
            else shard.local.new_zeros(scale_shape(shard.local.shape, spec), dtype=scale_dtype(shard.local.dtype))
            for shard, out_dim in zip(shards, out_dims)
        ]
        scales = all_reduce(scales, [scale_process_groups(shard, spec) for shard in shards], "max")
        return [
            (shard, _codes(shard.local.detach(), scale, out_dim), scale)
            for shard, scale, out_dim in zip(shards, scales, out_dims)
        ]


def _codes(weight: torch.Tensor, scale: torch.Tensor, out_dim: int) -> torch.Tensor:
    divisor = nonzero_scale(expand_scale(scale, weight.shape, out_dim))
    return torch.round(weight.to(scale.dtype) / divisor).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, *, out_dim: int | None = None) -> torch.Tensor:
    """Float weights from integer codes: `codes * scale`, in the dtype of `scale`.

    Args:
        codes: integer codes shaped like the weight.
        scale: the scale(s) as `compute_scale` / `quantize_codes` return them.
        out_dim: the output-channel dimension of the weight, as in `compute_scale` (needed for per-channel and
            group-wise scales of codes of 2 or more dimensions).

    Raises:
        OscqValueError: without `out_dim` where it matters.
    """
    granularity = PER_TENSOR if scale.dim() == 0 else PER_CHANNEL  # which one does not change the rule
    out_dim = resolve_out_dim("dequantize", codes.shape, QuantSpec(2, granularity), out_dim)
    return codes.to(scale.dtype) * expand_scale(scale, codes.shape, out_dim)


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Raises `OscqValueError` naming the parameter if `weight` holds NaN or Inf (on every process, for a shard)."""
    shard = local_shard(weight)
    flag = torch.isfinite(shard.local).all().to(torch.int32).reshape(1)
    if shard.groups:
        flag = -all_reduce([-flag], [shard.groups], "max")[0]  # the minimum: finite everywhere
    if not bool(flag):
        raise OscqValueError(
            f"Weight {name!r} contains NaN or Inf values and cannot be quantized. The model diverged or the "
            "checkpoint is corrupt: lower the learning rate (or osc_lambda), or load a healthy checkpoint."
        )
