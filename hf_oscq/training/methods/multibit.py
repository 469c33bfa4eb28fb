"""`osc_method="multibit_qat"`: multi-bit joint QAT (Any-Precision DNN, Yu et al., AAAI 2021; MatQuant, Nair et al.,
ICML 2025): every step, the mean of the task losses with the shared weights fake-quantized at each bit-width of
`osc_multibit_bits`, one optimizer step. It costs one forward and backward pass per bit-width, and holds that many
forward passes' activations at once. No distillation between bit-widths and no per-bit BatchNorm (the cross-bit
evaluation re-estimates BatchNorm statistics after rounding instead, like for every method)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...errors import OscqValueError
from ...quantization.spec import validate_bits
from ...quantization.variants import variant_name
from .base import MethodLoss, TrainingMethod, TrainingStep

ANY_PRECISION_PAPER = "[Any-Precision DNN](https://arxiv.org/abs/1911.07346) (Yu et al., AAAI 2021)"
DEFAULT_MULTIBIT_BITS = (2, 4, 8)


class MultiBitQAT(TrainingMethod):
    name = "multibit_qat"
    label = "multi-bit QAT"
    short_label = "Multi-bit QAT"
    trained_how = f"with multi-bit joint QAT ({ANY_PRECISION_PAPER}), a peer of the regularizer of {{paper}}"
    settings = ("osc_multibit_bits",)
    quantized_forward = True

    def validate(self, args) -> None:
        bits = args.osc_multibit_bits
        try:
            bits = sorted({validate_bits(b) for b in bits or ()})
        except (TypeError, ValueError) as error:
            raise OscqValueError(f"Invalid osc_multibit_bits: {error}") from None
        if not bits:
            raise OscqValueError(
                f"osc_multibit_bits must list the bit-widths trained together, e.g. {list(DEFAULT_MULTIBIT_BITS)}."
            )
        args.osc_multibit_bits = bits

    def loss(self, step: TrainingStep) -> MethodLoss:
        losses, outputs = {}, None
        for bits in step.args.osc_multibit_bits:
            losses[bits], outputs = step.task_loss(step.spec.with_bits(bits))
        task = torch.stack(list(losses.values())).mean()
        logs = {f"task_loss_{variant_name(bits)}": loss.detach() for bits, loss in losses.items()}
        return MethodLoss(task, outputs, logs=logs)

    def tag(self, settings: Mapping[str, Any]) -> str:
        bits = settings.get("osc_multibit_bits") or DEFAULT_MULTIBIT_BITS
        return f"{self.label} {{{','.join(map(str, bits))}}}"

    def sentence(self, settings: Mapping[str, Any]) -> str:
        bits = ", ".join(map(str, settings.get("osc_multibit_bits") or DEFAULT_MULTIBIT_BITS))
        return (
            f"Trained with multi-bit joint QAT ({ANY_PRECISION_PAPER}): every step, the mean of the task losses with "
            f"the weights fake-quantized at {bits} bits, then rounded after training."
        )
