import numpy as np
import pytest
import torch
from torch import nn

from hf_oscq import fused_oscillation_penalty, oscillation_penalty, select_weights


def reference_numpy(weights, bits, per_channel=False):
    """Value and gradient of sum_l mean(q(W_l)^2 - W_l^2), written out by hand (float64)."""
    top = 2 ** (bits - 1) - 1
    value, grads = 0.0, []
    for w in weights:
        rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        grad_rows = np.zeros_like(rows)
        n = w.size
        for i, row in enumerate(rows):
            s = np.abs(row).max() / top
            r = np.round(row / s)
            q = r * s
            value += np.sum(q**2 - row**2) / n
            grad_rows[i] = 2 / n * (q - row)  # straight-through part
            dp_ds = 2 / n * np.sum(q * (r - row / s))  # dq/ds = round(w/s) - w/s
            peaks = np.flatnonzero(np.abs(row) == np.abs(row).max())
            grad_rows[i, peaks] += dp_ds * np.sign(row[peaks]) / top / len(peaks)
        grads.append(grad_rows.reshape(w.shape))
    return value, grads


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_and_fused_match_hand_formula(bits, per_channel):
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(7, 6), nn.BatchNorm1d(6)).double()
    with torch.no_grad():  # exact ties at the maximum magnitude, split evenly like torch.amax
        model[2].weight[0, :2] = 2.0
        model[2].weight[3, 4] = -2.0
    weights = select_weights(model)
    expected_value, expected_grads = reference_numpy([w.detach().numpy() for w in weights.values()], bits, per_channel)

    reference = oscillation_penalty(model, bits, per_channel=per_channel)
    reference_grads = torch.autograd.grad(reference, list(weights.values()))
    fused = fused_oscillation_penalty(weights, bits, per_channel)
    fused_grads = torch.autograd.grad(fused, list(weights.values()))

    assert float(reference.detach()) == pytest.approx(expected_value, rel=1e-12)
    assert float(fused.detach()) == pytest.approx(expected_value, rel=1e-12)
    for ref, fast, hand in zip(reference_grads, fused_grads, expected_grads):
        np.testing.assert_allclose(ref.numpy(), hand, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(fast.numpy(), hand, rtol=1e-10, atol=1e-15)


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
