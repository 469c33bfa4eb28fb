"""The fused kernels against the reference formulations (`primitives.fake_quantize`, `penalty.oscillation_penalty`);
tests/quantization/test_penalty.py also checks both against the paper's formula written out in numpy."""

import pytest
import torch
from torch import nn

from hf_oscq import (
    PenaltyWorkspace,
    fake_quantize,
    fused_fake_quantize,
    fused_oscillation_penalty,
    oscillation_penalty,
    select_weights,
)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_fused_fake_quantize_equals_autograd_reference(bits, per_channel):
    weight = torch.randn(6, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        weight[1, 0, 0], weight[4, 2, 2] = 4.0, -4.0  # ties at the peak, on both signs
    upstream = torch.randn(6, 5, 3, dtype=torch.float64)
    reference, fused = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    reference_out = fake_quantize(reference, bits, per_channel, out_dim=0)
    fused_out = fused_fake_quantize(fused, bits, per_channel, out_dim=0)
    (reference_out * upstream).sum().backward()
    (fused_out * upstream).sum().backward()
    assert torch.equal(fused_out, reference_out.detach())
    torch.testing.assert_close(fused.grad, reference.grad, rtol=1e-12, atol=1e-14)
    assert not torch.equal(fused.grad, upstream)  # the scale path does contribute


def test_fused_float32_matches_reference_across_steps_and_upstream_gradient():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.Flatten(), nn.Linear(32, 64, bias=False))
    weights = select_weights(model)
    workspace = PenaltyWorkspace()
    for _ in range(3):  # the workspace is reused across steps
        fused = fused_oscillation_penalty(weights, 3, workspace=workspace)
        fused_grads = torch.autograd.grad(2.5 * fused, list(weights.values()))
        reference = oscillation_penalty(model, 3)
        reference_grads = torch.autograd.grad(2.5 * reference, list(weights.values()))
        torch.testing.assert_close(fused, reference.detach(), rtol=1e-5, atol=1e-7)
        for fast, ref in zip(fused_grads, reference_grads):
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-9)
        with torch.no_grad():
            for w in weights.values():
                w.add_(0.01 * torch.randn_like(w))


def test_workspace_reused_before_backward_is_an_error():
    weights = [torch.randn(5, 4, requires_grad=True)]
    workspace = PenaltyWorkspace()
    first = fused_oscillation_penalty(weights, 3, workspace=workspace)
    fused_oscillation_penalty(weights, 3, workspace=workspace)
    with pytest.raises(RuntimeError, match="computed again with the same PenaltyWorkspace"):
        first.backward()
