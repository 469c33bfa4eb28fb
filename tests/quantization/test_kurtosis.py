"""KURE's kurtosis penalty against independent formulas: scipy's kurtosis (population moments) for the value, and
autograd through a plain float64 formula for the gradient."""

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from hf_oscq import OscqValueError, QuantSpec, kurtosis_penalty, select_weights
from hf_oscq.quantization.kurtosis import UNIFORM_KURTOSIS, weight_kurtosis


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():  # one layer far from normal: a few large weights (heavy tails)
        net[2].weight[0, :6] = torch.tensor([2.0, -2.5, 3.0, -1.8, 2.2, -3.1])
    return net


def _reference(weights, target):
    """The penalty and its gradient by autograd through the plain float64 formula (population moments)."""
    copies = [weight.detach().double().requires_grad_() for weight in weights]
    terms = []
    for w in copies:
        d = w - w.mean()
        terms.append(((d**4).mean() / (d**2).mean() ** 2 - target) ** 2)
    value = torch.stack(terms).mean()
    value.backward()
    return value.item(), [w.grad for w in copies]


def test_kurtosis_of_each_layer_is_scipys_with_population_moments():
    weights = select_weights(_net())
    expected = [scipy.stats.kurtosis(w.detach().numpy().ravel(), fisher=False, bias=True) for w in weights.values()]
    found = weight_kurtosis(weights).detach()
    assert found.dtype == torch.float32 and found.shape == (3,)
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-5)
    assert float(found[1]) > 4  # the heavy-tailed layer


@pytest.mark.parametrize("target", [UNIFORM_KURTOSIS, 3.0])
def test_penalty_and_gradient_equal_the_plain_formula(target):
    net = _net()
    weights = select_weights(net)
    value = kurtosis_penalty(net, target=target)
    value.backward()
    expected, grads = _reference(weights.values(), target)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    for (name, weight), grad in zip(weights.items(), grads):
        torch.testing.assert_close(weight.grad.double(), grad, rtol=1e-4, atol=1e-9, msg=name)


def test_selection_follows_the_spec_and_half_precision_is_computed_in_float32():
    net = _net()
    spec = QuantSpec(3, exclude_modules=["4"])
    expected, _ = _reference([net[0].weight, net[2].weight], UNIFORM_KURTOSIS)
    assert kurtosis_penalty(net, spec=spec).item() == pytest.approx(expected, rel=1e-5)
    assert kurtosis_penalty(net, exclude_modules=["4"]).item() == pytest.approx(expected, rel=1e-5)
    half = kurtosis_penalty(_net().to(torch.bfloat16), spec=spec)
    reference, _ = _reference([net[0].weight.bfloat16(), net[2].weight.bfloat16()], UNIFORM_KURTOSIS)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(reference, rel=1e-4)


def test_a_constant_layer_has_no_kurtosis_and_counts_zero_without_nan():
    net = _net()
    with torch.no_grad():
        net[4].weight.fill_(0.25)
    value = kurtosis_penalty(net)
    value.backward()
    expected, grads = _reference([net[0].weight, net[2].weight], UNIFORM_KURTOSIS)
    assert value.item() == pytest.approx(expected * 2 / 3, rel=1e-5)  # the mean over all three layers
    assert torch.equal(net[4].weight.grad, torch.zeros_like(net[4].weight))
    torch.testing.assert_close(net[0].weight.grad.double(), grads[0] * 2 / 3, rtol=1e-4, atol=1e-9)
    assert torch.isnan(weight_kurtosis({"w": net[4].weight})).all()


@pytest.mark.parametrize("target", [0.5, float("nan"), float("inf"), True, "1.8"])
def test_invalid_targets_are_refused(target):
    with pytest.raises(OscqValueError, match="kurtosis target must be a finite number >= 1"):
        kurtosis_penalty(_net(), target=target)
