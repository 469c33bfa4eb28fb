"""Group-wise and per-channel scales along the output dimension, checked against hand formulas written in numpy."""

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import hf_oscq
from hf_oscq import QuantSpec, compute_scale, dequantize, fake_quantize, quantize_codes
from hf_oscq.errors import OscqValueError
from hf_oscq.quantization.fused import fused_fake_quantize, fused_oscillation_penalty
from hf_oscq.quantization.layout import expand_scale, scale_shape
from hf_oscq.quantization.primitives import sharded_codes
from hf_oscq.quantization.selection import output_dim, output_dims, select_weights

GROUP4 = QuantSpec(3, "group", group_size=4)


def hand_quantize(rows: np.ndarray, group: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales of a matrix whose rows are output channels, `group` consecutive inputs per scale."""
    top = 2 ** (bits - 1) - 1
    out, fan_in = rows.shape
    codes, scales = np.zeros_like(rows), np.zeros((out, fan_in // group))
    for r in range(out):
        for j in range(fan_in // group):
            block = rows[r, j * group : (j + 1) * group]
            s = np.abs(block).max() / top
            scales[r, j] = s
            codes[r, j * group : (j + 1) * group] = np.round(block / s) if s else 0  # numpy rounds half to even
    return codes, scales


def test_spec_group_size_is_validated_and_serialized():
    assert GROUP4.to_dict()["group_size"] == 4 and QuantSpec.from_dict(GROUP4.to_dict()) == GROUP4
    assert "group_size" not in QuantSpec(3).to_dict()
    for bad in (None, 0, -32, 2.5, True):
        with pytest.raises(OscqValueError, match="needs group_size"):
            QuantSpec(3, "group", group_size=bad)
    with pytest.raises(OscqValueError, match="only used with granularity='group'"):
        QuantSpec(3, "per_channel", group_size=32)
    assert "group of 4 input features" in GROUP4.describe_granularity


def test_linear_layout_group_codes_and_scales_match_hand_formula():
    torch.manual_seed(0)
    weight = torch.randn(5, 12, dtype=torch.float64)
    codes, scale = quantize_codes(weight, spec=GROUP4, out_dim=0)
    want_codes, want_scales = hand_quantize(weight.numpy(), 4, 3)
    assert scale.shape == (5, 3) == scale_shape(weight.shape, GROUP4)
    np.testing.assert_allclose(scale.numpy(), want_scales, rtol=1e-15)
    np.testing.assert_array_equal(codes.numpy(), want_codes)
    want = want_codes * np.repeat(want_scales, 4, axis=1)
    np.testing.assert_allclose(fake_quantize(weight, spec=GROUP4, out_dim=0).numpy(), want, rtol=1e-15)
    np.testing.assert_allclose(dequantize(codes, scale, out_dim=0).numpy(), want, rtol=1e-15)


@pytest.mark.parametrize("spec", [QuantSpec(4, "per_channel"), QuantSpec(4, "group", group_size=3)])
def test_conv1d_scales_run_along_its_output_columns(spec):
    torch.manual_seed(1)
    layer = Conv1D(nf=4, nx=6)  # weight (in=6, out=4): output channels are columns
    weight = layer.weight.detach().double()
    assert output_dim(layer) == 1 and output_dim(nn.Linear(6, 4)) == 0
    group = 6 if spec.per_channel else 3
    want_codes, want_scales = hand_quantize(weight.numpy().T, group, 4)
    codes, scale = quantize_codes(weight, spec=spec, out_dim=1)
    np.testing.assert_array_equal(codes.numpy(), want_codes.T)
    np.testing.assert_allclose(scale.reshape(4, -1).numpy(), want_scales, rtol=1e-15)
    want = (want_codes * np.repeat(want_scales, group, axis=1)).T
    np.testing.assert_allclose(fake_quantize(weight, spec=spec, out_dim=1).numpy(), want, rtol=1e-15)
    np.testing.assert_allclose(dequantize(codes, scale, out_dim=1).numpy(), want, rtol=1e-15)
    np.testing.assert_allclose(fused_fake_quantize(weight, spec=spec, out_dim=1).numpy(), want, rtol=1e-15)


def test_conv2d_groups_cover_flattened_input_features():
    torch.manual_seed(2)
    weight = torch.randn(3, 2, 2, 2, dtype=torch.float64)  # fan_in 8 = in_channels * kernel
    want_codes, want_scales = hand_quantize(weight.reshape(3, 8).numpy(), 4, 3)
    codes, scale = quantize_codes(weight, spec=GROUP4, out_dim=0)
    np.testing.assert_array_equal(codes.reshape(3, 8).numpy(), want_codes)
    np.testing.assert_allclose(scale.numpy(), want_scales, rtol=1e-15)
    assert compute_scale(weight, spec=QuantSpec(3, "per_channel"), out_dim=0).shape == (3, 1, 1, 1)


def test_group_size_that_does_not_divide_is_refused():
    with pytest.raises(OscqValueError, match="group_size=4 does not divide the 6 input features"):
        quantize_codes(torch.randn(2, 6), spec=GROUP4, out_dim=0)


def _hand_gradient(w: np.ndarray, upstream: np.ndarray, group: int, bits: int, penalty: bool) -> np.ndarray:
    """d/dw of sum(upstream * q(w)) (penalty=False) or of mean(q^2 - w^2) (penalty=True), rows = output channels:
    straight-through per element, plus per group dL/ds = sum(dL/dq * (round(w/s) - w/s)) reaching its peak element
    as sign(w) / top."""
    top = 2 ** (bits - 1) - 1
    codes, scales = hand_quantize(w, group, bits)
    s_full = np.repeat(scales, group, axis=1)
    q = codes * s_full
    n = w.size
    dl_dq = 2 * q / n if penalty else upstream
    grad = (2 * (q - w) / n) if penalty else upstream.copy()
    for r in range(w.shape[0]):
        for j in range(w.shape[1] // group):
            cols = slice(j * group, (j + 1) * group)
            dl_ds = np.sum(dl_dq[r, cols] * (codes[r, cols] - w[r, cols] / scales[r, j]))
            peak = j * group + np.abs(w[r, cols]).argmax()
            grad[r, peak] += dl_ds * np.sign(w[r, peak]) / top
    return grad


@pytest.mark.parametrize("out_dim", [0, 1])
def test_fake_quantize_gradient_per_group_matches_hand_formula(out_dim):
    torch.manual_seed(3)
    rows = torch.randn(3, 8, dtype=torch.float64)
    upstream = torch.randn(3, 8, dtype=torch.float64)
    want = _hand_gradient(rows.numpy(), upstream.numpy(), 4, 3, penalty=False)
    stored = rows.clone() if out_dim == 0 else rows.T.clone()
    stored_upstream = upstream if out_dim == 0 else upstream.T
    for quantizer in (fake_quantize, fused_fake_quantize):
        weight = stored.clone().requires_grad_(True)
        (quantizer(weight, spec=GROUP4, out_dim=out_dim) * stored_upstream).sum().backward()
        got = weight.grad if out_dim == 0 else weight.grad.T
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-14)


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(4)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=12, n_positions=8, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def test_penalty_value_and_gradient_per_group_on_gpt2_match_hand_formula():
    model = _gpt2()
    spec = QuantSpec(3, "group", ("c_attn", "c_proj", "c_fc"), group_size=4)
    weights = select_weights(model, spec=spec)
    dims = output_dims(model, weights)
    assert dims == [1, 1, 1, 1]  # every GPT-2 projection is a Conv1D
    rows = {name: weight.detach().T.numpy() for name, weight in weights.items()}
    want_value = 0.0
    for w in rows.values():
        codes, scales = hand_quantize(w, 4, 3)
        want_value += np.mean((codes * np.repeat(scales, 4, axis=1)) ** 2 - w**2)
    reference = hf_oscq.oscillation_penalty(model, spec=spec)
    fused = fused_oscillation_penalty(weights, spec=spec, out_dims=dims)
    assert float(reference.detach()) == pytest.approx(want_value, rel=1e-12)
    assert float(fused) == pytest.approx(want_value, rel=1e-12)
    for penalty in (reference, fused):
        model.zero_grad()
        penalty.backward()
        for name, weight in weights.items():
            want = _hand_gradient(rows[name], None, 4, 3, penalty=True).T
            np.testing.assert_allclose(weight.grad.numpy(), want, rtol=1e-9, atol=1e-15, err_msg=name)


def test_ptq_qat_and_tracking_round_gpt2_columns():
    model = _gpt2()
    spec = QuantSpec(4, "per_channel", ("c_attn",))
    weight = model.transformer.h[0].attn.c_attn.weight.detach()
    codes, scales = hand_quantize(weight.numpy().T, weight.shape[0], 4)
    want = (codes * scales).T
    rounded = hf_oscq.quantize_model(model, spec=spec).transformer.h[0].attn.c_attn.weight
    np.testing.assert_allclose(rounded.detach().numpy(), want, rtol=1e-15)
    [(_, got_codes, _)] = sharded_codes([weight], spec, [1])
    np.testing.assert_array_equal(got_codes.numpy(), codes.T)
    # QAT: the forward pass sees the same column-wise rounding
    ids = torch.tensor([[1, 5, 7, 2]])
    with hf_oscq.quantized_weights(model, spec=spec):
        expected = model(ids).logits
    with hf_oscq.fake_quantized_forward(model, select_weights(model, spec=spec), spec=spec):
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_expand_scale_broadcasts_stored_scales():
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (out=3, groups=2)
    assert expand_scale(scale, (3, 4)).tolist() == [[1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6]]
    assert expand_scale(scale, (4, 3), out_dim=1).tolist() == [[1, 3, 5], [1, 3, 5], [2, 4, 6], [2, 4, 6]]


@pytest.mark.parametrize(
    "shape, scale_shape, out_dim",
    [((0, 5), (0, 1), 0), ((0, 6), (0, 2), 0), ((5, 0), (0, 1), 1), ((0, 3, 2, 2), (0, 1, 1, 1), 0)],
)
def test_expand_scale_of_a_weight_without_output_channels(shape, scale_shape, out_dim):
    """An FSDP2 process may hold no row of a weight: per-channel and group-wise scales then have no row either, in
    every layout (output channels in dim 0 or 1, Linear or Conv)."""
    assert expand_scale(torch.zeros(scale_shape), shape, out_dim).shape == shape


@pytest.mark.parametrize("spec", [QuantSpec(4, "per_channel"), QuantSpec(4, "group", group_size=4)])
def test_hand_calls_on_a_conv1d_weight_need_out_dim_and_then_equal_the_model_path(spec):
    """`quantize_codes(conv1d.weight, per_channel=True)` used to give one scale per input feature. A 2-D tensor cannot
    say whether it is `(out, in)` (Linear) or `(in, out)` (GPT-2's Conv1D), so every hand-called function refuses
    per-channel and group-wise scales of a weight of 2 or more dimensions without `out_dim`, naming
    `hf_oscq.output_dim`: compute_scale, quantize_codes, fake_quantize, dequantize, fused_fake_quantize,
    fused_oscillation_penalty, plot_weight_histogram. With `out_dim=hf_oscq.output_dim(layer)` the hand path equals
    the model path (quantize_model, export) and the hand formula; per tensor and 1-D weights need no `out_dim`."""
    import io

    model = _gpt2()
    layer = model.transformer.h[0].attn.c_attn
    weight = layer.weight.detach()  # (in=8, out=24)
    message = r"does not say which: pass out_dim=hf_oscq.output_dim\(layer\)"
    calls = [
        lambda: compute_scale(weight, spec=spec),
        lambda: quantize_codes(weight, spec=spec),
        lambda: fake_quantize(weight, spec=spec),
        lambda: fused_fake_quantize(weight, spec=spec),
        lambda: dequantize(torch.zeros(weight.shape, dtype=torch.int8), torch.ones(24, 1)),
        lambda: fused_oscillation_penalty([weight], spec=spec),
        lambda: hf_oscq.plot_weight_histogram(weight, spec=spec, path=io.BytesIO()),
    ]
    for call in calls:
        with pytest.raises(OscqValueError, match=message):
            call()
    out_dim = hf_oscq.output_dim(layer)
    codes, scale = quantize_codes(weight, spec=spec, out_dim=out_dim)
    assert scale.shape[0] == 24  # one row of scales per output feature, not per input feature
    group = 8 if spec.per_channel else 4
    want_codes, want_scales = hand_quantize(weight.numpy().T, group, 4)
    np.testing.assert_array_equal(codes.numpy(), want_codes.T)
    np.testing.assert_allclose(scale.reshape(24, -1).numpy(), want_scales, rtol=1e-15)
    rounded = hf_oscq.quantize_model(model, spec=spec).transformer.h[0].attn.c_attn.weight.detach()
    assert torch.equal(dequantize(codes, scale, out_dim=out_dim), rounded)
    assert torch.equal(fake_quantize(weight, spec=spec, out_dim=out_dim), rounded)
    assert torch.equal(fused_fake_quantize(weight, spec=spec, out_dim=out_dim), rounded)
    per_tensor = quantize_codes(weight, 4)  # one scale: no output dimension involved
    assert per_tensor[1].dim() == 0
    assert quantize_codes(torch.randn(5), 4, per_channel=True)[1].shape == (5,)  # 1-D: one layout only
    with pytest.raises(OscqValueError, match="out_dim=2 is not a dimension of a weight of shape"):
        quantize_codes(weight, spec=spec, out_dim=2)
