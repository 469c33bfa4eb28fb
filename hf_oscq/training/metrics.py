"""Accuracy, in one place: the Trainer's `compute_metrics`, a model evaluated on a dataset (the CLI), and cross-bit
tables read back from Trainer metrics (`eval_w3_accuracy` -> `{"w3": {"accuracy": ...}}`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch

from ..quantization.variants import FULL_PRECISION, sort_variants


def top1_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """`(correct, total)`: how many argmax predictions of `logits` `(n, classes)` equal `labels` `(n,)`."""
    predicted = np.asarray(logits).argmax(axis=-1) if not torch.is_tensor(logits) else logits.argmax(-1).cpu().numpy()
    labels = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    return int((predicted == labels).sum()), int(labels.size)


def compute_accuracy(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for the Trainer: `{"accuracy": top-1 accuracy}` of an `EvalPrediction`."""
    predictions = eval_prediction.predictions
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    correct, total = top1_accuracy(logits, eval_prediction.label_ids)
    return {"accuracy": correct / total}


def evaluate_accuracy(model, dataset, batch_size: int = 256) -> dict[str, float]:
    """`{"accuracy": top-1 accuracy}` of an image classifier on a dataset yielding `pixel_values` and `labels`."""
    correct = total = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    with torch.no_grad():
        for batch in loader:
            right, count = top1_accuracy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
            correct, total = correct + right, total + count
    return {"accuracy": correct / total}


def cross_bit_table(metrics: Mapping[str, float], prefix: str = "test") -> dict[str, dict[str, float]]:
    """Trainer metrics -> a cross-bit table: `{"test_accuracy": .9, "test_w3_accuracy": .8, ...}` ->
    `{"fp": {"accuracy": .9}, "w3": {"accuracy": .8}}` (accuracy and loss), full precision first."""
    table: dict[str, dict[str, float]] = {}
    pattern = re.compile(rf"{prefix}_(?:(w\d+)_)?(accuracy|loss)")
    for key, value in metrics.items():
        match = pattern.fullmatch(key)
        if match:
            table.setdefault(match.group(1) or FULL_PRECISION, {})[match.group(2)] = float(value)
    return {name: table[name] for name in sort_variants(table)}
