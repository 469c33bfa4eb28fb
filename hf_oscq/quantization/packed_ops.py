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
"""

from __future__ import annotations

import weakref

import torch
from torch.nn import functional as F

from .kernel_build import MAX_ROWS, load_kernels
from .packing import dequantize_packed, invalid_packed_codes, packed_size

# id(scale tensor) -> (a weak reference to it, its transposed float32 copy); entries leave with their tensor
_TRANSPOSED_SCALES: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _codes_per_word(bits: int) -> int:
    return 16 if bits == 2 else 8 if bits <= 4 else 4


def _kernels_for(weight, *tensors: torch.Tensor):
    """The compiled kernels if they apply to `weight` (and the inputs), else None."""
    if weight.device.type != "cpu" or weight.scale.dtype == torch.float64:
        return None
    if any(t.device.type != "cpu" or (t.requires_grad and torch.is_grad_enabled()) for t in tensors):
        return None
    return load_kernels()


def _float_scale(weight) -> torch.Tensor:
    return weight.scale.reshape(-1).to(torch.float32).contiguous()


def _conv1d_scale(weight) -> torch.Tensor:
    """The scales of a `(in, out)` weight (out_dim 1) as `(groups, out)`, row g holding input group g's: cached per
    scale tensor, so a forward pass does not transpose them again."""
    key = id(weight.scale)
    entry = _TRANSPOSED_SCALES.get(key)
    if entry is not None and entry[0]() is weight.scale:
        return entry[1]
    out = weight.shape[1]
    scale = _float_scale(weight)
    transposed = (scale.expand(out) if scale.numel() == 1 else scale.reshape(out, -1).T).reshape(-1, out).contiguous()
    _TRANSPOSED_SCALES[key] = (weakref.ref(weight.scale), transposed)
    weakref.finalize(weight.scale, _TRANSPOSED_SCALES.pop, key, None)
    return transposed


def dequantize(weight, dtype: torch.dtype) -> torch.Tensor:
    """`codes * scale` of a `PackedWeight`, computed in float32 and returned in `dtype` (contiguous, the weight's
    shape)."""
    kernels = _kernels_for(weight)
    two_dimensional_conv1d = weight.out_dim == 1 and weight.dim() == 2
    if kernels is None or (weight.out_dim and not two_dimensional_conv1d):
        return dequantize_packed(weight.packed, weight.bits, weight.scale, weight.shape, dtype, weight.out_dim)
    out = torch.empty(weight.shape, dtype=torch.float32)
    if two_dimensional_conv1d:
        scale, cols_out = _conv1d_scale(weight), weight.shape[1]
        block = weight.shape[0] // scale.shape[0]
    else:
        scale, cols_out = _float_scale(weight), 0
        block = weight.numel() // max(scale.numel(), 1)
    if weight.numel():
        _check(
            kernels.oscq_dequantize(
                weight.packed.data_ptr(), weight.packed.numel(), weight.bits, weight.numel(), scale.data_ptr(),
                block, cols_out, out.data_ptr(), torch.get_num_threads(),
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


def _fused_rows(x: torch.Tensor, weight) -> bool:
    """Whether the fused kernel takes `x @ weight.T` (rows and scale blocks start on whole words of codes)."""
    rows, cols = weight.shape[0], weight.numel() // max(weight.shape[0], 1)
    scales = weight.scale.numel()
    block = weight.numel() // scales if scales else 0
    span = min(block, cols)
    word = _codes_per_word(weight.bits)
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and 0 < x.numel() // cols <= MAX_ROWS
        and rows > 0
        and cols % word == 0
        and span > 0
        and span % word == 0
        and cols % span == 0
    )


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a `PackedWeight` whose output channels are dim 0."""
    kernels = _kernels_for(weight, x) if weight.out_dim == 0 else None
    if kernels is None:
        return F.linear(x, weight.dequantize(), bias)
    if not _fused_rows(x, weight):
        return F.linear(x, dequantize(weight, weight.dtype), bias)
    rows, cols = weight.shape
    flat = x.reshape(-1, cols).contiguous()
    scale = _float_scale(weight)
    out = torch.empty(flat.shape[0], rows, dtype=torch.float32)
    planes = torch.empty_like(flat)
    _check(
        kernels.oscq_matmul_rows(
            weight.packed.data_ptr(), weight.packed.numel(), weight.bits, rows, cols, scale.data_ptr(),
            weight.numel() // scale.numel(), flat.data_ptr(), flat.shape[0], planes.data_ptr(), out.data_ptr(),
            torch.get_num_threads(),
        )
    )  # fmt: skip
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], rows)


def matmul(x: torch.Tensor, weight) -> torch.Tensor:
    """`x @ weight` for a 2-D `PackedWeight` stored `(in, out)` with output channels in dim 1 (GPT-2's `Conv1D`)."""
    kernels = _kernels_for(weight, x) if weight.out_dim == 1 and weight.dim() == 2 else None
    if kernels is None:
        return torch.matmul(x, weight.dequantize())
    rows, cols = weight.shape
    fused = (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and 0 < x.numel() // rows <= MAX_ROWS
        and cols % _codes_per_word(weight.bits) == 0
    )
    if not fused:
        return torch.matmul(x, dequantize(weight, weight.dtype))
    flat = x.reshape(-1, rows).contiguous()
    scale = _conv1d_scale(weight)
    out = torch.empty(flat.shape[0], cols, dtype=torch.float32)
    _check(
        kernels.oscq_matmul_cols(
            weight.packed.data_ptr(), weight.packed.numel(), weight.bits, rows, cols, scale.data_ptr(),
            rows // scale.shape[0], flat.data_ptr(), flat.shape[0], out.data_ptr(), torch.get_num_threads(),
        )
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], cols)
