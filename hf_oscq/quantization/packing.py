"""Bit-packing of integer quantization codes: `b` bits per code, stored in a flat uint8 tensor.

Pure tensor functions, no modules. Layout (also documented in docs/EXPORT.md):

* codes are flattened in row-major order and offset to unsigned values `u = code + max_code(b)`, so the
  `2**b - 1` valid codes occupy `0 .. 2**b - 2` (the all-ones pattern `2**b - 1` never occurs in a valid file);
* code `i` occupies bits `i*b .. i*b + b - 1` of one little-endian bit stream, least significant bit first;
  stream bit `k` is bit `k % 8` of byte `k // 8` (numpy's `packbits(..., bitorder="little")`);
* the last byte is padded with zero bits: `packed_size(n, b) = ceil(n * b / 8)` bytes for `n` codes.

`pack_codes` / `unpack_codes` are the reference implementation (numpy bit matrices, one bit per byte); the
vectorized readers below (`unpack_unsigned`, `dequantize_packed`, `dequantize_packed_rows`), which forward passes of
packed weights run, are tested against them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import OscqValueError
from .layout import expand_scale
from .spec import max_code, validate_bits


def packed_size(numel: int, bits: int) -> int:
    """Number of bytes holding `numel` codes at `bits` bits each."""
    return math.ceil(numel * validate_bits(bits) / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes in `[-max_code(bits), max_code(bits)]` into a flat uint8 tensor.

    Args:
        codes: integer tensor of any shape (e.g. the int8 codes of `quantize_codes`).
        bits: bit-width in [2, 8].

    Returns:
        A 1-D uint8 tensor of `packed_size(codes.numel(), bits)` bytes.

    Raises:
        OscqValueError: when a code lies outside the range `bits` bits can hold.
    """
    top = max_code(bits)
    flat = codes.detach().reshape(-1).cpu().to(torch.int16)
    if flat.numel() and (int(flat.min()) < -top or int(flat.max()) > top):
        raise OscqValueError(
            f"Codes range from {int(flat.min())} to {int(flat.max())} but {bits}-bit codes lie in [-{top}, {top}]: "
            f"pack the codes that quantize_codes(weight, bits={bits}) returns."
        )
    unsigned = (flat + top).numpy().astype(np.uint8)
    bit_matrix = (unsigned[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_codes`: the int8 codes of a tensor of `shape`.

    Args:
        packed: the 1-D uint8 tensor `pack_codes` returned.
        bits: the bit-width it was packed at.
        shape: the shape of the original tensor.

    Returns:
        An int8 tensor of `shape`.

    Raises:
        OscqValueError: when `packed` is not uint8, has the wrong number of bytes, or holds a bit pattern no valid
            code produces (a corrupted file or a bit-width mismatch).
    """
    numel = math.prod(shape)
    expected = packed_size(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise OscqValueError(
            f"Packed codes must be a 1-D uint8 tensor of {expected} bytes for {numel} weights at {bits} bits, got "
            f"{packed.dtype} of shape {tuple(packed.shape)}: the tensor was packed at another bit-width or for "
            "another shape."
        )
    stream = np.unpackbits(packed.cpu().numpy(), bitorder="little")
    if stream[numel * bits :].any():
        raise OscqValueError(
            f"Padding bits after the last {bits}-bit code are not zero: the packed data is corrupted."
        )
    bit_matrix = stream[: numel * bits].reshape(numel, bits).astype(np.uint8)
    unsigned = (bit_matrix << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.int16)
    top = max_code(bits)
    if unsigned.size and int(unsigned.max()) > 2 * top:
        raise OscqValueError(
            f"Packed data holds the value {int(unsigned.max())}, which no {bits}-bit code produces "
            f"(valid: 0..{2 * top}): the file is corrupted or was packed at another bit-width."
        )
    return torch.from_numpy((unsigned - top).astype(np.int8)).reshape(tuple(shape))


def _unpack_groups(groups: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Unsigned codes of whole groups: `groups` is `(G, bits)` uint8 (8 codes each), `out` is `(G, 8)` int64."""
    word = groups[:, 0].to(torch.int64)
    for j in range(1, bits):
        word |= groups[:, j].to(torch.int64) << (8 * j)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=groups.device)
    torch.bitwise_right_shift(word[:, None], shifts, out=out)
    out &= (1 << bits) - 1


def unpack_unsigned(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first `numel` unsigned codes (`code + max_code(bits)`) of a packed stream, vectorized.

    Eight consecutive codes fill exactly `bits` bytes of the little-endian stream, so the stream is read as
    `(groups, bits)` bytes, each row assembled into one 64-bit word and split with shifts.

    Args:
        packed: 1-D uint8 stream (`pack_codes` output).
        bits: bit-width in [2, 8].
        numel: number of codes to read.

    Returns:
        A 1-D int64 tensor of `numel` values in `[0, 2**bits - 1]`.
    """
    full = numel // 8
    out = torch.empty(math.ceil(numel / 8) * 8, dtype=torch.int64, device=packed.device)
    if full:
        _unpack_groups(packed[: full * bits].view(full, bits), bits, out[: full * 8].view(full, 8))
    if numel % 8:  # the last group's bytes are cut short by the file's padding rule: read them zero-padded
        tail = packed.new_zeros(bits)
        rest = packed[full * bits :]
        tail[: rest.numel()] = rest
        _unpack_groups(tail.view(1, bits), bits, out[full * 8 :].view(1, 8))
    return out[:numel]


_STEP = 1 << 18  # codes unpacked at a time (a multiple of 8)


def _code_values(bits: int, scale: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Value of every unsigned code `u` (index): `(u - max_code) * scale` in float32 cast to `dtype`, or the integer
    code itself (float32) without a scale. The all-ones pattern, which no valid file holds, maps past the top code."""
    top = max_code(bits)
    codes = torch.arange(-top, top + 2, dtype=torch.float32, device=device)
    return codes if scale is None else (codes * scale.reshape(()).float()).to(dtype)


def dequantize_packed(
    packed: torch.Tensor,
    bits: int,
    scale: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    out_dim: int = 0,
) -> torch.Tensor:
    """`codes * scale` of a packed weight: bit for bit `dequantize(unpack_codes(packed, bits, shape), scale)` rounded
    to `dtype`.

    Args:
        packed: 1-D uint8 stream of `prod(shape)` codes.
        bits: bit-width in [2, 8].
        scale: float scales; `scale.numel()` equal blocks of the row-major codes share one each when `out_dim` is 0,
            else blocks of the output-channel-first codes (`layout.expand_scale`).
        shape: the weight's shape.
        dtype: the returned dtype.
        out_dim: the weight's output-channel dimension (1 for GPT-2's `Conv1D`).

    Returns:
        A contiguous tensor of `shape` and `dtype`.
    """
    numel = math.prod(shape)
    per_tensor = scale.numel() == 1
    values = _code_values(bits, scale if per_tensor else None, dtype, packed.device)
    flat = torch.empty(numel, dtype=values.dtype, device=packed.device)
    # In steps of _STEP codes: the integer temporaries stay small whatever the weight's size.
    if 8 % bits == 0:  # whole codes per byte: one table look-up per byte gives 8 // bits values
        per_byte = 8 // bits
        byte = torch.arange(256, device=packed.device)
        table = values[(byte[:, None] >> (torch.arange(per_byte, device=packed.device) * bits)) & ((1 << bits) - 1)]
        whole = numel // per_byte  # bytes all of whose codes are used
        for start in range(0, whole, _STEP // per_byte):
            stop = min(start + _STEP // per_byte, whole)
            out = flat[start * per_byte : stop * per_byte].view(-1, per_byte)
            torch.index_select(table, 0, packed[start:stop].to(torch.int64), out=out)
        if numel % per_byte:
            flat[whole * per_byte :] = table[int(packed[whole])][: numel % per_byte]
    else:
        for start in range(0, numel, _STEP):
            count = min(_STEP, numel - start)
            unsigned = unpack_unsigned(packed[start * bits // 8 :], bits, count)
            torch.index_select(values, 0, unsigned, out=flat[start : start + count])
    if not per_tensor and out_dim:
        return (flat.view(tuple(shape)) * expand_scale(scale.float(), tuple(shape), out_dim)).to(dtype)
    if not per_tensor:
        flat = flat.view(scale.numel(), -1).mul_(scale.reshape(-1, 1).float()).to(dtype)
    return flat.view(tuple(shape))


def dequantize_packed_rows(
    packed: torch.Tensor,
    bits: int,
    scale: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Rows of the dequantized weight (an embedding look-up), reading only their codes.

    Args:
        packed, bits, scale, shape, dtype: as in `dequantize_packed`.
        rows: integer indices into dim 0, any shape.

    Returns:
        A tensor of shape `(*rows.shape, *shape[1:])` equal to `dequantize_packed(...)[rows]`.
    """
    row_size = math.prod(shape[1:])
    flat_rows = rows.reshape(-1).to(torch.int64)
    positions = (flat_rows[:, None] * row_size + torch.arange(row_size, device=rows.device)).reshape(-1)
    bit = positions * bits
    # A code spans at most two bytes; where it ends in the last byte the second read is clamped and masked away.
    low = packed[bit >> 3].to(torch.int32)
    high = packed[((bit >> 3) + 1).clamp_(max=packed.numel() - 1)].to(torch.int32)
    unsigned = ((low | (high << 8)) >> (bit & 7).to(torch.int32)) & ((1 << bits) - 1)
    if scale.numel() == 1:
        flat = torch.index_select(_code_values(bits, scale, dtype, packed.device), 0, unsigned)
    else:
        codes = torch.index_select(_code_values(bits, None, dtype, packed.device), 0, unsigned)
        blocks = scale.reshape(shape[0], -1).float()[flat_rows]  # (k, blocks per row)
        flat = (codes.view(len(flat_rows), blocks.shape[1], -1) * blocks[:, :, None]).to(dtype)
    return flat.reshape(*rows.shape, *shape[1:])


def invalid_packed_codes(packed: torch.Tensor, bits: int, numel: int, chunk: int = 1 << 16) -> str | None:
    """What is wrong with a packed stream, read `chunk` codes at a time (a few hundred kB of temporaries whatever
    the weight's size, so checking a checkpoint while it loads adds next to nothing to the peak memory); `None` when
    valid.

    Checked: the byte count, codes past `2 * max_code(bits)` (the all-ones pattern no valid code produces) and
    non-zero padding bits after the last code.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(numel, bits):
        return f"{packed.numel()} {packed.dtype} bytes instead of {packed_size(numel, bits)} uint8 bytes"
    top = max_code(bits)
    step = chunk // 8 * 8  # whole groups of 8 codes: each chunk starts on a byte boundary
    for start in range(0, numel, step):
        count = min(step, numel - start)
        unsigned = unpack_unsigned(packed[start * bits // 8 :], bits, count)
        if count and int(unsigned.max()) > 2 * top:
            return f"the value {int(unsigned.max())}, which no {bits}-bit code produces (valid: 0..{2 * top})"
    used = numel * bits - 8 * (packed.numel() - 1)
    if 0 < used < 8 and int(packed[-1]) >> used:
        return f"non-zero padding bits after the last {bits}-bit code"
    return None
