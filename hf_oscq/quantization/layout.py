"""Which elements of a weight share a scale: the scale groups of a granularity, whatever the weight's storage layout.

Every granularity is one view of the weight as `(out, groups, group_len)`: the output channel first (dim 0 of Linear,
Conv and Embedding weights, `out_dim=1` for GPT-2's `Conv1D`, stored `(in, out)`), then the input features of that
channel (all remaining dimensions, row-major) cut into `groups` runs of `group_len`. Per tensor is `(1, 1, numel)`,
per channel `(out, 1, fan_in)`, group-wise `(out, fan_in // group_size, group_size)`. One scale per `(out, group)`.

Stored scales are "output channel first" whatever the layout: `()` per tensor, `(out, 1, ..., 1)` (the weight's
number of dimensions) per channel, `(out, groups)` group-wise. `expand_scale` turns them back into a tensor that
broadcasts against the weight as it is stored.

Pure tensor functions; the module-aware part (which dim is the output of which layer) is `selection.output_dim`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import OscqValueError
from .spec import QuantSpec


def resolve_out_dim(caller: str, shape: Sequence[int], spec: QuantSpec, out_dim: int | None) -> int:
    """The output-channel dimension a hand call quantizes along: `out_dim` as given (checked against `shape`), or 0
    where it cannot matter (one scale per tensor, a weight of fewer than 2 dimensions).

    A 2-D weight is `(out, in)` in a Linear layer but `(in, out)` in GPT-2's `Conv1D`, and a transposed
    convolution's output channels are dim 1 too: nothing in the tensor says which, so per-channel and group-wise
    scales of a weight of 2 or more dimensions need `out_dim` (`selection.output_dim(module)` gives it).

    Raises:
        OscqValueError: for a missing `out_dim` where it matters, or one the weight does not have.
    """
    shape = tuple(shape)
    if out_dim is None:
        if spec.per_tensor or len(shape) < 2:
            return 0
        raise OscqValueError(
            f"{caller}: {spec.granularity} scales follow a weight's output channels, dim 0 of Linear, Conv and "
            f"Embedding weights but dim 1 of GPT-2's Conv1D and of transposed convolutions, and a tensor of shape "
            f"{list(shape)} does not say which: pass out_dim=hf_oscq.output_dim(layer) (0 or 1)."
        )
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or not 0 <= out_dim < max(len(shape), 1):
        raise OscqValueError(f"{caller}: out_dim={out_dim!r} is not a dimension of a weight of shape {list(shape)}.")
    return out_dim


def group_layout(shape: Sequence[int], spec: QuantSpec, out_dim: int = 0) -> tuple[int, int, int]:
    """`(out, groups, group_len)` of a weight of `shape` under `spec`'s granularity.

    Raises:
        OscqValueError: when `spec.group_size` does not divide the weight's input features.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    if spec.per_tensor or not shape:
        return 1, 1, numel
    out = shape[out_dim]
    fan_in = numel // out if out else 0
    if spec.per_channel:
        return out, 1, fan_in
    if fan_in % spec.group_size:
        raise OscqValueError(
            f"group_size={spec.group_size} does not divide the {fan_in} input features of a weight of shape "
            f"{list(shape)} (output dim {out_dim}): pick a group size dividing every selected layer's input features, "
            "or leave this layer out with exclude_modules."
        )
    return out, fan_in // spec.group_size, spec.group_size


def grouped(weight: torch.Tensor, spec: QuantSpec, out_dim: int = 0) -> torch.Tensor:
    """`weight` as `(out, groups, group_len)`: a view for `out_dim=0`, a copy when the output dim comes later."""
    if weight.dim() == 0:
        return weight.reshape(1, 1, 1)
    return weight.movedim(out_dim, 0).reshape(group_layout(weight.shape, spec, out_dim))


def ungrouped(values: torch.Tensor, shape: Sequence[int], out_dim: int = 0) -> torch.Tensor:
    """Inverse of `grouped`: `values` (any shape with the same elements, output channel first) in the weight's
    `shape`."""
    shape = tuple(shape)
    if not shape:
        return values.reshape(())
    moved = (shape[out_dim],) + shape[:out_dim] + shape[out_dim + 1 :]
    return values.reshape(moved).movedim(0, out_dim)


def scale_shape(shape: Sequence[int], spec: QuantSpec, out_dim: int = 0) -> tuple[int, ...]:
    """Shape of the stored scale of a weight of `shape`: `()` per tensor, `(out, 1, ..., 1)` per channel,
    `(out, groups)` group-wise (output channel first, whatever `out_dim`)."""
    shape = tuple(shape)
    out, groups, _ = group_layout(shape, spec, out_dim)
    if spec.per_tensor or not shape:
        return ()
    if spec.per_channel:
        return (out,) + (1,) * (len(shape) - 1)
    return out, groups


def expand_scale(scale: torch.Tensor, shape: Sequence[int], out_dim: int = 0) -> torch.Tensor:
    """A stored scale as a tensor that broadcasts against the weight of `shape` (a 0-d scale stays 0-d).

    Per channel and group-wise scales both read as `(out, groups)`; every scale covers `fan_in // groups`
    consecutive input features of its output channel.
    """
    shape = tuple(shape)
    if scale.dim() == 0 or not shape:
        return scale.reshape(())
    out = shape[out_dim]
    per_row = scale.reshape(out, -1) if out else scale.reshape(0, 1)  # a shard without rows holds no scale
    fan_in = math.prod(shape) // out if out else 0
    groups = per_row.shape[1]
    full = per_row[:, :, None].expand(out, groups, fan_in // groups if groups else 0)
    return ungrouped(full, shape, out_dim)
