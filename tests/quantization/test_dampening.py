"""Nagel et al.'s oscillation dampening term against an independent numpy quantizer: the value
`sum over layers of mean((q(W) - W)^2)` and its gradient `2 / N_l * (W - q(W))` (the grid point detached), per tensor,
per channel and group-wise, for weights whose output channels are dim 0 (Linear, Conv) and dim 1 (GPT-2's Conv1D)."""

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_oscq import OscqValueError, QuantSpec, dampening_penalty, select_weights
from hf_oscq.quantization.dampening import weights_dampening_penalty


def _grid(w: np.ndarray, bits: int, granularity: str, out_dim: int, group_size: int | None) -> np.ndarray:
    """q(w) with numpy: output channel first, groups of input features, scale max|w| / (2^(b-1) - 1), round half to
    even."""
    top = 2 ** (bits - 1) - 1
    moved = np.moveaxis(w, out_dim, 0)
    rows = moved.reshape(1, -1) if granularity == "per_tensor" else moved.reshape(moved.shape[0], -1)
    if granularity == "group":
        rows = rows.reshape(-1, group_size)
    scale = np.abs(rows).max(axis=1, keepdims=True) / top
    q = np.round(rows / np.where(scale == 0, 1, scale)) * scale
    return np.moveaxis(q.reshape(moved.shape), 0, out_dim)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3)
        self.proj = Conv1D(8, 12)  # GPT-2's layer: weight (in=12, out=8)
        self.head = nn.Linear(8, 3)


@pytest.mark.parametrize("granularity, group_size", [("per_tensor", None), ("per_channel", None), ("group", 6)])
@pytest.mark.parametrize("bits", [2, 4])
def test_value_and_gradient_equal_the_numpy_formula(granularity, group_size, bits):
    net = _Net()
    if granularity == "group":  # the head's 8 and the conv's 18 input features are not multiples of 6
        spec = QuantSpec(bits, granularity, target_modules=["proj"], group_size=group_size)
    else:
        spec = QuantSpec(bits, granularity)
    value = dampening_penalty(net, spec=spec)
    value.backward()
    expected = 0.0
    for name, weight in select_weights(net, spec=spec).items():
        w = weight.detach().double().numpy()
        out_dim = 1 if name.startswith("proj") else 0
        q = _grid(w, bits, granularity, out_dim, group_size)
        expected += float(((q - w) ** 2).mean())
        np.testing.assert_allclose(weight.grad.double().numpy(), 2 / w.size * (w - q), rtol=1e-5, atol=1e-9)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_the_pull_is_towards_the_grid_point():
    weight = nn.Parameter(torch.tensor([[1.0, 0.4, -0.1, 0.6]]))  # 2 bits: grid {-1, 0, 1}
    value = weights_dampening_penalty({"w": weight}, QuantSpec(2))
    value.backward()
    assert weight.grad.tolist()[0] == pytest.approx([0.0, 0.2, -0.05, -0.2])  # 2/4 * (w - q)
    grid = torch.tensor([1.0, 0.0, 0.0, 1.0])
    step = weight.detach()[0] - 0.5 * weight.grad[0]  # a descent step moves each weight towards its grid point
    assert torch.all((step - grid).abs()[1:] < (weight.detach()[0] - grid).abs()[1:])


def test_a_nan_weight_is_named():
    net = _Net()
    with torch.no_grad():
        net.head.weight[0, 0] = float("nan")
    with pytest.raises(OscqValueError, match="'head.weight' contains NaN"):
        dampening_penalty(net, 3)
