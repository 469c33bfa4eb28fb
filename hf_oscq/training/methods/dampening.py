"""`osc_method="dampening"`: oscillation dampening (Nagel et al., "Overcoming Oscillations in Quantization-Aware
Training", ICML 2022) on top of QAT at `osc_bits`: `task loss (fake-quantized forward) + osc_lambda(t) x sum over
layers of mean((q(W).detach() - W)^2)`, which pulls each weight towards its grid point, the opposite of the
paper's regularizer. With `osc_dampening_schedule="cosine"` (their schedule) the weight is 0 for the first quarter of
training, then rises along a cosine to `osc_lambda` at the last step; `"constant"` uses `osc_lambda` throughout."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ...errors import OscqValueError
from ...quantization.dampening import weights_dampening_penalty
from .base import MethodLoss, TrainingMethod, TrainingStep

NAGEL_PAPER = "[oscillation dampening](https://arxiv.org/abs/2203.11086) (Nagel et al., ICML 2022)"
DAMPENING_SCHEDULES = ("cosine", "constant")
# The reference code's `--oscillations-dampen-anneal-start`: the fraction of training before the weight rises.
RAMP_START = 0.25


def dampening_weight(osc_lambda: float, progress: float, schedule: str) -> float:
    """The dampening term's weight at `progress` (fraction of training done, in [0, 1]): `osc_lambda` throughout for
    `"constant"`; for `"cosine"`, 0 until `RAMP_START`, then `osc_lambda * (1 - cos(pi * t)) / 2` with `t` rising
    from 0 to 1 over the rest (the reference code's `CosineTempDecay` from 0 to its final weight)."""
    if schedule == "constant":
        return osc_lambda
    if progress <= RAMP_START:
        return 0.0
    t = min(1.0, (progress - RAMP_START) / (1 - RAMP_START))
    return osc_lambda * (1 - math.cos(math.pi * t)) / 2


class OscillationDampening(TrainingMethod):
    name = "dampening"
    label = "oscillation dampening"
    short_label = "Dampening"
    trained_how = f"with QAT and {NAGEL_PAPER}, the opposite of the regularizer of {{paper}}"
    # In layer-mean units, the reference runs' final weight 0.1 with kernel_mean (a sum over output channels) is
    # 0.1 x (64..512 channels): 6-51 for ResNet-18's layers; 10 mirrors the regularizer's default pull.
    default_lambda = 10.0
    settings = ("osc_dampening_schedule",)
    quantized_forward = True

    def validate(self, args) -> None:
        if args.osc_dampening_schedule not in DAMPENING_SCHEDULES:
            raise OscqValueError(
                f"osc_dampening_schedule must be one of {DAMPENING_SCHEDULES} ('cosine': 0 for the first quarter of "
                f"training, then a cosine rise to osc_lambda, as Nagel et al.), got {args.osc_dampening_schedule!r}."
            )

    def loss(self, step: TrainingStep) -> MethodLoss:
        penalty = weights_dampening_penalty(step.weights(), step.spec, step.out_dims())
        step.before_forward(penalty)
        loss, outputs = step.task_loss(step.spec)
        weight = dampening_weight(step.args.osc_lambda, step.progress, step.args.osc_dampening_schedule)
        return MethodLoss(loss, outputs, {"dampening_penalty": (penalty, weight)})

    def sentence(self, settings: Mapping[str, Any]) -> str:
        schedule = settings.get("osc_dampening_schedule", "cosine")
        ramp = " (0 for the first quarter of training, then a cosine rise)" if schedule == "cosine" else ""
        return (
            f"Trained with quantization-aware training at {settings.get('osc_bits')} bits and {NAGEL_PAPER}: "
            f"`osc_lambda = {settings.get('osc_lambda')}`{ramp} times the mean squared distance of each weight to its "
            "grid point, then rounded after training."
        )
