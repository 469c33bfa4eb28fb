"""The operations a packed weight runs in a forward pass: dequantization and products with an input, on the compiled
CPU kernels (kernel_build.py) where they apply and torch operations otherwise.

* `dequantize`: the float weight `codes * scale` (float32 product, then the requested dtype), bit for bit the same
  on both paths (`packing.dequantize_packed` is the reference).
* `linear` (`F.linear`, a weight whose output channels are dim 0) and `matmul` (`x @ W` for GPT-2's `Conv1D`,
  output channels in dim 1): on CPU, for float32 inputs of at most `MAX_ROWS` rows (a token at a time, small
  batches), a fused kernel reads the packed codes and never forms the float weight; for more rows, the weight is
  dequantized by the kernel and torch's matrix product runs on it. The fused kernels sum in another order than
  torch's product (`scale * sum(code * x)` per scale block): the results agree to float32 rounding,
  |difference| <= 2 * fan_in * 2**-24 * sum(|w| * |x|) per output.

The torch path (`HF_OSCQ_DISABLE_KERNELS=1`, no compiler, CUDA and other devices, float64 scales, inputs that need
gradients) gives the values of `quantize_model`'s weights through torch's own operations.

What a kernel needs of a weight (its sizes, float32 scales, which kernels apply) is worked out once per weight and
kept beside it (`_plan`), since every tensor attribute read on a packed weight costs a Python dispatch.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
from torch.nn import functional as F

from .kernel_build import MAX_ROWS, load_kernels
from .packing import dequantize_packed, invalid_packed_codes, packed_size


class _Plan(NamedTuple):
    reference: weakref.ref  # the weight the plan is for (ids are reused once it is gone)
    shape: tuple[int, ...]
    numel: int
    bits: int
    dtype: torch.dtype
    out_dim: int
    cpu: bool  # codes and scales on the CPU, scales in float32 or narrower: the kernels apply
    scale: torch.Tensor  # float32 scales as the kernel reads them: flat (out_dim 0), (groups, out) for Conv1D
    block: int  # codes a scale covers (out_dim 0), rows of an input group (Conv1D)
    fused: bool  # the fused product applies (rows and scale blocks start on whole words of codes)
    codes: tuple[int, int]  # address and bytes of the packed codes (their storage stays; `forget` after a copy)


_PLANS: dict[int, _Plan] = {}


def _codes_per_word(bits: int) -> int:
    return 16 if bits == 2 else 8 if bits <= 4 else 4


def _make_plan(weight) -> _Plan:
    shape, bits, out_dim = tuple(weight.shape), weight.bits, weight.out_dim
    numel = math.prod(shape)
    scale = weight.scale
    cpu = weight.packed.device.type == "cpu" and scale.device.type == "cpu" and scale.dtype != torch.float64
    word = _codes_per_word(bits)
    flat = scale.reshape(-1).to(torch.float32).contiguous() if cpu else scale
    block, fused = 1, False
    if cpu and out_dim == 1 and len(shape) == 2:  # GPT-2's Conv1D, stored (in, out)
        rows, cols = shape
        transposed = flat.expand(cols) if flat.numel() == 1 else flat.reshape(cols, -1).T
        flat = transposed.reshape(-1, cols).contiguous()
        block = rows // flat.shape[0]
        fused = cols % word == 0
    elif cpu and out_dim == 0:
        block = numel // max(flat.numel(), 1)
        cols = numel // shape[0] if shape and shape[0] else 0
        span = min(block, cols)
        fused = len(shape) == 2 and cols > 0 and cols % word == 0 and span % word == 0 and cols % span == 0
    else:
        cpu = False  # other layouts (transposed convolutions) dequantize through torch
    codes = (weight.packed.data_ptr(), weight.packed.numel())
    return _Plan(weakref.ref(weight), shape, numel, bits, weight.dtype, out_dim, cpu, flat, block, fused, codes)


def _plan(weight) -> _Plan:
    key = id(weight)
    plan = _PLANS.get(key)
    if plan is None or plan.reference() is not weight:
        plan = _make_plan(weight)
        _PLANS[key] = plan
        weakref.finalize(weight, _PLANS.pop, key, None)
    return plan


def forget(weight) -> None:
    """Drops what was worked out for `weight` (its codes or scales were overwritten)."""
    _PLANS.pop(id(weight), None)


def _kernels(plan: _Plan, x: torch.Tensor | None = None):
    """The compiled kernels if they apply to the weight of `plan` (and the input `x`), else None."""
    if not plan.cpu or (x is not None and (x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()))):
        return None
    return load_kernels()


def dequantize(weight, dtype: torch.dtype) -> torch.Tensor:
    """`codes * scale` of a `PackedWeight`, computed in float32 and returned in `dtype` (contiguous, the weight's
    shape)."""
    plan = _plan(weight)
    kernels = _kernels(plan)
    if kernels is None:
        return dequantize_packed(weight.packed, plan.bits, weight.scale, plan.shape, dtype, plan.out_dim)
    out = torch.empty(plan.shape, dtype=torch.float32)
    if plan.numel:
        _check(
            kernels.oscq_dequantize(
                *plan.codes, plan.bits, plan.numel, plan.scale.data_ptr(), plan.block,
                plan.shape[1] if plan.out_dim else 0, out.data_ptr(), torch.get_num_threads(),
            )
        )  # fmt: skip
    return out if dtype == torch.float32 else out.to(dtype)


def invalid_codes(codes: torch.Tensor, bits: int, numel: int) -> str | None:
    """What is wrong with a packed stream of `numel` codes (`packing.invalid_packed_codes`, which the compiled
    kernel's scan stands in for where the stream is valid); None when valid."""
    flat = codes.reshape(-1)
    kernels = load_kernels() if flat.device.type == "cpu" else None
    if kernels is None or flat.dtype != torch.uint8 or flat.numel() != packed_size(numel, bits):
        return invalid_packed_codes(flat, bits, numel)
    flat = flat.contiguous()
    used = numel * bits - 8 * (flat.numel() - 1)
    if 0 < used < 8 and int(flat[-1]) >> used:
        return invalid_packed_codes(flat, bits, numel)  # non-zero padding: the reference names it
    if numel and not kernels.oscq_codes_valid(flat.data_ptr(), flat.numel(), bits, numel, torch.get_num_threads()):
        return invalid_packed_codes(flat, bits, numel)  # the reference names the value
    return None


def _check(code: int) -> None:
    if code:
        raise RuntimeError(f"hf_oscq's packed-weight kernel refused its arguments (code {code}): a bug, please report")


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a `PackedWeight` whose output channels are dim 0."""
    plan = _plan(weight)
    kernels = _kernels(plan, x) if plan.out_dim == 0 else None
    if kernels is None:
        return F.linear(x, weight.dequantize(), bias)
    rows = plan.shape[0]
    cols = plan.numel // rows
    count = x.numel() // cols if cols else 0
    if not (plan.fused and x.dtype == torch.float32 and plan.dtype == torch.float32 and 0 < count <= MAX_ROWS):
        return F.linear(x, dequantize(weight, plan.dtype), bias)
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu" or bias.shape != (rows,)):
        return F.linear(x, dequantize(weight, plan.dtype), bias)
    bias = bias.contiguous() if bias is not None else None
    flat = x.reshape(count, cols).contiguous()
    out = torch.empty(count, rows, dtype=torch.float32)
    _check(
        kernels.oscq_matmul_rows(
            *plan.codes, plan.bits, rows, cols, plan.scale.data_ptr(), plan.block, flat.data_ptr(), count,
            None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads(),
        )
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], rows)


def matmul(x: torch.Tensor, weight) -> torch.Tensor:
    """`x @ weight` for a 2-D `PackedWeight` stored `(in, out)` with output channels in dim 1 (GPT-2's `Conv1D`)."""
    plan = _plan(weight)
    kernels = _kernels(plan, x) if plan.out_dim == 1 else None
    if kernels is None:
        return torch.matmul(x, weight.dequantize())
    rows, cols = plan.shape
    count = x.numel() // rows if rows else 0
    if not (plan.fused and x.dtype == torch.float32 and plan.dtype == torch.float32 and 0 < count <= MAX_ROWS):
        return torch.matmul(x, dequantize(weight, plan.dtype))
    flat = x.reshape(count, rows).contiguous()
    out = torch.empty(count, cols, dtype=torch.float32)
    _check(
        kernels.oscq_matmul_cols(
            *plan.codes, plan.bits, rows, cols, plan.scale.data_ptr(), plan.block, flat.data_ptr(), count,
            out.data_ptr(), torch.get_num_threads(),
        )
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], cols)
