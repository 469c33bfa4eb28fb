import pytest
import torch
from torch import nn

from hf_oscq import fake_quantize, fake_quantized_forward, quantize_model, select_weights


def net():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def test_forward_sees_quantized_weights_and_names_are_kept():
    model = net()
    inputs = torch.randn(4, 6)
    names_before = [name for name, _ in model.named_parameters()]
    weights = select_weights(model)
    with fake_quantized_forward(model, weights, 3):
        output = model(inputs)
        assert [name for name, _ in model.named_parameters()] == names_before
    expected = quantize_model(model, 3)(inputs)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())  # latent weights are back


def test_gradient_reaches_latent_weights_through_ste():
    model = net()
    inputs = torch.randn(4, 6)
    weights = select_weights(model)
    with fake_quantized_forward(model, weights, 4):
        model(inputs).square().sum().backward()
    # same gradient as the explicit functional form: f(fake_quantize(W1), b1, fake_quantize(W2), b2)
    w1, w2 = (model[0].weight.detach().clone().requires_grad_(), model[2].weight.detach().clone().requires_grad_())
    hidden = torch.tanh(inputs @ fake_quantize(w1, 4).T + model[0].bias.detach())
    (hidden @ fake_quantize(w2, 4).T + model[2].bias.detach()).square().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, w1.grad)
    torch.testing.assert_close(model[2].weight.grad, w2.grad)


def test_calls_through_a_wrapper_see_quantized_weights():
    model = net()

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    wrapper = Wrapper(model)
    inputs = torch.randn(2, 6)
    with fake_quantized_forward(model, select_weights(model), 2):
        output = wrapper(inputs)
    torch.testing.assert_close(output, quantize_model(model, 2)(inputs), rtol=0, atol=0)


def test_tied_weights_are_quantized_in_every_module_that_uses_them():
    embedding, head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    weights = select_weights(model)
    assert list(weights) == ["embedding.weight"]  # selected once
    tokens = torch.tensor([0, 3, 6])
    with fake_quantized_forward(model, weights, 3):
        logits = head(embedding(tokens))
    grid = fake_quantize(embedding.weight.detach(), 3)
    torch.testing.assert_close(logits, grid[tokens] @ grid.T, rtol=0, atol=0)


def test_latent_weights_are_restored_when_the_forward_pass_fails():
    model = net()
    before = model[0].weight
    with fake_quantized_forward(model, select_weights(model), 3):
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            model(torch.randn(2, 5))  # fails inside the first Linear, after its weight was swapped
        assert model[0].weight is before
    assert model[0].weight is before and not model[0]._forward_pre_hooks and not model[0]._forward_hooks
