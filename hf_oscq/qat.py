"""Quantization-aware training: forward passes through fake-quantized weights, without touching the module tree."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import stateless

from .quantizer import fused_fake_quantize, validate_bits


def _prefix_of(wrapper: nn.Module, model: nn.Module) -> str:
    """Name prefix of `model`'s parameters inside `wrapper` (`"module."` under DDP, `""` for the model itself)."""
    for name, module in wrapper.named_modules():
        if module is model:
            return f"{name}." if name else ""
    raise ValueError("The model is not a submodule of the module that runs the forward pass.")


@contextlib.contextmanager
def fake_quantized_forward(
    wrapper: nn.Module,
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    bits: int,
    per_channel: bool = False,
) -> Iterator[None]:
    """Within the block, forward passes of `wrapper` see the selected weights fake-quantized (with STE).

    The latent full-precision parameters stay registered under their own names (no parametrization, no renamed
    parameters), so `state_dict`, `save_pretrained` and the optimizer are unaffected; their gradients arrive
    through the straight-through estimator and the (non-detached) scale.

    Args:
        wrapper: the module that is called (the model, or a DDP wrapper around it).
        model: the unwrapped model the weight names refer to.
        weights: the selected weights, as returned by `select_weights(model)`.
        bits: bit-width in [2, 8].
        per_channel: one scale per output channel.
    """
    validate_bits(bits)
    prefix = _prefix_of(wrapper, model)
    replacements = {prefix + name: fused_fake_quantize(weight, bits, per_channel) for name, weight in weights.items()}
    # torch.func.functional_call does the same swap but only around a call; the Trainer owns that call.
    with stateless._reparametrize_module(wrapper, replacements, tie_weights=True):
        yield
