import numpy as np
import pytest
import torch

from hf_oscq.scripts.toy import toy_trajectory


def test_qat_oscillates_around_the_threshold_and_averages_to_the_optimum():
    weights = toy_trajectory((0.75,), method="qat", steps=400, learning_rate=0.05)[:, 0]
    late = weights[200:]
    # q(w) alternates between the levels 0 and 1 and spends 3/4 of the time at 1.
    assert set(torch.round(late).tolist()) == {0.0, 1.0}
    assert abs(torch.round(late).mean().item() - 0.75) < 0.01
    # w stays within one step (lr * |q - w*| <= 0.0375) of the rounding threshold 0.5.
    assert late.min() < 0.5 < late.max()
    assert (late - 0.5).abs().max() < 0.05 * 0.75 + 1e-12
    switches = (torch.round(late[1:]) != torch.round(late[:-1])).sum().item()
    assert switches > 50


def test_full_precision_training_converges_without_oscillation():
    weights = toy_trajectory((0.75,), method="fp", steps=400)[:, 0]
    assert abs(weights[-1].item() - 0.75) < 1e-6
    assert torch.round(weights[200:]).unique().tolist() == [1.0]  # q(w) is stuck at 1: 0.25 away from w*


@pytest.mark.parametrize("optimum", [(0.75,), (0.75, 0.3)])
def test_regularizer_reproduces_qat_from_the_full_precision_loss(optimum):
    qat = toy_trajectory(optimum, method="qat")
    regularized = toy_trajectory(optimum, method="oscillation", osc_lambda=0.5)
    torch.testing.assert_close(regularized, qat, rtol=0, atol=1e-12)
    # Two weights: each time-average of q(w) approaches its own optimum.
    np.testing.assert_allclose(torch.round(qat[200:]).mean(0).numpy(), optimum, atol=0.01)


def test_invalid_toy_settings():
    with pytest.raises(ValueError, match="one or two weights"):
        toy_trajectory((0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="method"):
        toy_trajectory(method="ptq")
