"""`hf-oscq export`: bit-packed checkpoints of a trained model, one folder per bit-width."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import OscqValueError
from ..export.formats import EXPORT_FORMATS
from ..paths import not_a_folder
from ..quantization.spec import (
    DEFAULT_BN_RECALIBRATION_SAMPLES,
    DEFAULT_EVAL_BITS,
    GROUP,
    PER_CHANNEL,
    PER_TENSOR,
    QuantSpec,
    validate_bits,
)
from . import add_flag, check_counts

logger = logging.getLogger(__name__)

# The default of TrainingArguments.seed: an export of a Trainer run that kept it re-estimates BatchNorm with the
# images its cross-bit evaluation used (same permutation; see quantization.batchnorm.calibration_batches).
DEFAULT_SEED = 42
DEFAULT_BATCH_SIZE = 64  # of the re-estimation forward passes, when the training record has none


def _load_model(folder: Path):
    from ..export.folder import auto_class_for

    return auto_class_for(folder).from_pretrained(folder).eval()


def _load_image_processor(folder: Path):
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def export_spec(args: argparse.Namespace, trained: dict) -> tuple[QuantSpec, str]:
    """The spec of the export (each bit-width of `--bits` replaces its `bits`) and the argument its group size comes
    from: the run's recorded spec (`oscq_training.json`, `run_record.recorded_spec`) for a run trained towards one
    (`--per_channel`, `--group_size` and `--target_modules` may repeat it, not contradict it; `--exclude_modules`
    leaves more layers in float, the others keeping the run's spec), else the flags.

    Raises:
        OscqValueError: for invalid bit-widths, both `--per_channel` and `--group_size`, or a flag contradicting the
            run's recorded spec (naming both).
    """
    from ..training.methods import find_method
    from ..training.run_record import describe_run, recorded_spec

    if args.group_size is not None and args.group_size < 1:
        raise OscqValueError(
            f"--group_size must be a positive number of input features per scale, got {args.group_size}."
        )
    if args.per_channel and args.group_size:
        raise OscqValueError("Pass --per_channel or --group_size, not both: group-wise scales are per channel too.")
    for bits in args.bits:  # every one, before anything is loaded
        validate_bits(bits)
    flagged = GROUP if args.group_size else PER_CHANNEL if args.per_channel else None
    given = QuantSpec(
        min(args.bits), flagged or PER_TENSOR, args.target_modules, args.exclude_modules, args.group_size
    )
    recorded = recorded_spec(trained)
    # a run trained towards no grid (plain training, KURE) has a record that is a default the flags may change
    method = find_method(trained.get("osc_method"))
    if recorded is None or (method is not None and not method.trains_towards_grid):
        if recorded is not None and flagged is None and args.target_modules is None and args.exclude_modules is None:
            return recorded.with_bits(min(args.bits)), "the run's recorded osc_group_size"
        return given, "--group_size"
    conflicts = []
    if flagged is not None and (given.granularity, given.group_size) != (recorded.granularity, recorded.group_size):
        conflicts.append("--group_size" if args.group_size else "--per_channel")
    if args.target_modules is not None and given.target_modules != recorded.target_modules:
        conflicts.append("--target_modules")
    if conflicts:
        method = trained.get("osc_method")
        asked = given.with_bits(recorded.bits)  # the flags change the layers or scales, not the trained bit-width
        raise OscqValueError(
            f"{args.checkpoint} was trained with {describe_run(method, recorded)} (its oscq_training.json), but "
            f"{' and '.join(conflicts)} asks for {describe_run(method, asked)}: an export in another spec would not "
            "be the model that training made robust. Drop the flag to export with the run's spec (--exclude_modules "
            "may leave more layers in float)."
        )
    spec = recorded.with_bits(min(args.bits))
    excluded = [pattern for pattern in args.exclude_modules or () if pattern not in (recorded.exclude_modules or ())]
    if excluded:  # more layers left in float: the others keep the grid and the scales they were trained for
        spec = dataclasses.replace(spec, exclude_modules=(*(recorded.exclude_modules or ()), *excluded))
        logger.warning(
            "Exporting with the run's spec and leaving the layers matching --exclude_modules %s in float as well.",
            excluded,
        )
    return spec, "the run's recorded osc_group_size"


def run_export(args: argparse.Namespace) -> Path:
    """`hf-oscq export`: the export folder written.

    Raises:
        OscqValueError: for an unknown `--dataset`, a missing folder or one without config.json, an output that
            cannot be written, an already quantized checkpoint, flags contradicting the run's recorded spec, a group
            size that does not divide a layer's input features, or a BatchNorm model whose re-estimation images are
            unknown (no `--dataset` and none recorded with the checkpoint).
    """
    from ..export.checkpoint import QUANT_METHOD
    from ..export.folder import read_training_info
    from ..export.formats import COMPRESSED_TENSORS_FORMAT
    from ..export.writer import check_output_dir, export_quantized
    from ..quantization.batchnorm import has_batchnorm
    from ..quantization.selection import select_weights

    check_counts(args, bn_recalibration_samples=0, batch_size=1)
    if args.dataset:
        from ..scripts.data import check_dataset_name

        check_dataset_name(args.dataset)  # before the model loads
    checkpoint = Path(args.checkpoint)
    config_path = checkpoint / "config.json"
    if not checkpoint.is_dir():
        raise OscqValueError(
            f"{checkpoint} {not_a_folder(checkpoint)}: pass a folder written by save_pretrained (or Trainer)."
        )
    if not config_path.is_file():
        raise OscqValueError(
            f"{checkpoint} has no config.json: pass a folder written by save_pretrained (or Trainer)."
        )
    quantization = json.loads(config_path.read_text()).get("quantization_config") or {}
    if quantization.get("quant_method"):
        method = quantization["quant_method"]
        bits = f", bits={quantization.get('bits')}" if method == QUANT_METHOD else ""
        raise OscqValueError(
            f"{checkpoint} is already a quantized checkpoint ({method}{bits}): export from the full-precision "
            "checkpoint instead, e.g. the fp/ folder of the export."
        )
    if args.format == COMPRESSED_TENSORS_FORMAT:
        from ..export.compressed_tensors import require_compressed_tensors

        require_compressed_tensors()  # before the model loads
    check_output_dir(args.output, "--output")  # before the model loads
    trained = read_training_info(checkpoint)
    spec, group_size_source = export_spec(args, trained)
    model = _load_model(checkpoint)
    select_weights(model, spec=spec, group_size_source=group_size_source)  # every layer fits, before any work
    batches, source = None, None
    args = with_recorded_defaults(args, trained)
    if args.bn_recalibration_samples and has_batchnorm(model):
        batches, source = export_calibration_batches(args, trained, model)
    # the recorded recipe and hyperparameters go into the manifest and the cards; the local data path never does
    training = {key: value for key, value in trained.items() if key != "data_dir"} or None
    return export_quantized(
        model,
        args.output,
        bits=args.bits,
        spec=spec,
        image_processor=_load_image_processor(checkpoint),
        tokenizer=_load_tokenizer(checkpoint),
        calibration_batches=batches,
        plain_rounding=not args.bn_recalibration_samples,
        calibration_source=source,
        training=training,
        format=args.format,
    )


def _load_tokenizer(folder: Path):
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def with_recorded_defaults(args: argparse.Namespace, trained: dict) -> argparse.Namespace:
    """`args` with the BatchNorm re-estimation settings it leaves unset (None) taken from the training record, so
    that exporting a recipe's run re-estimates exactly as that run's evaluation did (same number of images, batch
    size and seed); the package's defaults where nothing is recorded."""
    hyperparameters = trained.get("hyperparameters") or {}
    resolved = argparse.Namespace(**vars(args))
    if resolved.bn_recalibration_samples is None:
        resolved.bn_recalibration_samples = trained.get(
            "osc_bn_recalibration_samples", DEFAULT_BN_RECALIBRATION_SAMPLES
        )
    if resolved.batch_size is None:
        resolved.batch_size = hyperparameters.get("eval_batch_size", DEFAULT_BATCH_SIZE)
    if resolved.seed is None:
        resolved.seed = hyperparameters.get("seed", DEFAULT_SEED)
    return resolved


def export_calibration_batches(
    args: argparse.Namespace, trained: dict | None = None, model=None
) -> tuple[Iterable[dict] | None, dict | None]:
    """Training images for BatchNorm re-estimation after rounding: `--bn_recalibration_samples` images of
    `--dataset` (default: the dataset the checkpoint's training record names, with its local copy and the training
    split the run used: its seed, `max_train_samples` and `validation_fraction`), drawn with `--seed`, the same for
    every bit-width (a re-iterable of `{"pixel_values"}` batches), and where they come from (the manifest's
    `{"dataset", "seed", "batch_size"}`); `(None, None)` without re-estimation.

    Raises:
        OscqValueError: when neither `--dataset` nor the checkpoint's training record names the dataset (the
            BatchNorm rule of every rounding path, `batchnorm.require_batchnorm_handling`, for `model`).
    """
    from ..quantization.batchnorm import batchnorm_refusal

    if not args.bn_recalibration_samples:
        return None, None
    trained = trained or {}
    dataset = args.dataset or trained.get("dataset")
    if not dataset:
        raise batchnorm_refusal(
            type(model).__name__ if model is not None else "The model",
            f"{args.checkpoint} records no training data to re-estimate them on: pass --dataset NAME (and "
            "--data_dir for a local copy) to re-estimate them on its training images, or --bn_recalibration_samples "
            "0 for plain rounding (the paper's PTQ).",
        )
    from ..export.folder import recorded_split
    from ..quantization.batchnorm import calibration_batches
    from ..scripts.data import load_image_dataset

    data_dir = args.data_dir if args.dataset else args.data_dir or trained.get("data_dir")
    seed = args.seed if args.seed is not None else DEFAULT_SEED
    # the recorded run's own training split (the recipes subsample and hold out with their seed), for its dataset
    train = load_image_dataset(dataset, data_dir=data_dir, **recorded_split(dataset, trained)).train
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    batches = _Reiterable(lambda: calibration_batches(train, args.bn_recalibration_samples, batch_size, seed))
    return batches, {"dataset": dataset, "seed": seed, "batch_size": batch_size}


class _Reiterable:
    """The batches `make()` yields, drawn afresh on every iteration (one per bit-width), as the Trainer draws them:
    each pass consumes the seeded random stream in the same order, loading and forward passes interleaved."""

    def __init__(self, make: Callable[[], Iterable[dict]]):
        self._make = make

    def __iter__(self) -> Iterator[dict]:
        return ({"pixel_values": batch["pixel_values"]} for batch in self._make())


def add_parser(subparsers) -> None:
    export = subparsers.add_parser("export", help="Write bit-packed PTQ checkpoints (one folder per bit-width).")
    export.add_argument("checkpoint", help="full-precision save_pretrained folder (a Trainer's output_dir)")
    add_flag(export, "output", required=True, help="export folder to write: fp/, w2/ ... w8/, oscq_export.json")
    add_flag(
        export,
        "bits",
        type=int,
        nargs="+",
        default=list(DEFAULT_EVAL_BITS),
        help=f"bit-widths to export, each in [2, 8] (default: {' '.join(map(str, DEFAULT_EVAL_BITS))})",
    )
    add_flag(
        export,
        "target_modules",
        nargs="+",
        default=None,
        help="modules whose weights are quantized: names, dotted suffixes or regexes; 'all-weights' for every module "
        "with a weight (default: Linear, Conv and Embedding layers)",
    )
    add_flag(export, "exclude_modules", nargs="+", default=None, help="modules kept in float (same pattern syntax)")
    add_flag(export, "per_channel", action="store_true", help="one scale per output channel instead of per tensor")
    add_flag(
        export,
        "group_size",
        type=int,
        default=None,
        help="group-wise scales: one scale per this many input features of each output channel",
    )
    add_flag(
        export,
        "bn_recalibration_samples",
        type=int,
        default=None,
        help="BatchNorm models: re-estimate the statistics after rounding on this many training images "
        "(0: plain rounding, the paper's PTQ; default: the number the training run recorded, else "
        f"{DEFAULT_BN_RECALIBRATION_SAMPLES}); models without BatchNorm ignore it",
    )
    add_flag(
        export,
        "dataset",
        default=None,
        help="dataset of the BatchNorm re-estimation images (default: the one recorded with the checkpoint by the "
        "recipes)",
    )
    add_flag(export, "data_dir", default=None, help="local copy of that dataset (see hf_oscq.scripts.data)")
    add_flag(
        export,
        "batch_size",
        type=int,
        default=None,
        help="batch size of the BatchNorm re-estimation (default: the training run's recorded evaluation batch "
        f"size, else {DEFAULT_BATCH_SIZE})",
    )
    add_flag(
        export,
        "seed",
        type=int,
        default=None,
        help="seed of the re-estimation images (default: the training run's recorded seed, else "
        f"{DEFAULT_SEED}, the Trainer's default: the images its evaluation used)",
    )
    add_flag(
        export,
        "format",
        choices=EXPORT_FORMATS,
        default=EXPORT_FORMATS[0],
        help="how the w{b} folders store the weights: 'oscq' (hf_oscq's bit-packed format, every layer type, loads "
        "after `import hf_oscq`) or 'compressed-tensors' (pack-quantized, Linear layers only, loads in transformers "
        "with the compressed-tensors package and in vLLM, without hf_oscq)",
    )
    export.set_defaults(func=_export_main)


def _export_main(args: argparse.Namespace) -> int:
    output = run_export(args)
    sys.stdout.write(f"{output}\n")
    return 0
