import numpy as np
import torch
from transformers import EvalPrediction

from hf_oscq.training.metrics import compute_accuracy, cross_bit_table, evaluate_accuracy, top1_accuracy


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
