import numpy as np
import pytest
import torch

from hf_oscq import (
    compute_scale,
    dequantize,
    fake_quantize,
    max_code,
    quantize_codes,
    validate_bits,
)
from hf_oscq.quantization.primitives import check_finite


@pytest.mark.parametrize("bits", range(2, 9))
def test_levels_and_grid(bits):
    weight = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
    codes, scale = quantize_codes(weight, bits, out_dim=0)
    top = 2 ** (bits - 1) - 1
    assert max_code(bits) == top
    assert float(scale) == pytest.approx(1.0 / top)
    assert sorted(codes.unique().tolist()) == list(range(-top, top + 1))  # 2**b - 1 levels
    values = fake_quantize(weight, bits, out_dim=0)
    assert torch.equal(values, dequantize(codes, scale, out_dim=0))
    np.testing.assert_allclose(np.unique(values.numpy()), np.arange(-top, top + 1) / top, atol=1e-15)


def test_two_bits_is_ternary():
    weight = torch.tensor([-0.9, -0.2, 0.0, 0.3, 0.6, 0.9])
    codes, scale = quantize_codes(weight, 2, out_dim=0)
    assert float(scale) == pytest.approx(0.9)
    assert codes.tolist() == [-1, 0, 0, 0, 1, 1]


def test_round_half_to_even():
    # scale = 4 / 7 at 4 bits; w = k.5 * scale sits exactly on a rounding threshold
    scale = 4.0 / 7.0
    weight = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 7.0], dtype=torch.float64) * scale
    codes, _ = quantize_codes(weight, 4, out_dim=0)
    assert codes.tolist() == [0, 2, 2, 0, -2, 7]


def test_straight_through_and_scale_gradient():
    weight = torch.tensor([0.11, -0.52, 0.37, -1.0, 0.74], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([0.3, -1.2, 0.7, 0.5, 2.0], dtype=torch.float64)
    (fake_quantize(weight, 3, out_dim=0) * upstream).sum().backward()
    # q = s * round(w / s), s = max|w| / 3: dq_i/dw_i = 1 (STE), dq_i/ds = round(w_i / s) - w_i / s,
    # ds/dw_j = sign(w_j) / 3 for the largest-magnitude element j.
    w = weight.detach().numpy()
    s = np.abs(w).max() / 3
    expected = upstream.numpy().copy()
    j = np.abs(w).argmax()
    expected[j] += np.sum(upstream.numpy() * (np.round(w / s) - w / s)) * np.sign(w[j]) / 3
    np.testing.assert_allclose(weight.grad.numpy(), expected, rtol=1e-12)


def test_per_channel_scales():
    weight = torch.tensor([[0.1, -0.7, 0.2], [3.0, 1.0, -2.0]])
    scale = compute_scale(weight, 3, per_channel=True, out_dim=0)
    assert scale.shape == (2, 1)
    torch.testing.assert_close(scale.flatten(), torch.tensor([0.7 / 3, 1.0]))
    codes, _ = quantize_codes(weight, 3, per_channel=True, out_dim=0)
    assert codes.tolist() == [[0, -3, 1], [3, 1, -2]]
    conv = torch.randn(4, 2, 3, 3)
    assert compute_scale(conv, 4, per_channel=True, out_dim=0).shape == (4, 1, 1, 1)


def test_all_zero_tensor_stays_zero_without_nan():
    weight = torch.zeros(3, 4, requires_grad=True)
    values = fake_quantize(weight, 3, out_dim=0)
    values.sum().backward()
    assert torch.equal(values, torch.zeros(3, 4))
    assert torch.isfinite(weight.grad).all()
    codes, scale = quantize_codes(weight, 5, per_channel=True, out_dim=0)
    assert torch.equal(codes, torch.zeros(3, 4, dtype=torch.int8)) and torch.equal(scale, torch.zeros(3, 1))


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, 3.0, "3", True, None])
def test_invalid_bits(bits):
    with pytest.raises(ValueError, match="between 2 and 8"):
        validate_bits(bits)
    with pytest.raises(ValueError, match="between 2 and 8"):
        fake_quantize(torch.ones(2), bits, out_dim=0)


def test_non_finite_weight_error_names_parameter():
    with pytest.raises(ValueError, match="'encoder.fc.weight' contains NaN or Inf"):
        check_finite(torch.tensor([1.0, float("nan")]), "encoder.fc.weight")
    check_finite(torch.tensor([1.0, -2.0]), "ok")


# Every dtype: the codes and scales of float16 / bfloat16 weights are those of the same weights in float32, and the
# scale used to round is the scale stored and multiplied back (quantize_codes, sharded_codes, fused fake-quantize,
# fused penalty).
from hf_oscq import (  # noqa: E402
    QuantSpec,  # noqa: E402
    fused_fake_quantize,
    fused_oscillation_penalty,
    oscillation_penalty,
)
from hf_oscq.quantization.primitives import sharded_codes  # noqa: E402

HALF_DTYPES = [torch.float16, torch.bfloat16]


def _half_weight(dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 40, generator=generator) * 0.05
    weight[2] *= 0.02  # a channel with max |w| around 1e-3
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_half_precision_codes_and_scales_equal_the_float32_path(dtype, per_channel, bits):
    weight = _half_weight(dtype)
    codes, scale = quantize_codes(weight, bits, per_channel, out_dim=0)
    codes32, scale32 = quantize_codes(weight.float(), bits, per_channel, out_dim=0)
    assert scale.dtype == torch.float32 and torch.equal(scale, scale32) and torch.equal(codes, codes32)
    ((_, sharded, sharded_scale),) = sharded_codes(
        [weight], QuantSpec(bits, "per_channel" if per_channel else "per_tensor")
    )
    assert torch.equal(sharded, codes32) and torch.equal(sharded_scale, scale32)
    # independent formula, in float64: s = max|w| / top, |codes * s - w| <= s / 2
    w64 = weight.double()
    top = 2 ** (bits - 1) - 1
    peak = w64.abs().amax(dim=1, keepdim=True) if per_channel else w64.abs().amax()
    torch.testing.assert_close(scale.double(), peak / top, rtol=2**-23, atol=0)
    error = (codes.double() * scale.double() - w64).abs()
    assert bool((error <= scale.double() / 2 * (1 + 2**-20)).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF_DTYPES])
def test_dequantized_error_is_at_most_half_a_scale_in_every_dtype(dtype):
    for bits in range(2, 9):
        weight = _half_weight(dtype)
        codes, scale = quantize_codes(weight, bits, per_channel=True, out_dim=0)
        error = (dequantize(codes, scale, out_dim=0).double() - weight.double()).abs()
        assert bool((error <= scale.double() / 2 * (1 + 2**-20)).all()), bits


def test_float16_small_channel_at_eight_bits_keeps_its_scale():
    # max |w| = 1e-3 at 8 bits: s = 1e-3 / 127 ~ 7.9e-6 is below the smallest normal float16 (6.1e-5); the codes
    # must be computed with that scale, not a clamped one (which shrank the weights 8x).
    weight = torch.tensor([[1e-3, -4e-4, 2.6e-4, 0.0], [0.5, -0.3, 0.1, 0.0]], dtype=torch.float16)
    codes, scale = quantize_codes(weight, 8, per_channel=True, out_dim=0)
    w64 = weight.double()
    expected_codes = torch.round(w64 / (w64.abs().amax(dim=1, keepdim=True) / 127))
    assert torch.equal(codes.double(), expected_codes) and codes[0, 0] == 127
    values = dequantize(codes, scale, out_dim=0)
    assert bool(((values.double() - w64).abs() <= scale.double() / 2 * (1 + 2**-20)).all())
    restored = values.to(torch.float16)
    assert restored[0, 0] == weight[0, 0]  # the channel's largest weight comes back, not 8x smaller
    quantized = fake_quantize(weight, 8, per_channel=True, out_dim=0)
    assert quantized.dtype == torch.float16 and torch.equal(quantized, restored)
    assert torch.equal(fused_fake_quantize(weight, 8, per_channel=True, out_dim=0), restored)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_paths_in_half_precision_equal_the_float32_quantization(dtype, per_channel):
    weight = _half_weight(dtype).requires_grad_(True)
    codes, scale = quantize_codes(weight, 3, per_channel, out_dim=0)
    expected = dequantize(codes, scale, out_dim=0).to(dtype)
    assert torch.equal(fake_quantize(weight, 3, per_channel, out_dim=0), expected)
    fused = fused_fake_quantize(weight, 3, per_channel, out_dim=0)
    assert fused.dtype == dtype and torch.equal(fused, expected)
    fused.sum().backward()
    assert weight.grad.dtype == dtype
    weight.grad = None
    model = torch.nn.Linear(40, 6, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(weight)
    reference = oscillation_penalty(model, 3, per_channel=per_channel)
    value = fused_oscillation_penalty({"weight": model.weight}, 3, per_channel, out_dims=[0])
    torch.testing.assert_close(value, reference.float(), rtol=1e-6, atol=1e-9)
    value.backward()
    assert model.weight.grad.dtype == dtype
