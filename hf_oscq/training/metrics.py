"""Metrics, in one place, through Hugging Face `evaluate`: the Trainer's `compute_metrics`, a model evaluated on a
dataset (the CLI; a language model's perplexity too), and cross-bit tables read back from Trainer metrics
(`eval_w3_accuracy` -> `{"w3": {"accuracy": ...}}`).

Accuracy is the `evaluate` module shipped in `hf_oscq/evaluate_modules/accuracy/`, loaded by path, so it works
offline; any other `evaluate` module (`evaluate.load("f1")`, `evaluate.combine([...])`) plugs into
`classification_metrics` the same way.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import OscqError, OscqValueError
from ..quantization.variants import FULL_PRECISION, sort_variants

if TYPE_CHECKING:
    import evaluate

# The accuracy module's folder: `evaluate.load(ACCURACY_METRIC)` reads it without any network access.
ACCURACY_METRIC = str(Path(__file__).resolve().parent.parent / "evaluate_modules" / "accuracy")


def load_metric(path: str = ACCURACY_METRIC) -> evaluate.EvaluationModule:
    """`evaluate.load(path, keep_in_memory=True)`, once per path.

    Args:
        path: a metric folder or script, or a Hub metric name such as `"f1"` (that needs the network the first
            time, then `evaluate`'s cache). `"accuracy"` and the default are hf_oscq's accuracy module (offline).

    Returns:
        The `evaluate.EvaluationModule`.
    """
    return _load_metric(ACCURACY_METRIC if path == "accuracy" else path)


@functools.cache
def _load_metric(path: str) -> evaluate.EvaluationModule:
    try:
        import evaluate
    except ImportError:
        raise OscqError(
            "hf_oscq computes its metrics with Hugging Face evaluate, which is not installed: pip install evaluate."
        ) from None
    return evaluate.load(path, keep_in_memory=True)


def _module(metric: str | evaluate.EvaluationModule) -> evaluate.EvaluationModule:
    return load_metric(metric) if isinstance(metric, str) else metric


def _logits(predictions: Any) -> np.ndarray | torch.Tensor:
    """The logits of a model output or of the Trainer's predictions (a tuple holds the logits first)."""
    if isinstance(predictions, tuple | list):
        predictions = predictions[0]
    return getattr(predictions, "logits", predictions)


def predicted_labels(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Top-1 class of each row of `logits` `(n, classes)`, as an int64 array `(n,)`."""
    if torch.is_tensor(logits):
        return logits.detach().argmax(-1).cpu().numpy().astype(np.int64)
    return np.asarray(logits).argmax(axis=-1).astype(np.int64)


def _as_array(values: np.ndarray | torch.Tensor | Iterable[int]) -> np.ndarray:
    return values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)


def classification_metrics(
    *metrics: str | evaluate.EvaluationModule | tuple[str | evaluate.EvaluationModule, dict[str, Any]],
) -> Callable[[Any], dict[str, float]]:
    """A Trainer `compute_metrics` from `evaluate` modules: top-1 predictions of the logits, then every module's
    `compute(predictions=..., references=...)`, merged into one dict.

    Args:
        *metrics: `evaluate` modules (`evaluate.load("f1")`, an `evaluate.combine([...])`) or their paths / names,
            each optionally paired with its `compute` keyword arguments: `(evaluate.load("f1"), {"average":
            "macro"})`. None means accuracy (hf_oscq's offline module).

    Returns:
        A `ClassificationMetrics`: a function of an `EvalPrediction` returning `{"accuracy": ..., ...}` (the
        Trainer prefixes the keys: `eval_accuracy`, and `eval_w3_accuracy` in cross-bit evaluation); it also takes
        `batch_eval_metrics=True`'s per-batch calls.

    Example:
        ```python
        import evaluate
        from hf_oscq import OscillationTrainer, classification_metrics

        f1 = (evaluate.load("f1"), {"average": "macro"})
        trainer = OscillationTrainer(..., compute_metrics=classification_metrics("accuracy", f1))
        ```
    """
    modules = [metric if isinstance(metric, tuple) else (metric, {}) for metric in metrics or (ACCURACY_METRIC,)]
    return ClassificationMetrics(modules)


class ClassificationMetrics:
    """The `compute_metrics` `classification_metrics` returns: called with a whole evaluation's `EvalPrediction`, or,
    with `batch_eval_metrics=True`, once per batch with `compute_result` (the Trainer's protocol: the batches are
    accumulated and the result returned at the last one). `reset()` drops accumulated batches; the
    `OscillationTrainer` calls it before every evaluation pass, so each bit-width starts from clean state.
    """

    def __init__(self, modules: list[tuple[Any, dict[str, Any]]]):
        self.modules = modules
        self.reset()

    def reset(self) -> None:
        self._predictions: list[np.ndarray] = []
        self._references: list[np.ndarray] = []

    def __call__(self, eval_prediction, compute_result: bool | None = None) -> dict[str, float]:
        if eval_prediction.label_ids is None:
            raise OscqValueError(
                "No labels reached compute_metrics: name the evaluation dataset's label column `labels` (or "
                "`label`), or set label_names=[...]; a column the model's forward does not take is removed by the "
                "Trainer unless remove_unused_columns=False."
            )
        predictions = predicted_labels(_logits(eval_prediction.predictions))
        references = _as_array(eval_prediction.label_ids)
        if compute_result is None:  # the whole evaluation at once
            return self._compute(predictions, references)
        self._predictions.append(predictions)
        self._references.append(references.reshape(-1))
        if not compute_result:
            return {}
        predictions, references = np.concatenate(self._predictions), np.concatenate(self._references)
        self.reset()
        return self._compute(predictions, references)

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        results: dict[str, float] = {}
        for metric, options in self.modules:
            results.update(_module(metric).compute(predictions=predictions, references=references, **options))
        return results


def compute_accuracy(eval_prediction, compute_result: bool | None = None) -> dict[str, float]:
    """`compute_metrics` for the Trainer: `{"accuracy": top-1 accuracy}` of an `EvalPrediction` (the default of
    `OscillationTrainer` for classifiers). With `batch_eval_metrics=True` the `OscillationTrainer` uses a fresh
    `classification_metrics()` instead, which accumulates the batches."""
    if compute_result is not None:
        raise OscqValueError(
            "compute_accuracy scores a whole evaluation; with batch_eval_metrics=True pass "
            "compute_metrics=classification_metrics() (which accumulates the batches), or leave compute_metrics unset."
        )
    return classification_metrics()(eval_prediction)


def top1_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """`(correct, total)`: how many argmax predictions of `logits` `(n, classes)` equal `labels` `(n,)`."""
    labels = _as_array(labels)
    result = load_metric().compute(predictions=predicted_labels(logits), references=labels, normalize=False)
    return int(result["accuracy"]), int(labels.size)


def evaluate_model(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    metric: str | evaluate.EvaluationModule = ACCURACY_METRIC,
    input_names: tuple[str, ...] = ("pixel_values",),
) -> dict[str, float]:
    """Runs `model` on every batch and computes an `evaluate` metric of its top-1 predictions.

    Args:
        model: a classifier returning logits (an output with `.logits`, a tuple or a tensor), `(batch, classes)`.
        batches: mappings holding the model inputs `input_names` and `labels`.
        metric: an `evaluate` module or its path / name (default: accuracy).
        input_names: the keys of each batch passed to the model as keyword arguments.

    Returns:
        The metric's result, e.g. `{"accuracy": 0.93}`.
    """
    module = _module(metric)
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad():
        for batch in batches:
            inputs = {name: torch.as_tensor(batch[name]).to(device) for name in input_names}
            predictions = predicted_labels(_logits(model(**inputs)))
            module.add_batch(predictions=predictions, references=_as_array(batch["labels"]))
    return module.compute()


def evaluate_accuracy(model: torch.nn.Module, dataset, batch_size: int = 256) -> dict[str, float]:
    """`{"accuracy": top-1 accuracy}` of an image classifier on a dataset yielding `pixel_values` and `labels`."""
    return evaluate_model(model, torch.utils.data.DataLoader(dataset, batch_size=batch_size))


def evaluate_perplexity(model, dataset, batch_size: int = 16) -> dict[str, float]:
    """`{"loss": ..., "perplexity": exp(loss)}` of a causal language model on a dataset of equal-length `input_ids`
    blocks: the mean next-token cross-entropy over every predicted token."""
    total = count = 0.0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    with torch.no_grad():
        for batch in loader:
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            )
            count += ids[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


def cross_bit_table(metrics: Mapping[str, float], prefix: str = "test") -> dict[str, dict[str, float]]:
    """Trainer metrics -> a cross-bit table: `{"test_accuracy": .9, "test_w3_accuracy": .8, ...}` ->
    `{"fp": {"accuracy": .9}, "w3": {"accuracy": .8}}` (accuracy, loss and a language model's perplexity), full
    precision first."""
    table: dict[str, dict[str, float]] = {}
    pattern = re.compile(rf"{prefix}_(?:(w\d+)_)?(accuracy|loss|perplexity)")
    for key, value in metrics.items():
        match = pattern.fullmatch(key)
        if match:
            table.setdefault(match.group(1) or FULL_PRECISION, {})[match.group(2)] = float(value)
    return {name: table[name] for name in sort_variants(table)}
