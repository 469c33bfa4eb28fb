"""`osc_method="none"`: plain full-precision training, rounded after training: the FP + PTQ baseline (PAPER.md
section 4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import MethodLoss, TrainingMethod, TrainingStep

# The comparison key of the plain-training baseline in an export's manifest (full precision, then PTQ).
FP_PTQ = "fp_ptq"


class PlainTraining(TrainingMethod):
    name = "none"
    label = "FP + PTQ"
    short_label = "FP + PTQ"
    trained_how = "in full precision without any quantization term (the FP baseline of {paper})"
    selects_on_full_precision = True
    trains_towards_grid = False

    @property
    def comparison_key(self) -> str:
        return FP_PTQ

    def loss(self, step: TrainingStep) -> MethodLoss:
        loss, outputs = step.task_loss()
        return MethodLoss(loss, outputs)

    def tag(self, settings: Mapping[str, Any]) -> str:
        return self.label

    def sentence(self, settings: Mapping[str, Any]) -> str:
        return "Trained in full precision without any quantization term (the FP + PTQ baseline)."
