"""The scale groups of a weight (one per tensor, per output channel or per group of input features) in the form the
fused kernels want: largest magnitude per group, the scale as the fastest elementwise operand, and where the peaks are.

Per channel and group-wise, the kernels work on the weight as the contiguous `(rows, group_len)` matrix of its scale
groups (`as_group_rows`; see `layout.py`), a view unless the output channels are not dim 0. `fused.py` builds on
these; the reference quantizer (`primitives.py`) does not need them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import group_layout, ungrouped
from .primitives import nonzero_scale
from .spec import QuantSpec

BLOCK = 4096  # elements per block when searching a whole tensor for its largest magnitude

_SAME_SIZE_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


class ScaleGroups(NamedTuple):
    """The scale groups of a weight."""

    rows: int  # number of scale groups
    shape: tuple[int, ...]  # broadcast shape of a per-group value against the weight
    peak: torch.Tensor  # (rows,) largest magnitude per group
    scale: torch.Tensor  # (rows,), never zero
    divisor: torch.Tensor | float  # the scale as the fastest elementwise operand
    block_extremes: tuple[torch.Tensor, torch.Tensor] | None  # per tensor: max and min of each BLOCK elements


def by_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` as a `(rows, -1)` matrix, also when a shard holds no row."""
    return t.reshape(rows, t.numel() // rows if rows else 0)


def as_group_rows(w: torch.Tensor, spec: QuantSpec, out_dim: int = 0) -> torch.Tensor:
    """`w` as the contiguous `(rows, group_len)` matrix of its scale groups (one row per output channel and group),
    or `w` itself per tensor. A view for `out_dim=0` and a contiguous `w`, a copy otherwise."""
    if spec.per_tensor or w.dim() == 0:
        return w
    out, groups, length = group_layout(w.shape, spec, out_dim)
    moved = w.movedim(out_dim, 0).contiguous() if out_dim else w
    return moved.reshape(out * groups, length)


def from_group_rows(values: torch.Tensor, shape: torch.Size, spec: QuantSpec, out_dim: int = 0) -> torch.Tensor:
    """Inverse of `as_group_rows`: `values` in the weight's `shape`."""
    return values if spec.per_tensor or not shape else ungrouped(values, shape, out_dim)


def local_groups(w: torch.Tensor, spec: QuantSpec) -> ScaleGroups:
    """The groups of `w` (per channel and group-wise: the `as_group_rows` matrix) with the peaks of these elements
    only; `with_peaks` completes them once peaks are final (reduced across shards)."""
    if not spec.per_tensor and w.dim() > 0:
        rows, shape = w.shape[0], (w.shape[0], 1)
        flat = by_row(w, rows)
        peak = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1)) if flat.shape[1] else flat.new_zeros(rows)
        return ScaleGroups(rows, shape, peak, peak, peak, None)
    # Block-wise extremes cost one read like a global max, and later tell where the peak is without another scan.
    flat = w.reshape(-1)
    whole = flat.numel() - flat.numel() % BLOCK
    highs, lows = [flat.new_zeros(0)], [flat.new_zeros(0)]  # a shard may hold no element at all
    for part in (flat[:whole].view(-1, BLOCK), flat[whole:].view(1, -1)):
        if part.numel():
            highs.append(part.amax(dim=1))
            lows.append(part.amin(dim=1))
    highs, lows = torch.cat(highs), torch.cat(lows)
    peak = torch.maximum(highs.amax(), -lows.amin()).reshape(1) if highs.numel() else flat.new_zeros(1)
    return ScaleGroups(1, (), peak, peak, peak, (highs, lows))


def with_peaks(groups: ScaleGroups, peak: torch.Tensor, top: int) -> ScaleGroups:
    """`groups` with their final peaks and the scales they give (`top` = the largest code)."""
    scale = nonzero_scale(peak / top)
    if groups.block_extremes is None:
        return groups._replace(peak=peak, scale=scale, divisor=scale.reshape(groups.shape))
    # CPU kernels broadcast a 0-d tensor operand much slower than a Python number, and reading one back is free there.
    divisor = scale.item() if peak.device.type == "cpu" else scale[0]
    return groups._replace(peak=peak, scale=scale, divisor=divisor)


def scale_groups(w: torch.Tensor, spec: QuantSpec) -> ScaleGroups:
    """The complete groups of a whole (unsharded) weight."""
    groups = local_groups(w, spec)
    return with_peaks(groups, groups.peak, spec.max_code)


def peak_positions(
    w: torch.Tensor, groups: ScaleGroups, masks: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices of the elements with |w| == max|w| of their group, their group, and the tie count per group.

    Args:
        w: the weight (or its local rows).
        groups: its groups with final peaks.
        masks: two boolean buffers shaped like `w`, reused instead of allocating (per-channel groups only).
    """
    flat = w.reshape(-1)
    if groups.rows == 0:  # a shard without rows
        empty = torch.zeros(0, dtype=torch.long, device=w.device)
        return empty, empty, empty
    if groups.block_extremes is None:
        # Every row holds a peak: compare the whole tensor, on the bit patterns (exact, and several times faster
        # than a float compare on CPU).
        as_int, peak = w.view(_SAME_SIZE_INT[w.dtype]), groups.peak.reshape(groups.shape)
        masks = masks or (None, None)
        at_peak = torch.eq(as_int, peak.view(as_int.dtype), out=masks[0])
        at_peak.logical_or_(torch.eq(as_int, (-peak).view(as_int.dtype), out=masks[1]))
        index = torch.nonzero(at_peak.reshape(-1)).squeeze(1)
    else:
        highs, lows = groups.block_extremes
        peak = groups.peak[0]
        blocks = torch.nonzero((highs == peak) | (lows == -peak)).squeeze(1)
        candidates = (blocks[:, None] * BLOCK + torch.arange(BLOCK, device=w.device)).reshape(-1)
        candidates = candidates[candidates < flat.numel()]
        values = flat[candidates]
        index = candidates[(values == peak) | (values == -peak)]
    group = index // max(1, flat.numel() // groups.rows)
    return index, group, torch.bincount(group, minlength=groups.rows)
