"""`OscillationConfig`: the Trainer arguments of hf_oscq."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .distributed import check_sharding
from .ptq import DEFAULT_EVAL_BITS
from .quantizer import validate_bits

OSC_METHODS = ("oscillation", "qat", "none")


@dataclass
class OscillationConfig(TrainingArguments):
    """`TrainingArguments` plus the settings of oscillation training, its QAT baseline and cross-bit evaluation.

    Parsable with `HfArgumentParser` from the command line (`--osc_method qat --osc_bits 3`) and from YAML.
    """

    osc_method: str = field(
        default="oscillation",
        metadata={
            "help": "'oscillation': task loss + osc_lambda x oscillation penalty, full-precision forward (the paper's "
            "regularizer); 'qat': forward through fake-quantized weights (the QAT baseline); 'none': plain training.",
            "choices": list(OSC_METHODS),
        },
    )
    osc_bits: int = field(default=3, metadata={"help": "Target bit-width of the penalty or of QAT, in [2, 8]."})
    osc_lambda: float = field(
        default=1.0, metadata={"help": "Weight of the oscillation penalty (osc_method='oscillation' only)."}
    )
    osc_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules whose weights are quantized: names, dotted suffixes or regexes of module names; "
            "'all-weights' for every module with a weight (the paper's reference code). Default: Linear, Conv and "
            "Embedding layers."
        },
    )
    osc_exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules kept in float (same pattern syntax as osc_target_modules)."}
    )
    osc_per_channel: bool = field(
        default=False, metadata={"help": "One scale per output channel instead of one per tensor."}
    )
    osc_eval_bits: list[int] = field(
        default_factory=lambda: list(DEFAULT_EVAL_BITS),
        metadata={"help": "Bit-widths at which every evaluation also evaluates the PTQ'd model (eval_w{b}_*)."},
    )
    osc_bn_recalibration_samples: int = field(
        default=0,
        metadata={
            "help": "Training samples forwarded to re-estimate BatchNorm statistics after rounding, in cross-bit "
            "evaluation (0 = plain rounding, as in the paper)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.osc_method not in OSC_METHODS:
            raise ValueError(f"osc_method must be one of {OSC_METHODS}, got {self.osc_method!r}.")
        try:
            validate_bits(self.osc_bits)
            self.osc_eval_bits = sorted({validate_bits(b) for b in self.osc_eval_bits})
        except ValueError as error:
            raise ValueError(f"Invalid osc_bits / osc_eval_bits: {error}") from None
        if not (isinstance(self.osc_lambda, (int, float)) and math.isfinite(self.osc_lambda) and self.osc_lambda >= 0):
            raise ValueError(f"osc_lambda must be a finite number >= 0, got {self.osc_lambda!r}.")
        if self.osc_bn_recalibration_samples < 0:
            raise ValueError("osc_bn_recalibration_samples must be >= 0 (0 disables BatchNorm re-estimation).")
        check_sharding(self)
