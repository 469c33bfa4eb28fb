"""Quantization-aware training: forward passes through fake-quantized weights, without touching the module tree."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .fused import fused_fake_quantize
from .selection import output_dim
from .spec import QuantSpec, resolve_spec


def _owners(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[nn.Module, list[str]]:
    """Every module holding one of `weights` as its own parameter, with the attribute names (tied weights: all)."""
    wanted = {id(weight) for weight in weights.values()}
    owners: dict[nn.Module, list[str]] = defaultdict(list)
    for module in model.modules():
        for attribute, parameter in module._parameters.items():
            if parameter is not None and id(parameter) in wanted:
                owners[module].append(attribute)
    return owners


@contextlib.contextmanager
def fake_quantized_forward(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    bits: int | None = None,
    per_channel: bool | None = None,
    *,
    spec: QuantSpec | None = None,
) -> Iterator[None]:
    """Within the block, forward passes of `model` (or of a DDP / FSDP2 wrapping of it) see the selected weights
    fake-quantized, with the straight-through estimator.

    Each module owning a selected weight swaps it for `fused_fake_quantize(weight)` when its forward pass starts and
    back when it ends. The swap happens inside the module's call, after FSDP2 has gathered its parameters, so the
    scale is always that of the whole tensor. The latent full-precision parameters stay registered under their own
    names (no parametrization), so `state_dict`, `save_pretrained` and the optimizer are unaffected; their gradients
    arrive through the straight-through estimator and the (non-detached) scale.

    Args:
        model: the model the weights belong to; the call may go through a wrapper around it.
        weights: the selected weights, as returned by `select_weights(model)`.
        bits: bit-width in [2, 8] (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        spec: the `QuantSpec` (its modules are not used: the weights are already selected).
    """
    spec = resolve_spec("fake_quantized_forward", spec, bits, per_channel)
    owners = _owners(model, weights)
    latent: dict[tuple[nn.Module, str], torch.Tensor] = {}

    def quantize(module: nn.Module, args) -> None:
        for attribute in owners[module]:
            parameter = module._parameters[attribute]  # under FSDP2: the gathered parameter of this forward pass
            latent[module, attribute] = parameter
            module._parameters[attribute] = fused_fake_quantize(parameter, spec=spec, out_dim=output_dim(module))

    def restore(module: nn.Module, args=None, output=None) -> None:
        for attribute in owners[module]:
            if (module, attribute) in latent:
                module._parameters[attribute] = latent.pop((module, attribute))

    handles = []
    try:
        for module in owners:
            handles.append(module.register_forward_pre_hook(quantize))
            # Before FSDP2's own post-forward hook, which re-registers the sharded parameters.
            handles.append(module.register_forward_hook(restore, prepend=True, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in owners:
            restore(module)
