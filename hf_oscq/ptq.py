"""Post-training quantization: round the selected weights of a trained model, and evaluate it at every bit-width."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .quantizer import check_finite, dequantize, sharded_codes, validate_bits
from .selection import Patterns, select_weights
from .sharding import reshard

logger = logging.getLogger(__name__)

DEFAULT_EVAL_BITS = (2, 3, 4, 5, 6, 7, 8)
_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether `model` has BatchNorm layers, whose statistics rounding invalidates."""
    return any(isinstance(module, _BATCHNORM_TYPES) for module in model.modules())


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor]) -> int:
    """Re-estimates the running statistics of every BatchNorm layer with the model's current (quantized) weights.

    Statistics collected with full-precision weights no longer match the activations once the weights are
    rounded; resetting them and forwarding a few hundred training images (no gradient) fixes that.

    Args:
        model: the model, already quantized.
        batches: model inputs: dicts of keyword arguments (`{"pixel_values": ...}`) or plain tensors.

    Returns:
        The number of samples forwarded (0 when the model has no BatchNorm layer: nothing is done).
    """
    norms = [module for module in model.modules() if isinstance(module, _BATCHNORM_TYPES)]
    if not norms:
        return 0
    saved = {module: module.momentum for module in norms}
    was_training = model.training
    seen = 0
    try:
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # cumulative average over every batch forwarded
        model.train()
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    inputs = {key: value for key, value in batch.items() if key != "labels"}
                    model(**inputs)
                    seen += len(next(iter(inputs.values())))
                else:
                    model(batch)
                    seen += len(batch)
    finally:
        for module, momentum in saved.items():
            module.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("recalibrate_batchnorm got no batches: pass a few hundred training images.")
    return seen


def _round_in_place(weights: Mapping[str, torch.Tensor], bits: int, per_channel: bool) -> None:
    """Rounds the weights in place; FSDP2-sharded weights row shard by row shard, with the whole tensor's scale."""
    for name, weight in weights.items():
        check_finite(weight, name)
    for shard, codes, scale in sharded_codes(list(weights.values()), bits, per_channel):
        shard.local.detach().copy_(dequantize(codes, scale))


@contextlib.contextmanager
def quantized_weights(
    model: nn.Module,
    bits: int,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool = False,
    calibration_batches: Iterable | None = None,
) -> Iterator[nn.Module]:
    """Temporarily rounds the selected weights of `model` in place; restores them bit-exactly on exit.

    With `calibration_batches`, BatchNorm running statistics are re-estimated with the rounded weights, and
    restored on exit too.

    Example:
        ```python
        with quantized_weights(model, bits=3):
            logits = model(pixel_values).logits
        ```
    """
    validate_bits(bits)
    reshard(model)
    weights = select_weights(model, target_modules, exclude_modules)
    saved, buffers = {}, None
    with torch.no_grad():
        try:
            saved = {name: weight.detach().clone() for name, weight in weights.items()}
            _round_in_place(weights, bits, per_channel)
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


def quantize_model(
    model: nn.Module,
    bits: int,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool = False,
    calibration_batches: Iterable | None = None,
    inplace: bool = False,
) -> nn.Module:
    """PTQ: the model with its selected weights rounded at `bits` bits (plain rounding, as in the paper).

    Args:
        model: a trained model.
        bits: bit-width in [2, 8].
        target_modules: which modules, see `select_weights`.
        exclude_modules: modules left in float, see `select_weights`.
        per_channel: one scale per output channel.
        calibration_batches: optional model inputs to re-estimate BatchNorm statistics after rounding.
        inplace: round `model` itself instead of a deep copy (irreversible; `quantized_weights` rounds temporarily).

    Returns:
        The quantized model (a copy unless `inplace`).
    """
    validate_bits(bits)
    target = model if inplace else copy.deepcopy(model)
    reshard(target)
    with torch.no_grad():
        _round_in_place(select_weights(target, target_modules, exclude_modules), bits, per_channel)
    if calibration_batches is not None:
        recalibrate_batchnorm(target, calibration_batches)
    return target


def cross_bit_evaluate(
    model: nn.Module,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    bits: Sequence[int] = DEFAULT_EVAL_BITS,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    per_channel: bool = False,
    calibration_batches: Callable[[], Iterable] | None = None,
    include_full_precision: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluates `model` in full precision and PTQ'd at every bit-width; the weights are restored afterwards.

    Args:
        model: the trained model.
        evaluate: called with the model, returns metrics (e.g. `{"accuracy": 0.91}`).
        bits: the bit-widths to evaluate.
        target_modules: which modules, see `select_weights`.
        exclude_modules: modules left in float, see `select_weights`.
        per_channel: one scale per output channel.
        calibration_batches: a callable returning fresh model inputs for BatchNorm re-estimation, or `None`.
        include_full_precision: also evaluate the unquantized model, under the key `"fp"`.

    Returns:
        `{"fp": metrics, "w2": metrics, ..., "w8": metrics}`.
    """
    bits = [validate_bits(b) for b in bits]
    table = {}
    if include_full_precision:
        table["fp"] = dict(evaluate(model))
    for b in bits:
        batches = calibration_batches() if calibration_batches is not None else None
        with quantized_weights(model, b, target_modules, exclude_modules, per_channel, batches):
            table[f"w{b}"] = dict(evaluate(model))
        logger.info("w%d: %s", b, table[f"w{b}"])
    return table


def format_cross_bit_table(tables: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str = "accuracy") -> str:
    """Renders `{run_name: cross_bit_evaluate(...)}` as a Markdown table, one row per run, one column per bit."""
    columns: list[str] = []
    for table in tables.values():
        columns += [key for key in table if key not in columns]
    columns.sort(key=lambda key: (key != "fp", int(key[1:]) if key.startswith("w") else 0))
    header = "| run | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for run, table in tables.items():
        cells = [f"{100 * table[c][metric]:.1f}" if c in table and metric in table[c] else "-" for c in columns]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
