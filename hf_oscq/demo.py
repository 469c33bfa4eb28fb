"""`hf-oscq demo`: a tiny ViT on scikit-learn's bundled 8x8 digits, trained in the three modes, then cross-bit PTQ."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .config import OscillationConfig
from .data import load_image_dataset
from .models import build_vit
from .ptq import format_cross_bit_table
from .trainer import OscillationTrainer

logger = logging.getLogger(__name__)


def accuracy(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for classification: top-1 accuracy."""
    predictions = eval_prediction.predictions
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_prediction.label_ids).mean())}


def run_demo(output_dir: str, epochs: float = 15, bits: int = 3, osc_lambda: float = 1.0, seed: int = 0) -> dict:
    """Trains FP, QAT and oscillation models on digits and returns `{method: cross-bit table}`."""
    digits = load_image_dataset("digits", seed=seed)
    train, test = digits.train, digits.eval
    tables = {}
    for method in ("none", "qat", "oscillation"):
        torch.manual_seed(seed)
        args = OscillationConfig(
            output_dir=str(Path(output_dir) / method), osc_method=method, osc_bits=bits, osc_lambda=osc_lambda,
            num_train_epochs=epochs, learning_rate=3e-3, per_device_train_batch_size=64,
            per_device_eval_batch_size=256, eval_strategy="no", save_strategy="no", logging_steps=20,
            report_to=[], seed=seed, use_cpu=True,
        )
        model = build_vit(digits.info, digits.label_names, size="micro")
        trainer = OscillationTrainer(model=model, args=args, train_dataset=train, compute_metrics=accuracy)
        trainer.train()
        metrics = trainer.evaluate(test)
        table = {"fp": {"accuracy": metrics["eval_accuracy"]}}
        table.update({f"w{b}": {"accuracy": metrics[f"eval_w{b}_accuracy"]} for b in args.osc_eval_bits})
        tables[method if method != "none" else "fp"] = table
    (Path(output_dir) / "cross_bit.json").write_text(json.dumps(tables, indent=2))
    return tables


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="Train on bundled digits in the three modes and print the cross-bit table."
    )
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--osc_lambda", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    tables = run_demo(args.output_dir, args.epochs, args.bits, args.osc_lambda, args.seed)
    table = format_cross_bit_table(tables)
    logger.info("Test accuracy (%%) on digits, trained at %d bits:\n%s", args.bits, table)
    sys.stdout.write(table + "\n")  # the command's result, for the terminal
    return 0
