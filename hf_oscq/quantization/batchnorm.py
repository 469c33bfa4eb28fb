"""BatchNorm after rounding: whether a model has BatchNorm layers, re-estimating their statistics with the rounded
weights, and the calibration batches to do it with (one function and one seed rule for the Trainer, the CLI and the
benches)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import OscqValueError
from .variants import FULL_PRECISION, variant_name

logger = logging.getLogger(__name__)

_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether `model` has BatchNorm layers, whose statistics rounding invalidates."""
    return any(isinstance(module, _BATCHNORM_TYPES) for module in model.modules())


def require_batchnorm_handling(
    model: nn.Module, *, plain_rounding: bool, ways_out: str, recalibrated: bool = False
) -> None:
    """The rule every path that rounds a model follows (`export_quantized`, quantize-on-load, `hf-oscq export`):
    a model with BatchNorm layers is rounded only with its statistics re-estimated after rounding (`recalibrated`)
    or with plain rounding asked for explicitly (`plain_rounding`), never silently with stale statistics.

    Args:
        model: the model to round.
        plain_rounding: whether plain rounding was asked for.
        ways_out: the entry point's ways out, ending the message (e.g. "pass calibration_batches=... or
            plain_rounding=True.").
        recalibrated: whether the statistics will be re-estimated.

    Raises:
        OscqValueError: for a BatchNorm model with neither, with one message whatever the entry point.
    """
    if has_batchnorm(model) and not recalibrated and not plain_rounding:
        raise batchnorm_refusal(type(model).__name__, ways_out)


def batchnorm_refusal(model_name: str, ways_out: str) -> OscqValueError:
    """The error of `require_batchnorm_handling`, for a caller that has already seen the BatchNorm layers."""
    return OscqValueError(
        f"{model_name} has BatchNorm layers, whose running statistics rounding invalidates (plain rounding can cost "
        f"most of the accuracy at 2 or 3 bits, so it is never done silently): {ways_out}"
    )


def calibration_batches(
    dataset, samples: int, batch_size: int, seed: int, collate_fn: Callable | None = None
) -> Iterator:
    """Training batches for BatchNorm re-estimation: the first `samples` images of a permutation of `dataset` drawn
    from `torch.Generator().manual_seed(seed)` (all of it when it is smaller), in batches of `batch_size` (the last
    one holds the rest), with the dataset's random augmentation drawn from torch's random number generator seeded
    with `seed`.

    The images depend on the seed and the dataset's length only, so every batch size picks the same ones; their
    augmentation, and anything else drawn from torch's generator while the batches are consumed (dropout in the
    re-estimation forward passes), on the seed only. So re-estimating twice, in the Trainer's evaluation, in its
    export or in `hf-oscq export` with the recorded settings, gives the same statistics, and the caller's random
    state is the same after the batches as before them. The Trainer passes its run's `seed`; `hf-oscq export` the
    recorded one (else 42, the Trainer's default).

    Args:
        dataset: a map-style dataset (e.g. a `datasets.Dataset` with a transform).
        samples: number of images, > 0.
        batch_size: images per batch, > 0.
        seed: seed of the permutation and of the augmentation.
        collate_fn: the DataLoader's collate function (the Trainer's data collator), default collation otherwise.

    Returns:
        An iterator of batches (dicts of tensors with the default collation).

    Raises:
        OscqValueError: when `samples` or `batch_size` is not positive.
    """
    if samples <= 0 or batch_size <= 0:
        raise OscqValueError(f"calibration_batches needs samples > 0 and batch_size > 0, got {samples}, {batch_size}.")
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    return _seeded(DataLoader(dataset, batch_size=batch_size, sampler=chosen, collate_fn=collate_fn), seed)


def reusable_batches(
    batches: Iterable | Callable[[], Iterable | None] | None, caller: str, passes: int
) -> Callable[[], Iterable | None] | None:
    """Calibration batches that `passes` re-estimations (one per bit-width) can each read from the start: a callable
    returning fresh batches as it is, a re-iterable (a list, a `DataLoader`) wrapped in one; `None` as it is.

    Raises:
        OscqValueError: for a one-shot iterator (a generator, `iter(...)`, `map(...)`) when `passes` > 1: the first
            bit-width would consume it and the next ones would re-estimate on nothing.
    """
    if batches is None or callable(batches):
        return batches
    try:
        one_shot = iter(batches) is batches
    except TypeError:
        raise OscqValueError(
            f"{caller}: calibration_batches must be model inputs (a list or DataLoader of batches) or a callable "
            f"returning them, got {type(batches).__name__}."
        ) from None
    if one_shot and passes > 1:
        raise OscqValueError(
            f"{caller}: calibration_batches is a one-shot iterator ({type(batches).__name__}), which the first of "
            f"{passes} bit-widths would consume, leaving nothing to re-estimate BatchNorm on for the others: pass a "
            "re-iterable (a list or a DataLoader) or a callable returning fresh batches (e.g. lambda: make_batches())."
        )
    return lambda: batches


def _seeded(batches: Iterable, seed: int) -> Iterator:
    """`batches`, consumed with torch's generators (CPU and the current accelerator) seeded with `seed` and restored
    afterwards (when the iterator is exhausted or closed)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield from batches


# 8-bit rounding costs a trained network a fraction of a point; a gap this large above full precision is the
# BatchNorm statistics, not the rounding.
_STALE_STATISTICS_GAP = 0.05


def warn_if_stale_statistics(table: Mapping[str, Mapping[str, float]]) -> None:
    """Logs a warning when, in a cross-bit table (`{"fp": {"accuracy": ...}, "w8": {...}, ...}`) whose rounded
    columns re-estimated BatchNorm statistics, full precision scores more than 5 points below 8 bits: the running
    statistics training left do not fit the weights (a short run), so the `fp` column is not comparable with the
    rounded ones. Tables without `fp`, `w8` or an `accuracy` are left alone."""
    full, eight = table.get(FULL_PRECISION, {}), table.get(variant_name(8), {})
    if "accuracy" not in full or "accuracy" not in eight:
        return
    if eight["accuracy"] - full["accuracy"] > _STALE_STATISTICS_GAP:
        logger.warning(
            "Full precision scores %.1f %% accuracy and 8 bits %.1f %%: the BatchNorm running statistics training "
            "left do not fit the weights (too few steps for them to settle), while every rounded column uses "
            "statistics re-estimated after rounding. Compare the rounded columns with each other, or train longer.",
            100 * full["accuracy"],
            100 * eight["accuracy"],
        )


def batch_samples(batch: Mapping[str, torch.Tensor] | torch.Tensor) -> int:
    """The number of samples in a batch of model inputs: the length of a plain tensor, or of the first input of a
    dict of keyword arguments other than `labels`."""
    if isinstance(batch, Mapping):
        return len(next(value for key, value in batch.items() if key != "labels"))
    return len(batch)


def counted(batches: Iterable, counts: list[int]) -> Iterator:
    """`batches`, appending the number of samples of each one (`batch_samples`) to `counts` as it is drawn."""
    for batch in batches:
        counts.append(batch_samples(batch))
        yield batch


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor]) -> int:
    """Re-estimates the running statistics of every BatchNorm layer with the model's current (quantized) weights.

    Statistics collected with full-precision weights no longer match the activations once the weights are
    rounded; resetting them and forwarding a few hundred training images (no gradient) fixes that.

    Args:
        model: the model, already quantized.
        batches: model inputs: dicts of keyword arguments (`{"pixel_values": ...}`) or plain tensors.

    Returns:
        The number of samples forwarded (0 when the model has no BatchNorm layer: nothing is done).

    Raises:
        OscqValueError: when `batches` is empty.
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
                    model(**{key: value for key, value in batch.items() if key != "labels"})
                else:
                    model(batch)
                seen += batch_samples(batch)
    finally:
        for module, momentum in saved.items():
            module.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise OscqValueError(
            "recalibrate_batchnorm got no batches: pass a few hundred training images (a one-shot iterator that "
            "an earlier re-estimation consumed is empty: pass a re-iterable or a callable returning fresh batches)."
        )
    return seen
