import numpy as np
import pytest
import torch
from _penalty_reference import reference_numpy
from torch import nn

from hf_oscq import fused_oscillation_penalty, oscillation_penalty, select_weights


@pytest.mark.parametrize("normalization", ["layer_mean", "global_mean"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_and_fused_match_hand_formula(bits, per_channel, normalization):
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(7, 6), nn.BatchNorm1d(6)).double()
    with torch.no_grad():  # exact ties at the maximum magnitude, split evenly like torch.amax
        model[2].weight[0, :2] = 2.0
        model[2].weight[3, 4] = -2.0
    weights = select_weights(model)
    expected_value, expected_grads = reference_numpy(
        [w.detach().numpy() for w in weights.values()], bits, per_channel, normalization
    )

    reference = oscillation_penalty(model, bits, per_channel=per_channel, normalization=normalization)
    reference_grads = torch.autograd.grad(reference, list(weights.values()))
    fused = fused_oscillation_penalty(
        weights, bits, per_channel, normalization=normalization, out_dims=[0] * len(weights)
    )
    fused_grads = torch.autograd.grad(fused, list(weights.values()))

    assert float(reference.detach()) == pytest.approx(expected_value, rel=1e-12)
    assert float(fused.detach()) == pytest.approx(expected_value, rel=1e-12)
    for ref, fast, hand in zip(reference_grads, fused_grads, expected_grads):
        np.testing.assert_allclose(ref.numpy(), hand, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(fast.numpy(), hand, rtol=1e-10, atol=1e-15)


def test_global_mean_pulls_every_layer_equally_and_weights_the_layer_means_by_size():
    # 2 bits, s = 1 in both layers (peak 1.0): a weight at 0.3 gets 2/N (q - w) = 2/N * -0.3 away from its peak.
    small = torch.tensor([0.3, 1.0, 0.0, 0.0], requires_grad=True)
    large = torch.zeros(396)
    large[0], large[1] = 0.3, 1.0
    large.requires_grad_()
    total = 400
    fused_oscillation_penalty([small, large], 2, normalization="global_mean").backward()
    assert small.grad[0] == pytest.approx(2 / total * -0.3, rel=1e-6)
    assert large.grad[0] == pytest.approx(2 / total * -0.3, rel=1e-6)
    # q^2 - w^2 = -0.09 at 0.3 and 0 elsewhere (peaks and zeros sit on the grid): per-layer means -0.09/4 and
    # -0.09/396; the global mean is -0.18/400, the size-weighted average of the two.
    layer_mean = fused_oscillation_penalty([small, large], 2, normalization="layer_mean")
    global_mean = fused_oscillation_penalty([small, large], 2, normalization="global_mean")
    assert float(layer_mean.detach()) == pytest.approx(-0.09 / 4 - 0.09 / 396, rel=1e-6)
    assert float(global_mean.detach()) == pytest.approx(-0.18 / 400, rel=1e-6)


def test_unknown_normalization_rejected():
    with pytest.raises(ValueError, match="normalization must be one of"):
        oscillation_penalty(nn.Linear(2, 2), 3, normalization="sum")
    with pytest.raises(ValueError, match="normalization must be one of"):
        fused_oscillation_penalty([torch.ones(2, 2)], 3, normalization="mean")


def test_gradient_pushes_towards_threshold():
    # w = 0.3 s sits near level 0: descent on (q^2 - w^2) moves it away from 0, towards the threshold 0.5 s.
    weight = torch.tensor([0.3, 1.0], requires_grad=True)  # 2 bits: s = 1, levels {-1, 0, 1}
    fused_oscillation_penalty([weight], 2).backward()
    assert weight.grad[0] < 0  # descent increases w towards 0.5


def test_non_finite_weights_named():
    model = nn.Sequential(nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match="'0.weight' contains NaN or Inf"):
        oscillation_penalty(model, 3)
    with pytest.raises(ValueError, match="'0.weight' contains NaN or Inf"):
        fused_oscillation_penalty(select_weights(model), 3)


def test_invalid_bits_rejected():
    with pytest.raises(ValueError, match="between 2 and 8"):
        oscillation_penalty(nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="between 2 and 8"):
        fused_oscillation_penalty([torch.ones(2, 2)], 9)


def test_ties_found_across_blocks_and_in_the_tail():
    # 3 * 4096 + 5 elements: peaks in two different blocks and in the partial tail block, on both signs.
    weight = torch.randn(3 * 4096 + 5, dtype=torch.float64)
    weight[17], weight[2 * 4096 + 1], weight[-2] = 9.0, -9.0, 9.0
    expected_value, (expected_grad,) = reference_numpy([weight.numpy()], 3)
    fused_weight = weight.clone().requires_grad_()
    fused = fused_oscillation_penalty([fused_weight], 3)
    fused.backward()
    assert float(fused.detach()) == pytest.approx(expected_value, rel=1e-12)
    np.testing.assert_allclose(fused_weight.grad.numpy(), expected_grad, rtol=1e-10, atol=1e-15)
