import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_oscq.training.metrics import (
    ACCURACY_METRIC,
    classification_metrics,
    compute_accuracy,
    cross_bit_table,
    evaluate_accuracy,
    load_metric,
    top1_accuracy,
)


def test_top1_accuracy_counts_argmax_hits():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [0.0, 5.0]])
    labels = np.array([1, 0, 1, 0])
    assert top1_accuracy(logits, labels) == (2, 4) == top1_accuracy(torch.tensor(logits), torch.tensor(labels))
    assert compute_accuracy(EvalPrediction(predictions=(logits, None), label_ids=labels)) == {"accuracy": 0.5}


def test_evaluate_accuracy_over_batches():
    class Model(torch.nn.Module):
        def forward(self, pixel_values):
            return type("Out", (), {"logits": pixel_values})()

    dataset = [{"pixel_values": torch.tensor([float(i % 3 == 0), 0.5]), "labels": torch.tensor(0)} for i in range(10)]
    assert evaluate_accuracy(Model(), dataset, batch_size=3) == {"accuracy": 0.4}  # i = 0, 3, 6, 9


def test_cross_bit_table_from_trainer_metrics():
    metrics = {
        "test_w8_accuracy": 0.8,
        "test_accuracy": 0.9,
        "test_w2_loss": 1.5,
        "test_w10_accuracy": 0.85,
        "test_runtime": 3.0,
        "eval_accuracy": 0.1,
    }
    table = cross_bit_table(metrics)
    assert table == {"fp": {"accuracy": 0.9}, "w2": {"loss": 1.5}, "w8": {"accuracy": 0.8}, "w10": {"accuracy": 0.85}}
    assert list(table) == ["fp", "w2", "w8", "w10"]
    assert cross_bit_table(metrics, prefix="eval") == {"fp": {"accuracy": 0.1}}


def _count_hits(predictions, references):
    hits = 0
    for predicted, reference in zip(predictions, references):
        hits += int(predicted == reference)
    return hits


def test_shipped_accuracy_module_equals_a_count_and_loads_without_network(monkeypatch):
    import socket

    import evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate.load touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_EVALUATE_OFFLINE", raising=False)
    metric = evaluate.load(ACCURACY_METRIC, keep_in_memory=True)
    generator = np.random.default_rng(0)
    references = generator.integers(0, 5, size=997)
    predictions = np.where(generator.random(997) < 0.7, references, generator.integers(0, 5, size=997))
    hits = _count_hits(predictions.tolist(), references.tolist())
    assert metric.compute(predictions=predictions, references=references) == {"accuracy": hits / 997}
    assert metric.compute(predictions=predictions, references=references, normalize=False) == {"accuracy": hits}
    weights = generator.random(997)
    weighted = sum(w for p, r, w in zip(predictions, references, weights) if p == r) / weights.sum()
    result = metric.compute(predictions=predictions, references=references, sample_weight=weights)
    assert result["accuracy"] == pytest.approx(weighted, rel=1e-12)
    assert load_metric("accuracy") is load_metric(ACCURACY_METRIC) is load_metric()


def test_classification_metrics_takes_any_evaluate_module(tmp_path):
    # A second metric, written as a user would write one: the fraction of predictions of class 0.
    folder = tmp_path / "zero_rate"
    folder.mkdir()
    (folder / "zero_rate.py").write_text(
        "import datasets\nimport evaluate\nimport numpy as np\n\n"
        "class ZeroRate(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', features=datasets.Features(\n"
        "            {'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')}))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'zero_rate': float(np.mean(np.asarray(predictions) == 0))}\n"
    )
    import evaluate

    logits = np.array([[0.1, 0.9, 0.0], [2.0, -1.0, 0.0], [0.3, 0.2, 0.1], [0.0, 5.0, 9.0], [1.0, 0.0, 0.0]])
    labels = np.array([1, 0, 1, 2, 2])  # argmax: 1, 0, 0, 2, 0 -> 3 hits, three zeros
    compute = classification_metrics("accuracy", evaluate.load(str(folder)))
    assert compute(EvalPrediction(predictions=(logits, None), label_ids=labels)) == {
        "accuracy": 3 / 5,
        "zero_rate": 3 / 5,
    }
    assert classification_metrics(str(folder))(EvalPrediction(predictions=logits, label_ids=labels)) == {
        "zero_rate": 3 / 5
    }
    counted = classification_metrics(("accuracy", {"normalize": False}))
    assert counted(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 3}
