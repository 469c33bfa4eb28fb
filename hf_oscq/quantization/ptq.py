"""Post-training quantization: round the selected weights of a trained model, and evaluate it at every bit-width."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..provenance import metric_label
from .batchnorm import recalibrate_batchnorm, reusable_batches, warn_if_stale_statistics
from .packed_tensor import PackedWeight
from .primitives import check_finite, dequantize, sharded_codes
from .selection import output_dims, require_module, select_weights
from .sharding import reshard
from .spec import DEFAULT_EVAL_BITS, Patterns, QuantSpec, resolve_spec, validate_bits
from .variants import FULL_PRECISION, sort_variants, variant_name

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EVAL_BITS",
    "cross_bit_evaluate",
    "format_cross_bit_table",
    "holding_packed_weights",
    "quantize_model",
    "quantized_weights",
]


def _round_in_place(model: nn.Module, weights: Mapping[str, torch.Tensor], spec: QuantSpec) -> None:
    """Rounds the weights in place; FSDP2-sharded weights row shard by row shard, with the whole tensor's scale."""
    for name, weight in weights.items():
        check_finite(weight, name)
    out_dims = output_dims(model, weights)
    for (shard, codes, scale), out_dim in zip(sharded_codes(list(weights.values()), spec, out_dims), out_dims):
        shard.local.detach().copy_(dequantize(codes, scale, out_dim=out_dim))


@contextlib.contextmanager
def quantized_weights(
    model: nn.Module,
    bits: int | None = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool | None = None,
    calibration_batches: Iterable | None = None,
    *,
    spec: QuantSpec | None = None,
) -> Iterator[nn.Module]:
    """Temporarily rounds the selected weights of `model` in place; restores them bit-exactly on exit.

    With `calibration_batches`, BatchNorm running statistics are re-estimated with the rounded weights, and
    restored on exit too.

    Args:
        model: the model.
        bits, target_modules, exclude_modules, per_channel: shorthand for `spec`.
        calibration_batches: optional model inputs to re-estimate BatchNorm statistics after rounding.
        spec: the `QuantSpec`: how and which weights.

    Example:
        ```python
        with quantized_weights(model, bits=3):
            logits = model(pixel_values).logits
        ```
    """
    require_module(model)
    spec = resolve_spec("quantized_weights", spec, bits, per_channel, target_modules, exclude_modules)
    reshard(model)
    weights = select_weights(model, spec=spec)
    saved, buffers = {}, None
    with torch.no_grad():
        try:
            saved = {name: weight.detach().clone() for name, weight in weights.items()}
            _round_in_place(model, weights, spec)
            if calibration_batches is not None:
                buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
                recalibrate_batchnorm(model, calibration_batches)
            yield model
        finally:
            reshard(model)  # the next forward pass must gather the restored weights, not keep the rounded ones
            for name, original in saved.items():
                weights[name].copy_(original)
            if buffers is not None:
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])


@contextlib.contextmanager
def holding_packed_weights(
    model: nn.Module, weights: Mapping[str, PackedWeight], buffers: Mapping[str, torch.Tensor] | None = None
) -> Iterator[nn.Module]:
    """Temporarily puts packed weights (and other buffer values) into `model`; the original parameter and buffer
    objects are put back on exit.

    Args:
        model: the model.
        weights: `{parameter name: packed weight}`; a parameter tied to others (GPT-2's `lm_head` and input
            embedding) is replaced wherever it appears, by one packed parameter, so the ties hold.
        buffers: `{buffer name: value}` to hold meanwhile (e.g. BatchNorm statistics re-estimated for the packed
            weights).
    """
    replacements = {
        id(model.get_parameter(name)): nn.Parameter(packed, requires_grad=False) for name, packed in weights.items()
    }
    swapped = []
    try:
        for module in model.modules():
            for attribute, parameter in list(module._parameters.items()):
                if parameter is not None and id(parameter) in replacements:
                    swapped.append((module._parameters, attribute, parameter))
                    module._parameters[attribute] = replacements[id(parameter)]
        for name, value in (buffers or {}).items():
            owner, _, attribute = name.rpartition(".")
            held = model.get_submodule(owner)._buffers
            swapped.append((held, attribute, held[attribute]))
            held[attribute] = value
        yield model
    finally:
        for held, attribute, original in reversed(swapped):
            held[attribute] = original


def quantize_model(
    model: nn.Module,
    bits: int | None = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool | None = None,
    calibration_batches: Iterable | None = None,
    inplace: bool = False,
    *,
    spec: QuantSpec | None = None,
) -> nn.Module:
    """PTQ: the model with its selected weights rounded at `bits` bits (plain rounding, as in the paper).

    Args:
        model: a trained model.
        bits: bit-width in [2, 8] (shorthand for `spec`).
        target_modules: which modules, see `select_weights` (shorthand for `spec`).
        exclude_modules: modules left in float, see `select_weights` (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        calibration_batches: optional model inputs to re-estimate BatchNorm statistics after rounding.
        inplace: round `model` itself instead of a deep copy (irreversible; `quantized_weights` rounds temporarily).
        spec: the `QuantSpec`: how and which weights.

    Returns:
        The quantized model (a copy unless `inplace`).
    """
    require_module(model)
    spec = resolve_spec("quantize_model", spec, bits, per_channel, target_modules, exclude_modules)
    target = model if inplace else copy.deepcopy(model)
    reshard(target)
    with torch.no_grad():
        _round_in_place(target, select_weights(target, spec=spec), spec)
    if calibration_batches is not None:
        recalibrate_batchnorm(target, calibration_batches)
    return target


def cross_bit_evaluate(
    model: nn.Module,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    bits: Sequence[int] = DEFAULT_EVAL_BITS,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool | None = None,
    calibration_batches: Iterable | Callable[[], Iterable | None] | None = None,
    include_full_precision: bool = True,
    *,
    spec: QuantSpec | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluates `model` in full precision and PTQ'd at every bit-width; the weights are restored afterwards.

    Args:
        model: the trained model.
        evaluate: called with the model, returns metrics (e.g. `{"accuracy": 0.91}`).
        bits: the bit-widths to evaluate.
        target_modules, exclude_modules, per_channel: shorthand for `spec`.
        calibration_batches: model inputs for BatchNorm re-estimation at each bit-width: a re-iterable (a list, a
            `DataLoader`) or a callable returning fresh ones (or `None` for plain rounding); `None` for plain
            rounding.
        include_full_precision: also evaluate the unquantized model, under the key `"fp"`.
        spec: how and which weights are rounded; each bit-width `b` uses `spec.with_bits(b)`.

    Returns:
        `{"fp": metrics, "w2": metrics, ..., "w8": metrics}`. With BatchNorm re-estimated, a full precision far
        below 8 bits logs a warning (`batchnorm.warn_if_stale_statistics`).

    Raises:
        OscqValueError: for invalid bit-widths, or a one-shot iterator of calibration batches with several of them
            (`batchnorm.reusable_batches`).
    """
    require_module(model)
    widths = [validate_bits(b) for b in bits]
    calibration_batches = reusable_batches(calibration_batches, "cross_bit_evaluate", len(widths))
    shorthand_bits = None if spec is not None else (widths[0] if widths else DEFAULT_EVAL_BITS[0])
    spec = resolve_spec("cross_bit_evaluate", spec, shorthand_bits, per_channel, target_modules, exclude_modules)
    table, recalibrated = {}, False
    if include_full_precision:
        table[FULL_PRECISION] = dict(evaluate(model))
    for b in widths:
        batches = calibration_batches() if calibration_batches is not None else None
        recalibrated |= batches is not None
        with quantized_weights(model, calibration_batches=batches, spec=spec.with_bits(b)):
            table[variant_name(b)] = dict(evaluate(model))
        logger.info("w%d: %s", b, table[variant_name(b)])
    if recalibrated:
        warn_if_stale_statistics(table)
    return table


def format_cross_bit_table(tables: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str = "accuracy") -> str:
    """Renders `{run_name: cross_bit_evaluate(...)}` as a Markdown table, one row per run, one column per bit, the
    metric and its unit in the corner cell: accuracy as top-1 accuracy in %, perplexity (or any other metric) as it
    is, with two decimals."""
    columns: list[str] = []
    for table in tables.values():
        columns += [key for key in table if key not in columns]
    columns = sort_variants(columns)
    header = f"| {metric_label(metric)} | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for run, table in tables.items():
        cells = [_cell(table[c][metric], metric) if c in table and metric in table[c] else "-" for c in columns]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float, metric: str) -> str:
    return f"{100 * value:.1f}" if metric == "accuracy" else f"{value:.2f}"
