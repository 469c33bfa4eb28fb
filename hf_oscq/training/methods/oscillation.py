"""`osc_method="oscillation"`: the paper's regularizer (PAPER.md section 3), `task loss + osc_lambda x
sum over layers of mean(q_b(W)^2 - W^2)`, full-precision forward pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...paper import PAPER
from ...quantization.fused import fused_oscillation_penalty
from .base import MethodLoss, TrainingMethod, TrainingStep


class OscillationRegularizer(TrainingMethod):
    name = "oscillation"
    label = "oscillation regularizer"
    short_label = "Oscillation"
    trained_how = "with the oscillation regularizer of {paper}"
    default_lambda = 10.0
    settings = ("osc_penalty_normalization",)

    def loss(self, step: TrainingStep) -> MethodLoss:
        # Before the forward pass: autograd then runs the penalty's backward last and adds its gradient into the task
        # gradient in place instead of allocating a sum.
        penalty = fused_oscillation_penalty(
            step.weights(),
            workspace=step.trainer._osc_workspace,
            spec=step.spec,
            normalization=step.args.osc_penalty_normalization,
            out_dims=step.out_dims(),
        )
        step.before_forward(penalty)
        loss, outputs = step.task_loss()
        return MethodLoss(loss, outputs, {"osc_penalty": (penalty, step.args.osc_lambda)})

    def sentence(self, settings: Mapping[str, Any]) -> str:
        normalization = settings.get("osc_penalty_normalization")
        normalized = f" with the `{normalization}` penalty normalization" if normalization else ""
        return (
            f"Trained with the oscillation regularizer of {PAPER} at {settings.get('osc_bits')} bits "
            f"(`osc_lambda = {settings.get('osc_lambda')}`){normalized}, full-precision forward pass, then rounded "
            "after training."
        )
