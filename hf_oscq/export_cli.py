"""`hf-oscq export` (bit-packed checkpoints of a trained model) and `hf-oscq eval` (cross-bit table of an export)."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

import torch

from .checkpoint_format import QUANT_METHOD
from .export import export_quantized
from .ptq import DEFAULT_EVAL_BITS, format_cross_bit_table

logger = logging.getLogger(__name__)


def _load_model(folder: Path):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(folder).eval()


def _load_image_processor(folder: Path):
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def run_export(args: argparse.Namespace) -> Path:
    checkpoint = Path(args.checkpoint)
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"{checkpoint} has no config.json: pass a folder written by save_pretrained (or Trainer).")
    quantization = json.loads(config_path.read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == QUANT_METHOD:
        raise SystemExit(
            f"{checkpoint} is already a quantized export (bits={quantization.get('bits')}): export from the "
            "full-precision checkpoint instead, e.g. the fp/ folder of the export."
        )
    return export_quantized(
        _load_model(checkpoint),
        args.output,
        bits=args.bits,
        image_processor=_load_image_processor(checkpoint),
        target_modules=args.target_modules,
        exclude_modules=args.exclude_modules,
        per_channel=args.per_channel,
        calibration_batches=_calibration_batches(args),
    )


def _calibration_batches(args: argparse.Namespace) -> list[dict] | None:
    """Training images for BatchNorm re-estimation after rounding, the same for every bit-width."""
    if not args.bn_recalibration_samples:
        return None
    if not args.dataset:
        raise SystemExit(
            "--bn_recalibration_samples needs --dataset (and --data_dir for a local copy): the training images "
            "forwarded to re-estimate BatchNorm statistics."
        )
    from .data import load_image_dataset

    train = load_image_dataset(args.dataset, data_dir=args.data_dir).train
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    batches = itertools.islice(loader, -(-args.bn_recalibration_samples // args.batch_size))
    return [{"pixel_values": batch["pixel_values"]} for batch in batches]


def variant_folders(folder: Path) -> dict[str, Path]:
    """`{"fp": path, "w2": path, ...}` for an export folder, or `{name: folder}` for a single checkpoint folder."""
    if not folder.is_dir():
        raise SystemExit(f"{folder} does not exist: pass an export folder or a checkpoint folder.")
    if (folder / "config.json").is_file():
        return {folder.name: folder}
    found = {child.name: child for child in folder.iterdir() if (child / "config.json").is_file()}
    names = sorted(
        (name for name in found if name == "fp" or (name[:1] == "w" and name[1:].isdigit())),
        key=lambda name: (name != "fp", int(name[1:]) if name != "fp" else 0),
    )
    if not names:
        raise SystemExit(f"{folder} holds neither config.json nor fp/ or w{{b}}/ checkpoint folders.")
    return {name: found[name] for name in names}


def evaluate_accuracy(model, dataset, batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy of an image classifier on a dataset yielding `pixel_values` and `labels`."""
    correct = total = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    with torch.no_grad():
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return {"accuracy": correct / total}


def _eval_dataset(args: argparse.Namespace):
    from .data import load_image_dataset

    return load_image_dataset(args.dataset, data_dir=args.data_dir, max_eval_samples=args.max_eval_samples).eval


def run_eval(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import hf_oscq  # noqa: F401  (registers the loader of the w{b} folders)

    dataset = _eval_dataset(args)
    table = {}
    for name, path in variant_folders(Path(args.folder)).items():
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
        "--bn_recalibration_samples", type=int, default=0,
        help="re-estimate BatchNorm statistics after rounding on this many training images of --dataset (0: off)",
    )
    export.add_argument("--dataset", default=None, help="dataset of the BatchNorm re-estimation images")
    export.add_argument("--data_dir", default=None, help="local copy of that dataset (see hf_oscq.data)")
    export.add_argument("--batch_size", type=int, default=64)
    export.set_defaults(func=_export_main)

    evaluate = subparsers.add_parser("eval", help="Evaluate an export folder (or one checkpoint) at every bit-width.")
    evaluate.add_argument("folder", help="an export folder (with fp/ and w{b}/) or one checkpoint folder")
    evaluate.add_argument("--dataset", required=True, help="digits, fashion_mnist, cifar10 or tiny-imagenet")
    evaluate.add_argument("--data_dir", default=None, help="local copy of the dataset (see hf_oscq.data)")
    evaluate.add_argument("--max_eval_samples", type=int, default=None)
    evaluate.add_argument("--batch_size", type=int, default=256)
    evaluate.add_argument("--output_json", default=None, help="also write the table here")
    evaluate.set_defaults(func=_eval_main)


def _export_main(args: argparse.Namespace) -> int:
    output = run_export(args)
    sys.stdout.write(f"{output}\n")
    return 0


def _eval_main(args: argparse.Namespace) -> int:
    table = run_eval(args)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(table, indent=2) + "\n")
    sys.stdout.write(format_cross_bit_table({Path(args.folder).name: table}) + "\n")
    return 0
