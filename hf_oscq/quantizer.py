"""The paper's weight quantizer: symmetric, uniform, max-magnitude scale, round-half-to-even.

Pure tensor functions, no modules. Everything else in hf_oscq (penalty, QAT, PTQ, export) quantizes through
this file, so "how to quantize" is defined exactly once.
"""

from __future__ import annotations

import numbers

import torch

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


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weights from integer codes: `codes * scale`, in the dtype of `scale`."""
    return codes.to(scale.dtype) * scale


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Raises `ValueError` naming the parameter if `weight` holds NaN or Inf."""
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"Weight {name!r} contains NaN or Inf values and cannot be quantized. The model diverged or the "
            "checkpoint is corrupt: lower the learning rate (or osc_lambda), or load a healthy checkpoint."
        )
