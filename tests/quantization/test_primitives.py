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
    codes, scale = quantize_codes(weight, bits)
    top = 2 ** (bits - 1) - 1
    assert max_code(bits) == top
    assert float(scale) == pytest.approx(1.0 / top)
    assert sorted(codes.unique().tolist()) == list(range(-top, top + 1))  # 2**b - 1 levels
    values = fake_quantize(weight, bits)
    assert torch.equal(values, dequantize(codes, scale))
    np.testing.assert_allclose(np.unique(values.numpy()), np.arange(-top, top + 1) / top, atol=1e-15)


def test_two_bits_is_ternary():
    weight = torch.tensor([-0.9, -0.2, 0.0, 0.3, 0.6, 0.9])
    codes, scale = quantize_codes(weight, 2)
    assert float(scale) == pytest.approx(0.9)
    assert codes.tolist() == [-1, 0, 0, 0, 1, 1]


def test_round_half_to_even():
    # scale = 4 / 7 at 4 bits; w = k.5 * scale sits exactly on a rounding threshold
    scale = 4.0 / 7.0
    weight = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 7.0], dtype=torch.float64) * scale
    codes, _ = quantize_codes(weight, 4)
    assert codes.tolist() == [0, 2, 2, 0, -2, 7]


def test_straight_through_and_scale_gradient():
    weight = torch.tensor([0.11, -0.52, 0.37, -1.0, 0.74], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([0.3, -1.2, 0.7, 0.5, 2.0], dtype=torch.float64)
    (fake_quantize(weight, 3) * upstream).sum().backward()
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
    scale = compute_scale(weight, 3, per_channel=True)
    assert scale.shape == (2, 1)
    torch.testing.assert_close(scale.flatten(), torch.tensor([0.7 / 3, 1.0]))
    codes, _ = quantize_codes(weight, 3, per_channel=True)
    assert codes.tolist() == [[0, -3, 1], [3, 1, -2]]
    conv = torch.randn(4, 2, 3, 3)
    assert compute_scale(conv, 4, per_channel=True).shape == (4, 1, 1, 1)


def test_all_zero_tensor_stays_zero_without_nan():
    weight = torch.zeros(3, 4, requires_grad=True)
    values = fake_quantize(weight, 3)
    values.sum().backward()
    assert torch.equal(values, torch.zeros(3, 4))
    assert torch.isfinite(weight.grad).all()
    codes, scale = quantize_codes(weight, 5, per_channel=True)
    assert torch.equal(codes, torch.zeros(3, 4, dtype=torch.int8)) and torch.equal(scale, torch.zeros(3, 1))


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, 3.0, "3", True, None])
def test_invalid_bits(bits):
    with pytest.raises(ValueError, match="between 2 and 8"):
        validate_bits(bits)
    with pytest.raises(ValueError, match="between 2 and 8"):
        fake_quantize(torch.ones(2), bits)


def test_non_finite_weight_error_names_parameter():
    with pytest.raises(ValueError, match="'encoder.fc.weight' contains NaN or Inf"):
        check_finite(torch.tensor([1.0, float("nan")]), "encoder.fc.weight")
    check_finite(torch.tensor([1.0, -2.0]), "ok")
