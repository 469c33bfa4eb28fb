"""Top-1 accuracy as an `evaluate` metric module, shipped inside hf_oscq so that it loads offline by path:

```python
import evaluate
from hf_oscq.training.metrics import ACCURACY_METRIC

accuracy = evaluate.load(ACCURACY_METRIC)
accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {"accuracy": 0.666...}
```

Same inputs and output as the Hub's `evaluate-metric/accuracy` (which needs the network to load), without its
scikit-learn dependency.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Accuracy is the fraction of predictions equal to their reference: (TP + TN) / (TP + TN + FP + FN)
for binary labels, correct / total for any number of classes."""

_INPUTS = """
Args:
    predictions (`list` of `int`): predicted labels, `(n,)`.
    references (`list` of `int`): true labels, `(n,)`.
    normalize (`bool`, defaults to `True`): `False` returns the number of correct predictions instead of the
        fraction.
    sample_weight (`list` of `float`, *optional*): a weight per sample; the result is the weighted fraction.

Returns:
    `{"accuracy": float}` in [0, 1], or the (weighted) count of correct predictions when `normalize=False`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        hits = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(hits.shape) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        correct = float((hits * weights).sum())
        if not normalize:
            return {"accuracy": correct if sample_weight is not None else int(correct)}
        return {"accuracy": correct / float(weights.sum())}
