"""`osc_method="qat"`: quantization-aware training, the forward pass through weights fake-quantized at `osc_bits`
(straight-through estimator); the paper's QAT baseline (PAPER.md section 4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...paper import PAPER
from .base import MethodLoss, TrainingMethod, TrainingStep


class QuantizationAwareTraining(TrainingMethod):
    name = "qat"
    label = "QAT"
    short_label = "QAT"
    trained_how = "with quantization-aware training (the baseline of {paper})"
    quantized_forward = True

    def loss(self, step: TrainingStep) -> MethodLoss:
        loss, outputs = step.task_loss(step.spec)
        return MethodLoss(loss, outputs)

    def sentence(self, settings: Mapping[str, Any]) -> str:
        return f"Trained with quantization-aware training at {settings.get('osc_bits')} bits (baseline of {PAPER})."
