"""The paper's weight quantizer, the reference formulation: symmetric, uniform, max-magnitude scale,
round-half-to-even (PAPER.md section 1).

Pure tensor functions, no modules. Everything else in hf_oscq (penalty, QAT, PTQ, export) quantizes through this
file or through `fused.py`, whose kernels are tested against it.
"""

from __future__ import annotations

import torch

from ..errors import OscqValueError
from .sharding import LocalShard, all_reduce, local_shard, scale_process_groups
from .spec import QuantSpec, resolve_spec


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales, codes and quantized values are computed in: float32, or float64 for float64 weights.

    float16 and bfloat16 weights convert to float32 exactly, so a half-precision model gets exactly the codes and
    scales of the same weights in float32. Computing in half precision instead would round `W / s` before rounding
    to the nearest code, and a float16 scale below the smallest normal float16 would lose precision.
    """
    return torch.promote_types(dtype, torch.float32)


def compute_scale(
    weight: torch.Tensor, bits: int | None = None, per_channel: bool | None = None, *, spec: QuantSpec | None = None
) -> torch.Tensor:
    """Scale `s = max|W| / (2**(bits-1) - 1)`, differentiable through the max like the reference code.

    Computed and returned in `scale_dtype(weight.dtype)` (float32 for float32, float16 and bfloat16 weights).

    Args:
        weight: the tensor to quantize.
        bits: bit-width in [2, 8] (shorthand for `spec`).
        per_channel: one scale per output channel (dim 0) instead of one per tensor (shorthand for `spec`).
        spec: the `QuantSpec` (its modules are not used here).

    Returns:
        A 0-d tensor, or per channel a tensor of shape `(out, 1, ..., 1)` that broadcasts against `weight`.
    """
    spec = resolve_spec("compute_scale", spec, bits, per_channel)
    if spec.per_channel and weight.dim() > 0:
        reduce_dims = tuple(range(1, weight.dim()))
        magnitude = weight.abs().amax(dim=reduce_dims, keepdim=True) if reduce_dims else weight.abs()
    else:
        magnitude = weight.abs().amax()
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
    weight: torch.Tensor, bits: int | None = None, per_channel: bool | None = None, *, spec: QuantSpec | None = None
) -> torch.Tensor:
    """Quantizes and dequantizes `weight`: `q_b(W) = s * round(W / s)`, with the straight-through estimator.

    The scale is not detached, so the largest-magnitude element also receives gradient through `s`
    (as in the paper's reference code). The forward value equals `dequantize(*quantize_codes(weight, bits))`
    bit for bit, cast to `weight.dtype` (the arithmetic runs in `scale_dtype(weight.dtype)`).

    Args:
        weight: the full-precision tensor.
        bits: bit-width in [2, 8]; codes lie in [-(2**(bits-1) - 1), 2**(bits-1) - 1] (shorthand for `spec`).
        per_channel: one scale per output channel (dim 0) (shorthand for `spec`).
        spec: the `QuantSpec`.

    Returns:
        A tensor of the same shape and dtype holding values on the quantization grid.
    """
    spec = resolve_spec("fake_quantize", spec, bits, per_channel)
    scale = nonzero_scale(compute_scale(weight, spec=spec))
    return (_RoundSTE.apply(weight.to(scale.dtype) / scale) * scale).to(weight.dtype)


def quantize_codes(
    weight: torch.Tensor, bits: int | None = None, per_channel: bool | None = None, *, spec: QuantSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and scale(s) of `weight` (no gradient).

    Args: as `fake_quantize`.

    Returns:
        `(codes, scale)`: `codes` is an int8 tensor shaped like `weight` with values in
        [-(2**(bits-1) - 1), 2**(bits-1) - 1]; `scale` is as in `compute_scale` (0 for an all-zero tensor).
    """
    spec = resolve_spec("quantize_codes", spec, bits, per_channel)
    with torch.no_grad():
        scale = compute_scale(weight, spec=spec)
        codes = torch.round(weight.to(scale.dtype) / nonzero_scale(scale)).to(torch.int8)
    return codes, scale


def sharded_codes(weights: list[torch.Tensor], spec: QuantSpec) -> list[tuple[LocalShard, torch.Tensor, torch.Tensor]]:
    """`quantize_codes` of each weight's local rows, with the scale of the whole tensor (FSDP2-sharded or not).

    Returns:
        One `(shard, codes, scale)` per weight: `codes` covers `shard.local`; `scale` broadcasts against it.
    """
    shards = [local_shard(weight) for weight in weights]
    with torch.no_grad():
        # The largest of the shards' scales is the whole tensor's: rounding a quotient is monotonic.
        scales = [
            compute_scale(local, spec=spec) if local.numel() else local.new_zeros((), dtype=scale_dtype(local.dtype))
            for local in (shard.local.detach() for shard in shards)
        ]
        scales = all_reduce(scales, [scale_process_groups(shard, spec) for shard in shards], "max")
        return [
            (shard, torch.round(shard.local.detach().to(scale.dtype) / nonzero_scale(scale)).to(torch.int8), scale)
            for shard, scale in zip(shards, scales)
        ]


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weights from integer codes: `codes * scale`, in the dtype of `scale`."""
    return codes.to(scale.dtype) * scale


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
