"""`osc_method="kure"`: KURE (Shkolnik et al., "Robust Quantization: One Model to Rule Them All", NeurIPS 2020):
`task loss + osc_lambda x mean over layers of (Kurt(W_l) - osc_kurtosis_target)^2`, full-precision forward pass, then
rounded after training at any bit-width (docs/RESULTS.md compares it with the regularizer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import OscqValueError
from ...quantization.kurtosis import validate_kurtosis_target, weights_kurtosis_penalty
from .base import MethodLoss, TrainingMethod, TrainingStep

KURE_PAPER = "[KURE](https://arxiv.org/abs/2002.07686) (Shkolnik et al., NeurIPS 2020)"


class KurtosisRegularization(TrainingMethod):
    name = "kure"
    label = "KURE"
    short_label = "KURE"
    trained_how = f"with the kurtosis regularizer {KURE_PAPER}, a peer of the regularizer of {{paper}}"
    default_lambda = 1.0  # the reference runs' (their script's default is 1e-2)
    settings = ("osc_kurtosis_target",)
    trains_towards_grid = False  # no quantization grid in its loss

    def validate(self, args) -> None:
        try:
            args.osc_kurtosis_target = validate_kurtosis_target(args.osc_kurtosis_target)
        except OscqValueError as error:
            raise OscqValueError(f"Invalid osc_kurtosis_target: {error}") from None

    def loss(self, step: TrainingStep) -> MethodLoss:
        penalty = weights_kurtosis_penalty(step.weights(), step.args.osc_kurtosis_target)
        step.before_forward(penalty)
        loss, outputs = step.task_loss()
        return MethodLoss(loss, outputs, {"kurtosis_penalty": (penalty, step.args.osc_lambda)})

    def tag(self, settings: Mapping[str, Any]) -> str:
        return f"KURE (lambda {settings.get('osc_lambda')})"

    def sentence(self, settings: Mapping[str, Any]) -> str:
        return (
            f"Trained with the kurtosis regularizer {KURE_PAPER}: `osc_lambda = {settings.get('osc_lambda')}` times "
            f"the mean over the quantized layers of (kurtosis - {settings.get('osc_kurtosis_target', 1.8)})^2, "
            "full-precision forward pass, then rounded after training."
        )
