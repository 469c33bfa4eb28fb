"""`OscillationConfig`: the Trainer arguments of hf_oscq."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import OscqValueError
from ..quantization.kurtosis import UNIFORM_KURTOSIS
from ..quantization.penalty import DEFAULT_PENALTY_NORMALIZATION, PENALTY_NORMALIZATIONS, validate_normalization
from ..quantization.spec import (
    DEFAULT_BN_RECALIBRATION_SAMPLES,
    DEFAULT_EVAL_BITS,
    GROUP,
    PER_CHANNEL,
    PER_TENSOR,
    QuantSpec,
    validate_bits,
)
from .guards import check_sharding
from .methods import DEFAULT_METHOD, OSC_METHODS, get_method, method_names
from .methods.dampening import DAMPENING_SCHEDULES
from .methods.multibit import DEFAULT_MULTIBIT_BITS

# The paper's normalization (layer_mean) with lambda 10: the only setting measured to meet the cross-bit goal on
# ResNet-18 (docs/RESULTS.md, pilot: 3-bit training keeps 76.8 % at 2 bits against 13.6 % for FP + PTQ and 17.0 %
# for QAT @3, BatchNorm re-estimated, within 1 point of QAT at 3 bits). No setting measured gives the tiny ViT
# robustness at 2 bits; lambda 10 costs it 7 points against QAT at 3 bits there (62.1 vs 68.8).
DEFAULT_OSC_LAMBDA = get_method(DEFAULT_METHOD).default_lambda


@dataclass
class OscillationConfig(TrainingArguments):
    r"""`TrainingArguments` plus the settings of oscillation training, its QAT baseline and cross-bit evaluation.

    Parsable with `HfArgumentParser` from the command line (`--osc_method qat --osc_bits 3`) and from YAML. The
    quantization settings form one `QuantSpec`, `quant_spec`, which the Trainer hands to the penalty, QAT, PTQ and
    tracking.

    Parameters:
        > Training method

        osc_method (`str`, *optional*, defaults to `"oscillation"`):
            `"oscillation"`: task loss + `osc_lambda` x oscillation penalty, full-precision forward pass (the paper's
            regularizer); `"qat"`: forward pass through fake-quantized weights (the QAT baseline); `"none"`: plain
            training. The peers that make the same promise: `"kure"` (task loss + `osc_lambda` x KURE's kurtosis
            penalty, Shkolnik et al. 2020), `"multibit_qat"` (the mean of the task losses with the weights
            fake-quantized at each of `osc_multibit_bits`), `"dampening"` (QAT + `osc_lambda` x Nagel et al.'s
            dampening term, which pulls weights to their grid points). `hf_oscq.training.methods` holds one module per
            method and the registry of their names.
        osc_lambda (`float`, *optional*):
            Weight of the method's term, >= 0: the oscillation penalty (default 10), KURE's kurtosis penalty
            (default 1, the KURE paper's runs) or the dampening term (default 10). Methods without such a term
            (`"qat"`, `"none"`, `"multibit_qat"`) warn that another value is ignored. The oscillation default, with
            the paper's `"layer_mean"`, is the
            only setting measured to meet the cross-bit goal on ResNet-18 (Fashion-MNIST, 12,000 images, 3 epochs,
            3-bit training, BatchNorm re-estimated: 76.8 % at 2 bits against 13.6 % for FP + PTQ and 17.0 % for QAT,
            85.0 % at 3 bits against QAT's 85.5 %; `"global_mean"` with 100 reached 46.4 % at 2 bits). With the full
            60,000 images (seeds 0 and 1) ResNet-18 keeps 85.0 % and 85.1 % at 2 bits against 14.4 % and 25.6 % for
            FP + PTQ and 67.0 % and 81.3 % for QAT, 89.4 % at 3 bits against QAT's 89.7 % and 90.2 % at full
            precision on the seed means (`"global_mean"` with 100: 49.4 % at 2 bits, 89.5 % at 3). On the tiny ViT
            with the full 60,000 images it keeps 67.0 % and 32.0 % at 2 bits (seeds 0 and 1) against 12.1 % and
            9.6 % for FP + PTQ and 21.7 % and 18.1 % for QAT, and is 1.3 points under QAT at 3 bits on the seed
            mean (`"global_mean"` with 100: 21.9 % and 16.4 % at 2 bits, 76.3 % at 3). See docs/RESULTS.md.
        osc_penalty_normalization (`str`, *optional*, defaults to `"layer_mean"`):
            How the penalty is normalised: `"layer_mean"` (the paper: the sum over layers of each layer's mean of
            `q^2 - w^2`, so a weight's pull is `2 osc_lambda / N_layer`) or `"global_mean"` (the mean over all
            selected weights: the same pull `2 osc_lambda / N` in every layer, so a lambda does not depend on how
            the weights are split into layers; about 10x the layer-mean lambda for a comparable pull on ResNet-18).

        > Quantization (`quant_spec`)

        osc_bits (`int`, *optional*, defaults to `3`):
            Target bit-width of the penalty or of QAT, in [2, 8].
        osc_target_modules (`list[str]`, *optional*):
            Modules whose weights are quantized: names, dotted suffixes or regexes of module names; `"all-weights"`
            for every module with a weight (the paper's reference code). Default: Linear, Conv and Embedding layers.
        osc_exclude_modules (`list[str]`, *optional*):
            Modules kept in float (same pattern syntax). A pattern that matches no module warns.
        osc_per_channel (`bool`, *optional*, defaults to `False`):
            One scale per output channel instead of one per tensor.
        osc_group_size (`int`, *optional*):
            Group-wise scales: one scale per this many input features of each output channel (the output channel is
            dim 1 of GPT-2's `Conv1D`, dim 0 of other layers). Must divide every selected layer's input features.

        > Cross-bit evaluation

        osc_eval_bits (`list[int]`, *optional*, defaults to `[2, 3, 4, 5, 6, 7, 8]`):
            Bit-widths at which every evaluation also evaluates the PTQ'd model, reported as `eval_w{b}_<metric>`
            (e.g. `metric_for_best_model="eval_w3_accuracy"`).
        osc_intermediate_eval_bits (`list[int]`, *optional*):
            Bit-widths evaluated at the evaluations during training, before its last step (a subset of
            `osc_eval_bits`, e.g. `[3]` for the target bit only; `[]` for full precision only). The evaluation at the
            last step and every `trainer.evaluate()` call outside training cover all of `osc_eval_bits`. Default: all
            of `osc_eval_bits` at every evaluation.
        osc_bn_recalibration_samples (`int`, *optional*, defaults to `512`):
            Training samples forwarded to re-estimate BatchNorm statistics after rounding, in cross-bit evaluation
            and in the recipes' export (0 = plain rounding, the paper's PTQ). Rounding invalidates the running
            statistics of a BatchNorm model; models without BatchNorm are not affected. Exactly this many samples
            (all of `train_dataset` when it is smaller), drawn with the run's `seed`, augmentation included, in
            batches of `per_device_eval_batch_size` (`quantization.batchnorm.calibration_batches`).

        > Methods that make the same promise (docs/RESULTS.md compares them)

        osc_kurtosis_target (`float`, *optional*, defaults to `1.8`):
            `"kure"`: the kurtosis each layer's weights are pulled to (1.8: a uniform distribution).
        osc_multibit_bits (`list[int]`, *optional*, defaults to `[2, 4, 8]`):
            `"multibit_qat"`: the bit-widths trained together, one forward and backward pass each per step.
        osc_dampening_schedule (`str`, *optional*, defaults to `"cosine"`):
            `"dampening"`: `"cosine"` (Nagel et al.'s: weight 0 for the first quarter of training, then a cosine
            rise to `osc_lambda`) or `"constant"` (`osc_lambda` throughout).
        > Resuming

        osc_allow_spec_change (`bool`, *optional*, defaults to `False`):
            Resume a checkpoint trained with another `osc_method` or quantization spec (bits, granularity, group
            size, target or exclude modules): training continues from its weights and optimizer state under the
            current settings. Without it such a resume is refused (every checkpoint records its method and spec in
            `oscq_training.json`), since it would silently continue another run.

    Raises:
        OscqValueError: for an unknown method, invalid bit-widths, patterns or numbers, and for sharding the
            quantizer cannot handle (FSDP1, DeepSpeed ZeRO-3, QAT with activation checkpointing).
    """

    osc_method: str = field(
        default=DEFAULT_METHOD,
        metadata={
            "help": "'oscillation': task loss + osc_lambda x oscillation penalty, full-precision forward (the paper's "
            "regularizer); 'qat': forward through fake-quantized weights (the QAT baseline); 'none': plain training; "
            "'kure': + osc_lambda x kurtosis penalty; 'multibit_qat': QAT at every bit of osc_multibit_bits at once; "
            "'dampening': QAT + osc_lambda x oscillation dampening.",
            "choices": list(OSC_METHODS),
        },
    )
    osc_bits: int = field(default=3, metadata={"help": "Target bit-width of the penalty or of QAT, in [2, 8]."})
    osc_lambda: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the method's term: the oscillation penalty (default 10), KURE's (default 1) or the "
            "dampening term (default 10)."
        },
    )
    osc_penalty_normalization: str = field(
        default=DEFAULT_PENALTY_NORMALIZATION,
        metadata={
            "help": "How the penalty is normalised: 'layer_mean' (the paper: the sum over layers of each layer's mean "
            "of q^2 - w^2, a weight's pull 2 osc_lambda / layer size) or 'global_mean' (the mean over all selected "
            "weights: the same pull 2 osc_lambda / N in every layer).",
            "choices": list(PENALTY_NORMALIZATIONS),
        },
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
    osc_group_size: int | None = field(
        default=None,
        metadata={
            "help": "Group-wise scales: one scale per this many input features of each output channel (32-128 for "
            "language models). Must divide every selected layer's input features."
        },
    )
    osc_eval_bits: list[int] = field(
        default_factory=lambda: list(DEFAULT_EVAL_BITS),
        metadata={"help": "Bit-widths at which every evaluation also evaluates the PTQ'd model (eval_w{b}_*)."},
    )
    osc_intermediate_eval_bits: list[int] | None = field(
        default=None,
        metadata={
            "help": "Bit-widths evaluated at the evaluations during training before its last step (a subset of "
            "osc_eval_bits); the last evaluation covers all of osc_eval_bits. Default: all at every evaluation."
        },
    )
    osc_bn_recalibration_samples: int = field(
        default=DEFAULT_BN_RECALIBRATION_SAMPLES,
        metadata={
            "help": "Training samples forwarded to re-estimate BatchNorm statistics after rounding, in cross-bit "
            "evaluation and export, for models with BatchNorm (0 = plain rounding, the paper's PTQ)."
        },
    )

    osc_kurtosis_target: float = field(
        default=UNIFORM_KURTOSIS,
        metadata={"help": "osc_method='kure': the kurtosis each layer's weights are pulled to (1.8: uniform)."},
    )
    osc_multibit_bits: list[int] = field(
        default_factory=lambda: list(DEFAULT_MULTIBIT_BITS),
        metadata={"help": "osc_method='multibit_qat': the bit-widths trained together."},
    )
    osc_dampening_schedule: str = field(
        default="cosine",
        metadata={
            "help": "osc_method='dampening': 'cosine' (0 for the first quarter of training, then a cosine rise to "
            "osc_lambda) or 'constant'.",
            "choices": list(DAMPENING_SCHEDULES),
        },
    )
    osc_allow_spec_change: bool = field(
        default=False,
        metadata={
            "help": "Resume a checkpoint trained with another osc_method or quantization spec (bits, granularity, "
            "group size, target/exclude modules), continuing from its weights and optimizer state under the current "
            "settings; without it such a resume is refused."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        method = get_method(self.osc_method)
        try:
            validate_bits(self.osc_bits)
            self.osc_eval_bits = sorted({validate_bits(b) for b in self.osc_eval_bits})
        except ValueError as error:
            raise OscqValueError(f"Invalid osc_bits / osc_eval_bits: {error}") from None
        if self.osc_intermediate_eval_bits is not None:
            extra = sorted(set(self.osc_intermediate_eval_bits) - set(self.osc_eval_bits))
            if extra:
                raise OscqValueError(
                    f"osc_intermediate_eval_bits {extra} are not in osc_eval_bits {self.osc_eval_bits}: list a subset "
                    "of the bit-widths evaluated at the end."
                )
            self.osc_intermediate_eval_bits = sorted(set(self.osc_intermediate_eval_bits))
            selected = re.fullmatch(r"(?:eval_)?w(\d+)_\w+", self.metric_for_best_model or "")
            if selected and int(selected.group(1)) not in self.osc_intermediate_eval_bits:
                raise OscqValueError(
                    f"metric_for_best_model={self.metric_for_best_model!r} needs {selected.group(1)}-bit evaluation "
                    f"at every evaluation: add {selected.group(1)} to osc_intermediate_eval_bits "
                    f"{self.osc_intermediate_eval_bits}."
                )
        self.quant_spec  # noqa: B018 - validates the patterns
        method.warn_ignored_lambda(self.osc_lambda, DEFAULT_OSC_LAMBDA)
        if self.osc_lambda is None:
            self.osc_lambda = method.default_lambda if method.uses_lambda else DEFAULT_OSC_LAMBDA
        if not (isinstance(self.osc_lambda, (int, float)) and math.isfinite(self.osc_lambda) and self.osc_lambda >= 0):
            raise OscqValueError(f"osc_lambda must be a finite number >= 0, got {self.osc_lambda!r}.")
        self._warn_ignored_settings(method)
        method.validate(self)
        try:
            validate_normalization(self.osc_penalty_normalization)
        except OscqValueError as error:
            raise OscqValueError(f"Invalid osc_penalty_normalization: {error}") from None
        if self.osc_bn_recalibration_samples < 0:
            raise OscqValueError("osc_bn_recalibration_samples must be >= 0 (0 disables BatchNorm re-estimation).")
        check_sharding(self)

    def _warn_ignored_settings(self, method) -> None:
        """Warns for each setting of another method that differs from its default: the run ignores it."""
        defaults = {item.name: item for item in dataclasses.fields(self)}
        for other in method_names():
            for name in get_method(other).settings:
                if name in method.settings or name not in defaults:
                    continue
                if getattr(self, name) != _default(defaults[name]):
                    warnings.warn(
                        f"{name}={getattr(self, name)!r} is ignored with osc_method={self.osc_method!r}: only "
                        f"osc_method={other!r} uses it.",
                        UserWarning,
                        stacklevel=3,
                    )

    def for_method(self, method: str, **changes) -> OscillationConfig:
        """These arguments for a run of another method (a recipe's baseline): `osc_lambda` back to that method's
        default, and the settings only the other methods read back to theirs, so that none is reported as ignored.
        `changes` are more fields to replace."""
        defaults = {item.name: item for item in dataclasses.fields(self)}
        own = get_method(method).settings
        reset = {
            name: _default(defaults[name])
            for other in method_names()
            for name in get_method(other).settings
            if name not in own and name in defaults
        }
        return dataclasses.replace(self, **{"osc_method": method, "osc_lambda": None, **reset, **changes})

    def method_settings(self) -> dict:
        """The run's method and the settings it reads, as training records and model cards store them: `osc_method`,
        `osc_bits`, `osc_lambda`, `osc_penalty_normalization` and the method's own settings."""
        method = get_method(self.osc_method)
        settings = {
            "osc_method": self.osc_method,
            "osc_bits": self.osc_bits,
            "osc_lambda": self.osc_lambda,
            "osc_penalty_normalization": self.osc_penalty_normalization,
        }
        return settings | {name: getattr(self, name) for name in method.settings}

    def __getstate__(self) -> dict:
        # The Trainer pickles these arguments into training_args.bin in every checkpoint and output folder (and
        # uploads that file with trainer.push_to_hub): pickled copies hold no Hub token. The live object keeps it.
        state = dict(self.__dict__)
        for name in state:
            if name.endswith("_token") and isinstance(state[name], str):
                state[name] = None
        return state

    @property
    def quant_spec(self) -> QuantSpec:
        """The `QuantSpec` of `osc_bits`, `osc_per_channel` / `osc_group_size`, `osc_target_modules` and
        `osc_exclude_modules`."""
        if self.osc_per_channel and self.osc_group_size is not None:
            raise OscqValueError(
                "Set osc_per_channel or osc_group_size, not both: group-wise scales are per output channel too."
            )
        granularity = GROUP if self.osc_group_size is not None else PER_CHANNEL if self.osc_per_channel else PER_TENSOR
        return QuantSpec(
            bits=self.osc_bits,
            granularity=granularity,
            target_modules=self.osc_target_modules,
            exclude_modules=self.osc_exclude_modules,
            group_size=self.osc_group_size,
        )


def _default(item: dataclasses.Field):
    """The default value of a dataclass field."""
    return item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
