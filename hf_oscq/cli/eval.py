"""`hf-oscq eval`: the cross-bit accuracy table of an export folder (or one checkpoint) on any image classification
dataset, each checkpoint preparing the images with its own saved image processor; for a causal language model, the
loss and perplexity on held-out text with its saved tokenizer. On an export folder the table goes into
`oscq_export.json` and the model cards are rendered again, so they (and `hf-oscq push`) carry it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import os_errors
from ..paths import check_output_path
from ..provenance import ACCURACY, PERPLEXITY, Provenance, dataset_id
from . import add_flag, check_counts


def run_eval(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """`hf-oscq eval`: `{variant: {"accuracy": ...}}` of every checkpoint in the folder, or for a causal language
    model `{variant: {"loss": ..., "perplexity": ...}}` on the held-out text of `--dataset` (`kjv` or a Hub text
    dataset); recorded in the export's manifest and cards with what it was measured on unless `--no_record`."""
    table, provenance = measure(args)
    record(args, table, provenance)
    return table


def measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], Provenance]:
    """`(run_eval's table, what it was measured on)`; writes nothing (`record` does)."""
    from ..evaluation import checkpoint_batchnorm, evaluate_folder, load_eval_split
    from ..export.checkpoint import read_config
    from ..export.folder import (
        MANIFEST_NAME,
        read_export_manifest,
        read_training_info,
        recorded_split,
        task_for,
        variant_folders,
        verify_checkpoint_folder,
    )
    from ..label_map import parse_label_map
    from ..scripts.data import DATASETS

    check_counts(args, batch_size=1, max_eval_samples=1, block_size=1)
    if args.output_json:
        check_output_path(args.output_json, "--output_json", "file")  # before any checkpoint is evaluated
    label_map = parse_label_map(args.label_map)
    if (Path(args.folder) / MANIFEST_NAME).is_file():  # an export: complete, with a readable manifest
        read_export_manifest(args.folder)
    folders = variant_folders(Path(args.folder))
    for path in folders.values():  # every file checked before the first checkpoint is evaluated
        verify_checkpoint_folder(path)
    recipe_dataset = DATASETS.get(args.dataset) if not Path(args.dataset).exists() else None
    if task_for(read_config(next(iter(folders.values()))))[0] == "text-generation":
        table, provenance = _eval_language_model(args, folders)
    else:
        dataset, split = load_eval_split(
            args.dataset,
            split=args.split,
            image_column=args.image_column,
            label_column=args.label_column,
            data_dir=args.data_dir,
            max_samples=args.max_eval_samples,
            # the run's own test images: the digits split depends on the recorded seed
            seed=recorded_split(args.dataset, read_training_info(next(iter(folders.values()))))["seed"],
        )
        table = evaluate_folder(args.folder, dataset, args.batch_size, _recipe_processor(args.dataset), label_map)
        batchnorm, bn_samples = checkpoint_batchnorm(args.folder)
        provenance = Provenance(
            ACCURACY,
            dataset_id(args.dataset, recipe_dataset and (recipe_dataset.hub_id or recipe_dataset.name)),
            split,
            examples=len(dataset),
            batchnorm=batchnorm,
            bn_samples=bn_samples,
        )
    return table, provenance


def record(args: argparse.Namespace, table: dict, provenance: Provenance) -> None:
    """Records `table` in the export's manifest and cards (an export folder, unless `--no_record`): the last step of
    `hf-oscq eval`, so that a failure before it leaves them as they were."""
    from ..evaluation import record_evaluation
    from ..export.folder import MANIFEST_NAME
    from ..hub.model_card import write_model_cards

    folder = Path(args.folder)
    if not args.no_record and (folder / MANIFEST_NAME).is_file():
        kept = "Pass --no_record to evaluate without writing into the export folder."
        with os_errors(f"record the evaluation in {folder}", kept):
            record_evaluation(folder, table, provenance)
            write_model_cards(folder)


def _eval_language_model(args: argparse.Namespace, folders: dict[str, Path]) -> tuple[dict, Provenance]:
    """Loss and perplexity of every checkpoint on `--block_size`-token blocks of the held-out text (at most
    `--max_eval_samples` blocks), each tokenized with the checkpoint's saved tokenizer; and what they were measured
    on (the blocks and predicted tokens of the first checkpoint's tokenizer: one family shares it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..scripts.text import KJV, TokenBlocks, load_hub_text, load_kjv
    from ..training.metrics import evaluate_perplexity

    corpus = load_kjv() if args.dataset == KJV else load_hub_text(args.dataset, args.dataset_config)
    table, provenance = {}, None
    for name, path in folders.items():
        text = TokenBlocks(corpus.eval, AutoTokenizer.from_pretrained(path), args.block_size, args.max_eval_samples)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        table[name] = evaluate_perplexity(model, text, args.batch_size)
        blocks = len(text)
        provenance = provenance or Provenance(
            PERPLEXITY,
            dataset_id(args.dataset),
            corpus.eval_split,
            examples=blocks,
            tokens=blocks * (args.block_size - 1),
            batchnorm="none",
        )
    return table, provenance


def _recipe_processor(dataset: str):
    """For a recipe dataset, the image processor its recipes save: used for checkpoints saved without one."""
    from ..scripts.data import DATASETS

    if dataset not in DATASETS or Path(dataset).exists():
        return None
    from ..scripts.models import build_image_processor

    return build_image_processor(DATASETS[dataset])


def rounding_note(folder: str | Path) -> str | None:
    """How the quantized checkpoints of an export folder were made (`rounding_sentence` of its manifest), or `None`
    for a folder without a readable manifest (a single checkpoint)."""
    from ..export.folder import ExportFolderError, read_manifest
    from ..hub.model_card import rounding_sentence

    try:
        return rounding_sentence(read_manifest(folder))
    except ExportFolderError:
        return None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate an export folder (or one checkpoint) at every bit-width on any image dataset.",
        description="Accuracy of every checkpoint of an export folder, each preparing the images with its own saved "
        "image processor. On an export folder the table is written into oscq_export.json and the model cards are "
        "rendered again.",
    )
    parser.add_argument("folder", help="an export folder (with fp/ and w{b}/) or one checkpoint folder")
    add_flag(
        parser,
        "dataset",
        required=True,
        help="a Hub dataset id, a local save_to_disk folder, imagefolder (one subfolder per class) or parquet "
        "file(s), or a recipe dataset: digits, fashion_mnist, cifar10, tiny-imagenet; for a language model: kjv "
        "(offline) or a Hub text dataset",
    )
    add_flag(parser, "dataset_config", default=None, help="language models: configuration of a Hub text dataset")
    add_flag(parser, "block_size", type=int, default=128, help="language models: tokens per evaluated sequence")
    add_flag(parser, "split", default=None, help="split to evaluate (default: test, else validation, else train)")
    add_flag(parser, "image_column", default=None, help="column of the images (default: the Image-typed column)")
    add_flag(parser, "label_column", default=None, help="column of the labels (default: the ClassLabel column)")
    add_flag(
        parser,
        "label_map",
        default=None,
        help="JSON object (or .json file) from dataset class names to the model's class names or ids, for classes "
        "whose names differ; by default every class must match a model class by name",
    )
    add_flag(parser, "data_dir", default=None, help="local copy of a recipe dataset (see hf_oscq.scripts.data)")
    add_flag(
        parser, "max_eval_samples", type=int, default=None, help="evaluate the first N samples (text: blocks) only"
    )
    add_flag(parser, "batch_size", type=int, default=256, help="images per forward pass")
    add_flag(parser, "output_json", default=None, help="also write the table to this JSON file")
    add_flag(
        parser,
        "no_record",
        action="store_true",
        help="leave the export's oscq_export.json and model cards unchanged",
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..provenance import sentence
    from ..quantization.ptq import format_cross_bit_table

    table, provenance = measure(args)
    if args.output_json:  # before the export folder is touched: a failure here leaves it as it was
        with os_errors(f"write --output_json {args.output_json}", "The export folder was left as it was."):
            Path(args.output_json).write_text(
                json.dumps({"provenance": provenance.to_dict(), "table": table}, indent=2) + "\n"
            )
    record(args, table, provenance)
    note = rounding_note(args.folder)
    if note:
        sys.stdout.write(f"Quantized checkpoints: {note}.\n")
    sys.stdout.write(f"{sentence(provenance.describe())}.\n")
    sys.stdout.write(format_cross_bit_table({Path(args.folder).name: table}, provenance.metric) + "\n")
    return 0
