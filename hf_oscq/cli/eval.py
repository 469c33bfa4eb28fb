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
from . import add_flag, check_counts


def run_eval(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """`hf-oscq eval`: `{variant: {"accuracy": ...}}` of every checkpoint in the folder, or for a causal language
    model `{variant: {"loss": ..., "perplexity": ...}}` on the held-out text of `--dataset` (`kjv` or a Hub text
    dataset); recorded in the export's manifest and cards unless `--no_record`."""
    from ..evaluation import evaluate_folder, load_eval_dataset, record_evaluation
    from ..export.checkpoint import read_config
    from ..export.folder import MANIFEST_NAME, read_training_info, recorded_split, task_for, variant_folders

    check_counts(args, batch_size=1, max_eval_samples=1, block_size=1)
    if args.output_json:
        check_output_path(args.output_json, "--output_json")  # before any checkpoint is evaluated
    folders = variant_folders(Path(args.folder))
    if task_for(read_config(next(iter(folders.values()))))[0] == "text-generation":
        table, samples = _eval_language_model(args, folders)
    else:
        dataset = load_eval_dataset(
            args.dataset,
            split=args.split,
            image_column=args.image_column,
            label_column=args.label_column,
            data_dir=args.data_dir,
            max_samples=args.max_eval_samples,
            # the run's own test images: the digits split depends on the recorded seed
            seed=recorded_split(args.dataset, read_training_info(next(iter(folders.values()))))["seed"],
        )
        table = evaluate_folder(args.folder, dataset, args.batch_size, _recipe_processor(args.dataset))
        samples = len(dataset)
    folder = Path(args.folder)
    if not args.no_record and (folder / MANIFEST_NAME).is_file():
        from ..hub.model_card import write_model_cards
        from ..scripts.data import DATASETS

        recipe_dataset = DATASETS.get(args.dataset)
        evaluation = {
            "dataset": args.dataset,
            "dataset_id": recipe_dataset.hub_id if recipe_dataset else None,  # as the training record names it
            "split": args.split,
            "samples": samples,
        }
        kept = "Pass --no_record to evaluate without writing into the export folder."
        with os_errors(f"record the evaluation in {folder}", kept):
            record_evaluation(folder, table, evaluation)
            write_model_cards(folder)
    return table


def _eval_language_model(args: argparse.Namespace, folders: dict[str, Path]) -> tuple[dict, int]:
    """Loss and perplexity of every checkpoint on `--block_size`-token blocks of the held-out text (at most
    `--max_eval_samples` blocks), each tokenized with the checkpoint's saved tokenizer; and the number of blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..scripts.text import KJV, TokenBlocks, load_hub_text, load_kjv
    from ..training.metrics import evaluate_perplexity

    corpus = load_kjv() if args.dataset == KJV else load_hub_text(args.dataset, args.dataset_config)
    table, blocks = {}, 0
    for name, path in folders.items():
        text = TokenBlocks(corpus.eval, AutoTokenizer.from_pretrained(path), args.block_size, args.max_eval_samples)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        table[name], blocks = evaluate_perplexity(model, text, args.batch_size), len(text)
    return table, blocks


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
    from ..quantization.ptq import format_cross_bit_table

    table = run_eval(args)
    if args.output_json:
        with os_errors(f"write --output_json {args.output_json}"):
            Path(args.output_json).write_text(json.dumps(table, indent=2) + "\n")
    note = rounding_note(args.folder)
    if note:
        sys.stdout.write(f"Quantized checkpoints: {note}.\n")
    metric = "perplexity" if any("perplexity" in row for row in table.values()) else "accuracy"
    sys.stdout.write(format_cross_bit_table({Path(args.folder).name: table}, metric) + "\n")
    return 0
