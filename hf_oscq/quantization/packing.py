"""Bit-packing of integer quantization codes: `b` bits per code, stored in a flat uint8 tensor.

Pure tensor functions, no modules. Layout (also documented in docs/EXPORT.md):

* codes are flattened in row-major order and offset to unsigned values `u = code + max_code(b)`, so the
  `2**b - 1` valid codes occupy `0 .. 2**b - 2` (the all-ones pattern `2**b - 1` never occurs in a valid file);
* code `i` occupies bits `i*b .. i*b + b - 1` of one little-endian bit stream, least significant bit first;
  stream bit `k` is bit `k % 8` of byte `k // 8` (numpy's `packbits(..., bitorder="little")`);
* the last byte is padded with zero bits: `packed_size(n, b) = ceil(n * b / 8)` bytes for `n` codes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import OscqValueError
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
