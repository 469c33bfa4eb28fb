"""`hf-oscq export` (bit-packed checkpoints of a trained model) and `hf-oscq eval` (cross-bit table of an export)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import OscqValueError
from ..quantization.spec import DEFAULT_EVAL_BITS, PER_CHANNEL, PER_TENSOR, QuantSpec

logger = logging.getLogger(__name__)

# The default of TrainingArguments.seed: an export of a Trainer run that kept it re-estimates BatchNorm with the
# images its cross-bit evaluation used (same permutation; see quantization.batchnorm.calibration_batches).
DEFAULT_SEED = 42


def _load_model(folder: Path):
    from ..export.folder import auto_class_for

    return auto_class_for(folder).from_pretrained(folder).eval()


def _load_image_processor(folder: Path):
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def _spec(args: argparse.Namespace) -> QuantSpec:
    """The spec of the export (each bit-width of `--bits` replaces its `bits`)."""
    granularity = PER_CHANNEL if args.per_channel else PER_TENSOR
    return QuantSpec(min(args.bits), granularity, args.target_modules, args.exclude_modules)


def run_export(args: argparse.Namespace) -> Path:
    """`hf-oscq export`: the export folder written.

    Raises:
        OscqValueError: for a folder without config.json, an already quantized checkpoint, or BatchNorm
            re-estimation without `--dataset`.
    """
    from ..export.checkpoint import QUANT_METHOD
    from ..export.writer import export_quantized

    checkpoint = Path(args.checkpoint)
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise OscqValueError(
            f"{checkpoint} has no config.json: pass a folder written by save_pretrained (or Trainer)."
        )
    quantization = json.loads(config_path.read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == QUANT_METHOD:
        raise OscqValueError(
            f"{checkpoint} is already a quantized export (bits={quantization.get('bits')}): export from the "
            "full-precision checkpoint instead, e.g. the fp/ folder of the export."
        )
    spec = _spec(args)
    batches = export_calibration_batches(args)
    return export_quantized(
        _load_model(checkpoint),
        args.output,
        bits=args.bits,
        spec=spec,
        image_processor=_load_image_processor(checkpoint),
        calibration_batches=batches,
    )


def export_calibration_batches(args: argparse.Namespace) -> list[dict] | None:
    """Training images for BatchNorm re-estimation after rounding (`--bn_recalibration_samples` of `--dataset`,
    drawn with `--seed`), the same for every bit-width; `None` without re-estimation."""
    if not args.bn_recalibration_samples:
        return None
    if not args.dataset:
        raise OscqValueError(
            "--bn_recalibration_samples needs --dataset (and --data_dir for a local copy): the training images "
            "forwarded to re-estimate BatchNorm statistics."
        )
    from ..quantization.batchnorm import calibration_batches
    from ..scripts.data import load_image_dataset

    train = load_image_dataset(args.dataset, data_dir=args.data_dir).train
    batches = calibration_batches(train, args.bn_recalibration_samples, args.batch_size, args.seed)
    return [{"pixel_values": batch["pixel_values"]} for batch in batches]


def run_eval(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """`hf-oscq eval`: `{variant: {"accuracy": ...}}` of every checkpoint in the folder."""
    from ..export.folder import variant_folders
    from ..scripts.data import load_image_dataset
    from ..training.metrics import evaluate_accuracy

    folders = variant_folders(Path(args.folder))
    dataset = load_image_dataset(args.dataset, data_dir=args.data_dir, max_eval_samples=args.max_eval_samples).eval
    table = {}
    for name, path in folders.items():
        table[name] = evaluate_accuracy(_load_model(path), dataset, args.batch_size)
        logger.info("%s: %s", name, table[name])
    return table


def add_parser(subparsers) -> None:
    export = subparsers.add_parser("export", help="Write bit-packed PTQ checkpoints (one folder per bit-width).")
    export.add_argument("checkpoint", help="full-precision save_pretrained folder")
    export.add_argument("--output", required=True, help="export folder (fp/, w2/ ... w8/, oscq_export.json)")
    export.add_argument("--bits", type=int, nargs="+", default=list(DEFAULT_EVAL_BITS))
    export.add_argument("--target_modules", nargs="+", default=None)
    export.add_argument("--exclude_modules", nargs="+", default=None)
    export.add_argument("--per_channel", action="store_true")
    export.add_argument(
        "--bn_recalibration_samples",
        type=int,
        default=0,
        help="re-estimate BatchNorm statistics after rounding on this many training images of --dataset (0: off)",
    )
    export.add_argument("--dataset", default=None, help="dataset of the BatchNorm re-estimation images")
    export.add_argument("--data_dir", default=None, help="local copy of that dataset (see hf_oscq.scripts.data)")
    export.add_argument("--batch_size", type=int, default=64)
    export.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the re-estimation images (the training run's seed picks the images its evaluation used)",
    )
    export.set_defaults(func=_export_main)

    evaluate = subparsers.add_parser("eval", help="Evaluate an export folder (or one checkpoint) at every bit-width.")
    evaluate.add_argument("folder", help="an export folder (with fp/ and w{b}/) or one checkpoint folder")
    evaluate.add_argument("--dataset", required=True, help="digits, fashion_mnist, cifar10 or tiny-imagenet")
    evaluate.add_argument("--data_dir", default=None, help="local copy of the dataset (see hf_oscq.scripts.data)")
    evaluate.add_argument("--max_eval_samples", type=int, default=None)
    evaluate.add_argument("--batch_size", type=int, default=256)
    evaluate.add_argument("--output_json", default=None, help="also write the table here")
    evaluate.set_defaults(func=_eval_main)


def _export_main(args: argparse.Namespace) -> int:
    output = run_export(args)
    sys.stdout.write(f"{output}\n")
    return 0


def _eval_main(args: argparse.Namespace) -> int:
    from ..quantization.ptq import format_cross_bit_table

    table = run_eval(args)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(table, indent=2) + "\n")
    sys.stdout.write(format_cross_bit_table({Path(args.folder).name: table}) + "\n")
    return 0
