import math

import pytest
import torch

from hf_oscq.quantization.packing import pack_codes, packed_size, unpack_codes


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """Independent formula: one little-endian integer holding code i (offset by max_code) at bit i*bits."""
    top = 2 ** (bits - 1) - 1
    value = sum((code + top) << (i * bits) for i, code in enumerate(codes))
    return value.to_bytes(math.ceil(len(codes) * bits / 8), "little")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1,), (3,), (7,), (13,), (5, 3), (3, 1, 3, 3), (1001,)])
def test_round_trip_every_bit_width_and_odd_size(bits, shape):
    top = 2 ** (bits - 1) - 1
    generator = torch.Generator().manual_seed(bits * 1000 + math.prod(shape))
    codes = torch.randint(-top, top + 1, shape, generator=generator, dtype=torch.int8)
    codes.view(-1)[0] = -top  # both extremes always present
    codes.view(-1)[-1] = top
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(math.prod(shape) * bits / 8),)
    assert packed.numel() == packed_size(math.prod(shape), bits)
    assert bytes(packed.tolist()) == _reference_pack(codes.reshape(-1).tolist(), bits)
    unpacked = unpack_codes(packed, bits, shape)
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked, codes)


def test_known_bytes_at_three_bits():
    # codes -3, 0, 3, 1 -> unsigned 0, 3, 6, 4 -> bit stream 000 110 011 001 (LSB first) -> 0x98, 0x09
    assert pack_codes(torch.tensor([-3, 0, 3, 1]), 3).tolist() == [0b10011000, 0b00001001]


def test_packed_size_is_b_over_8_bytes_per_weight():
    assert [packed_size(1000, b) for b in range(2, 9)] == [250, 375, 500, 625, 750, 875, 1000]
    assert packed_size(1, 3) == 1 and packed_size(3, 3) == 2


def test_codes_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"lie in \[-3, 3\]"):
        pack_codes(torch.tensor([4]), 3)
    with pytest.raises(ValueError, match="bits must be an integer"):
        pack_codes(torch.tensor([0]), 9)


def test_unpack_rejects_wrong_size_dtype_and_corrupted_bits():
    packed = pack_codes(torch.tensor([1, -1, 0, 2, -2]), 3)
    with pytest.raises(ValueError, match="2 bytes for 5 weights at 3 bits"):
        unpack_codes(packed[:1], 3, (5,))
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(packed.to(torch.int16), 3, (5,))
    invalid = torch.tensor([0b00000111], dtype=torch.uint8)  # unsigned 7 = 2**3 - 1: no 3-bit code produces it
    with pytest.raises(ValueError, match="no 3-bit code produces"):
        unpack_codes(invalid, 3, (2,))
    padded = packed.clone()
    padded[-1] |= 0b10000000  # a padding bit after the 15 code bits
    with pytest.raises(ValueError, match="Padding bits"):
        unpack_codes(padded, 3, (5,))


# Vectorized readers (what forward passes of packed weights run), checked against the reference unpack_codes.
from hf_oscq.quantization.packing import (  # noqa: E402
    dequantize_packed,
    dequantize_packed_rows,
    invalid_packed_codes,
    unpack_unsigned,
)


def _random_codes(bits: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    top = 2 ** (bits - 1) - 1
    return torch.randint(-top, top + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 15, 16, 1001])
def test_unpack_unsigned_equals_reference(bits, numel):
    codes = _random_codes(bits, (numel,), bits * 7 + numel)
    packed = pack_codes(codes, bits)
    unsigned = unpack_unsigned(packed, bits, numel)
    assert unsigned.dtype == torch.int64
    assert torch.equal(unsigned - (2 ** (bits - 1) - 1), unpack_codes(packed, bits, (numel,)).long())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_packed_is_codes_times_scale(bits, dtype):
    shape = (6, 5, 3)
    codes = _random_codes(bits, shape, bits)
    packed = pack_codes(codes, bits)
    generator = torch.Generator().manual_seed(bits)
    scales = {
        "tensor": torch.tensor(0.0123),
        "channel": torch.rand(6, 1, 1, generator=generator) + 0.01,
        "group": torch.rand(6, 5, generator=generator) + 0.01,  # one scale per 3 consecutive codes
    }
    for scale in scales.values():
        block = codes.numel() // scale.numel()
        expected = (codes.double().reshape(-1, block) * scale.double().reshape(-1, 1)).float().to(dtype)
        values = dequantize_packed(packed, bits, scale, shape, dtype)
        assert values.dtype == dtype and values.shape == shape
        assert torch.equal(values, expected.reshape(shape))


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_dequantize_packed_rows_equals_full_rows(bits):
    shape = (11, 7)  # 7 codes per row: rows start mid-byte
    codes = _random_codes(bits, shape, 3)
    packed = pack_codes(codes, bits)
    rows = torch.tensor([[0, 10, 3], [3, 5, 10]])
    for scale in (torch.tensor(0.5), torch.rand(11, 1) + 0.1):
        full = dequantize_packed(packed, bits, scale, shape, torch.float32)
        assert torch.equal(dequantize_packed_rows(packed, bits, scale, shape, torch.float32, rows), full[rows])


def test_invalid_packed_codes_names_the_problem():
    packed = pack_codes(torch.tensor([1, -1, 0, 2, -2]), 3)
    assert invalid_packed_codes(packed, 3, 5) is None
    assert "uint8 bytes" in invalid_packed_codes(packed[:1], 3, 5)
    assert "no 3-bit code produces" in invalid_packed_codes(torch.tensor([0b00000111], dtype=torch.uint8), 3, 2)
    padded = packed.clone()
    padded[-1] |= 0b10000000
    assert "padding" in invalid_packed_codes(padded, 3, 5)
    long_stream = pack_codes(_random_codes(3, (1000,), 0), 3)
    assert invalid_packed_codes(long_stream, 3, 1000, chunk=64) is None  # chunked reads agree with one read
    long_stream[-2] = 0xFF
    assert "no 3-bit code produces" in invalid_packed_codes(long_stream, 3, 1000, chunk=64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_packed_in_steps_equals_one_step(bits, monkeypatch):
    import hf_oscq.quantization.packing as module

    shape = (37, 29)  # 1073 codes: several steps of 64, and a partial last byte or group
    codes = _random_codes(bits, shape, 11)
    packed = pack_codes(codes, bits)
    for scale in (torch.tensor(0.25), torch.rand(37, 1) + 0.1):
        whole = dequantize_packed(packed, bits, scale, shape, torch.float32)
        monkeypatch.setattr(module, "_STEP", 64)
        assert torch.equal(dequantize_packed(packed, bits, scale, shape, torch.float32), whole)
        assert torch.equal(whole, (codes.float() * scale).reshape(shape))
        monkeypatch.undo()
