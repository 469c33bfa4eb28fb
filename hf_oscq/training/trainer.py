"""`OscillationTrainer`: the Trainer with the oscillation regularizer, a QAT mode and cross-bit evaluation."""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator, MutableMapping

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .. import _compat
from ..errors import OscqValueError
from ..quantization.batchnorm import calibration_batches, counted, has_batchnorm, warn_if_stale_statistics
from ..quantization.fused import PenaltyWorkspace
from ..quantization.ptq import quantized_weights
from ..quantization.selection import output_dim, weight_owners
from ..quantization.sharding import current_weights
from ..quantization.spec import DEFAULT_BN_RECALIBRATION_SAMPLES
from ..quantization.variants import variant_name
from .config import OscillationConfig
from .guards import check_finite_loss
from .input_hints import guard_transform, missing_labels_hint
from .methods import TrainingStep, get_method
from .metrics import classification_metrics, compute_accuracy, cross_bit_table
from .run_record import check_resume, write_run_record
from .token_loss import TokenLoss, shifted_labels

logger = logging.getLogger(__name__)


# Architectures whose logits are one score per class: accuracy is their default metric.
_CLASSIFIER_SUFFIXES = ("ForImageClassification", "ForSequenceClassification")


def _is_classifier(model: nn.Module | None) -> bool:
    return model is not None and type(model).__name__.endswith(_CLASSIFIER_SUFFIXES)


class OscillationTrainer(Trainer):
    """A `Trainer` that trains with the oscillation regularizer (or a baseline or peer method) and evaluates every
    bit-width.

    * `osc_method="oscillation"`: loss = task loss + `osc_lambda` x `oscillation_penalty`, training only; the forward
      pass uses the full-precision weights.
    * `osc_method="qat"`: the forward pass sees fake-quantized weights (straight-through estimator); the model keeps
      its latent full-precision weights and parameter names.
    * `osc_method="none"`: plain training.
    * `osc_method="kure"`, `"multibit_qat"`, `"dampening"`: the peers that make the same promise (KURE's kurtosis
      penalty, QAT at several bit-widths at once, QAT with Nagel et al.'s dampening term).

    What each method adds to the loss or the forward pass lives in its module of `hf_oscq.training.methods`; the
    Trainer asks `get_method(args.osc_method)` for the loss of each training step.

    Every evaluation also evaluates the model PTQ'd at each bit of `osc_eval_bits` and reports `eval_w{b}_<metric>`,
    so `metric_for_best_model="eval_w3_accuracy"` selects checkpoints by 3-bit accuracy, as the paper does. For a
    causal language model every evaluation loss is token-level, the sum of the token losses over the number of
    predicted tokens (as `hf-oscq eval` computes it, whatever the evaluation batch size and padding), and also comes
    as a perplexity, `exp(loss)` (`eval_perplexity`, `eval_w{b}_perplexity`). Every evaluation reports the number of
    examples it scored (`eval_samples`; for a causal LM `eval_tokens` too), what its numbers were measured on
    (`hf_oscq.provenance`). Training logs carry `task_loss` and each method's penalty under its own name
    (`osc_penalty`, `kurtosis_penalty`, `dampening_penalty`; multi-bit QAT's task loss at each bit-width as
    `task_loss_w2`, ...), averaged over each logging interval.

    Under DDP, the penalty is linked into the wrapped model's output loss (with weight 0: values and gradients are
    unchanged), so that DDP's search for parameters the forward pass did not use (`ddp_find_unused_parameters`, on
    for transformers models) sees every selected weight used: a selected weight that the forward pass skips still
    gets exactly its penalty gradient instead of DDP stopping with "Expected to mark a variable ready only once".

    Metrics: `compute_metrics` defaults to top-1 accuracy (`compute_accuracy`, an `evaluate` module shipped with
    hf_oscq) for image and sequence classifiers, also under `batch_eval_metrics=True`; pass
    `classification_metrics(...)` of any `evaluate` modules, or any function of an `EvalPrediction`, to report
    others. Every evaluation pass (full precision and each bit-width) starts from clean metric state.

    Args:
        model: any model whose forward returns a loss (transformers models, `TimmWrapperForImageClassification`, or
            an `nn.Module` returning `{"loss": ..., "logits": ...}`).
        args: an `OscillationConfig`.
        *trainer_args, **trainer_kwargs: everything else `transformers.Trainer` accepts.

    Attributes:
        bn_recalibration_samples: the number of training images the last evaluation re-estimated BatchNorm on at
            each bit-width (`osc_bn_recalibration_samples`, or the whole training split when it is smaller); 0 for
            plain rounding and models without BatchNorm.
    """

    def __init__(
        self, model: nn.Module | None = None, args: OscillationConfig | None = None, *trainer_args, **trainer_kwargs
    ):
        if not isinstance(args, OscillationConfig):
            raise TypeError(
                f"OscillationTrainer needs args=OscillationConfig(...), got {type(args).__name__}. OscillationConfig "
                "takes every TrainingArguments field plus the osc_* settings."
            )
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.compute_metrics is compute_accuracy or (self.compute_metrics is None and _is_classifier(self.model)):
            # per-batch calls (batch_eval_metrics) need a metric that accumulates; one per Trainer, never shared
            self.compute_metrics = classification_metrics() if args.batch_eval_metrics else compute_accuracy
        self._osc_selected: tuple[nn.Module, dict[str, nn.Module]] | None = None
        self._osc_workspace = PenaltyWorkspace()
        self._osc_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._osc_first_step = 0
        self._osc_removed_columns: set[str] = set()
        self._osc_pending_penalty: torch.Tensor | None = None
        self._osc_hooked: nn.Module | None = None
        # images the last evaluation re-estimated BatchNorm on, at each bit-width (0: plain rounding or none)
        self.bn_recalibration_samples = 0
        # a causal LM's token-level evaluation loss (None for other models)
        self._osc_token_loss: TokenLoss | None = None
        if self.model is not None:
            if is_causal_lm(self.model):
                _compat.count_shifted_labels(self)
                self._osc_token_loss = TokenLoss(self.accelerator.gather_for_metrics)
            # fail now, not at the first step, when the selection matches nothing or the group size fits no layer
            self._quantized_weights()
            samples = args.osc_bn_recalibration_samples
            if samples not in (0, DEFAULT_BN_RECALIBRATION_SAMPLES) and not has_batchnorm(self.model):
                warnings.warn(
                    f"osc_bn_recalibration_samples={args.osc_bn_recalibration_samples} is ignored: the model has no "
                    "BatchNorm layer whose statistics rounding would invalidate.",
                    UserWarning,
                    stacklevel=2,
                )

    def _quantized_weights(self) -> dict[str, nn.Parameter]:
        """The selected weights as registered now (FSDP2 swaps parameter objects; see `weight_owners`)."""
        model = self.model
        if self._osc_selected is None or self._osc_selected[0] is not model:
            owners = weight_owners(model, spec=self.args.quant_spec, group_size_source="osc_group_size")
            self._osc_selected = (model, owners)
        return current_weights(model, self._osc_selected[1])

    def _output_dims(self) -> list[int]:
        """The output-channel dimension of each selected weight, in `_quantized_weights` order."""
        return [output_dim(module) for module in self._osc_selected[1].values()]

    def _hand_penalty_to_output(self, module: nn.Module, args, output):
        """Forward hook on the model DDP wraps: links the pending penalty into the output's loss (`loss + 0 *
        penalty`, the same value and gradients), so that DDP's search for used parameters, which starts from the
        output, finds every selected weight. Outputs without a `loss` entry are left alone."""
        penalty, self._osc_pending_penalty = self._osc_pending_penalty, None
        if penalty is not None and isinstance(output, MutableMapping) and output.get("loss") is not None:
            output["loss"] = output["loss"] + 0.0 * penalty.to(output["loss"].dtype)
        return output

    def _through_ddp(self, model: nn.Module) -> bool:
        """Whether `model` is a DDP wrapping (whose unused-parameter search must see the penalty), hooking the model
        it wraps once."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return False
        if self._osc_hooked is not model.module:
            model.module.register_forward_hook(self._hand_penalty_to_output)
            self._osc_hooked = model.module
        return True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return self._evaluation_loss(model, inputs, return_outputs, num_items_in_batch)
        step = TrainingStep(self, model, inputs, return_outputs, num_items_in_batch)
        result = get_method(self.args.osc_method).loss(step)
        loss = result.task_loss
        check_finite_loss(loss, self.model, self.state.global_step + 1, self.args.fp16)
        # The Trainer divides the returned loss by the accumulation steps unless the task loss is already scaled.
        accumulation = self.current_gradient_accumulation_steps
        trainer_divides = not _compat.loss_is_scaled_for_gradient_accumulation(self, num_items_in_batch)
        # Metrics are recorded as this micro-batch's share of the optimizer step, like the Trainer's own loss.
        if not self._osc_metrics:
            self._osc_first_step = self.state.global_step
        task_share = accumulation if trainer_divides else 1
        self._osc_metrics["task_loss"].append(loss.detach() / task_share)
        for name, value in result.logs.items():
            self._osc_metrics[name].append(value.detach() / task_share)
        for name, (penalty, weight) in result.penalties.items():
            self._osc_metrics[name].append(penalty.detach() / accumulation)
            loss = loss + (weight if trainer_divides else weight / accumulation) * penalty.to(loss.dtype)
        return (loss, result.outputs) if return_outputs else loss

    def _evaluation_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The task loss of an evaluation batch; a causal LM's token losses are also added to the pass's
        token-level loss (labels read first: a label smoother pops them)."""
        if self._osc_token_loss is None:
            return self._task_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = shifted_labels(inputs)
        loss, outputs = self._task_loss(model, inputs, True, num_items_in_batch)
        self._osc_token_loss.add(outputs, labels)
        return (loss, outputs) if return_outputs else loss

    def _task_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """`Trainer.compute_loss`; a failure for want of labels says how to name them."""
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        except (ValueError, TypeError, KeyError) as error:
            hint = missing_labels_hint(inputs, self.label_names, self._osc_removed_columns)
            if hint is None:
                raise
            raise OscqValueError(f"{type(error).__name__}: {error} {hint}") from error

    def _remove_unused_columns(self, dataset, description: str | None = None):
        pruned = super()._remove_unused_columns(dataset, description)
        removed = set(getattr(dataset, "column_names", None) or []) - set(getattr(pruned, "column_names", None) or [])
        self._osc_removed_columns |= removed
        return guard_transform(pruned, removed, description) if pruned is not dataset else pruned

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (they carry "loss") are emitted on every process at once, so the reduction is safe here.
        if "loss" in logs and self._osc_metrics:
            steps = max(1, self.state.global_step - self._osc_first_step)
            for key, values in self._osc_metrics.items():
                mean = torch.stack([value.float() for value in values]).sum() / steps
                logs[key] = self.accelerator.reduce(mean, reduction="mean").item()
            self._osc_metrics.clear()
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; resuming first checks that the checkpoint was trained with this run's `osc_method` and
        quantization spec (`run_record.check_resume`; `osc_allow_spec_change=True` resumes it anyway)."""
        if resume_from_checkpoint:
            checkpoint = resume_from_checkpoint
            if isinstance(checkpoint, bool):
                from transformers.trainer_utils import get_last_checkpoint

                checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if checkpoint is not None:
                check_resume(checkpoint, self.args)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the run's method and spec in `oscq_training.json` beside the weights (in every
        checkpoint too), which resuming and `hf-oscq export` read."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            folder = output_dir or self.args.output_dir
            os.makedirs(folder, exist_ok=True)
            write_run_record(folder, self.args)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._load_pretrained_weights(model or self.model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_pretrained_weights(self.model, self.state.best_model_checkpoint):
            super()._load_best_model()

    def _load_pretrained_weights(self, model: nn.Module, folder: str) -> bool:
        """Loads a checkpoint folder's weights through `from_pretrained`, strictly; False where that does not apply.

        The Trainer reloads checkpoints with `load_state_dict(strict=False)` on the raw file, but `save_pretrained`
        writes some architectures (ViT among them) under their legacy key names: the resumed or "best" model would
        silently keep the wrong weights. `from_pretrained` applies the key conversion.
        """
        if (
            not isinstance(model, PreTrainedModel)
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
            or not any(
                os.path.isfile(os.path.join(folder, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
            )
        ):
            return False
        logger.info("Loading model weights from %s through from_pretrained.", folder)
        reloaded = type(model).from_pretrained(folder, config=model.config)
        model.load_state_dict(reloaded.state_dict(), strict=True)
        return True

    def calibration_batches(self) -> Iterator[dict] | None:
        """Training batches for BatchNorm re-estimation after rounding: `osc_bn_recalibration_samples` images drawn
        with the run's `seed` (`quantization.batchnorm.calibration_batches`), the same on every process; `None`
        for plain rounding (0 samples) and for models without BatchNorm.

        Raises:
            OscqValueError: for a BatchNorm model to re-estimate without a `train_dataset`.
        """
        samples = self.args.osc_bn_recalibration_samples
        if samples == 0 or not has_batchnorm(self.model):
            return None
        if self.train_dataset is None:
            raise OscqValueError(
                "The model has BatchNorm layers, whose running statistics rounding invalidates, and the Trainer has "
                "no train_dataset to re-estimate them from: pass train_dataset=... to OscillationTrainer, or set "
                "osc_bn_recalibration_samples=0 for plain rounding (the paper's PTQ)."
            )
        dataset = self.train_dataset
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop columns the model does not take
            dataset = _compat.remove_unused_columns(self, dataset, "calibration")
        batches = calibration_batches(
            dataset, samples, self.args.per_device_eval_batch_size, self.args.seed, collate_fn=self.data_collator
        )
        return (_compat.prepare_inputs(self, batch) for batch in batches)

    def cross_bit_widths(self) -> list[int]:
        """The bit-widths an evaluation starting now covers: `osc_intermediate_eval_bits` during training before its
        last step (when set), else all of `osc_eval_bits`."""
        args = self.args
        intermediate = self.is_in_train and self.state.global_step < self.state.max_steps
        if intermediate and args.osc_intermediate_eval_bits is not None:
            return list(args.osc_intermediate_eval_bits)
        return list(args.osc_eval_bits)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The usual evaluation, then the same at every bit of `cross_bit_widths()` (PTQ'd weights, restored
        afterwards). The progress bar counts the batches of all of these passes.

        The metrics also hold `{metric_key_prefix}_samples`, the number of examples evaluated, and for a causal
        language model `{metric_key_prefix}_tokens`, the number of predicted tokens; its `_loss` and `_perplexity`
        at every bit-width are token-level (`training.token_loss`), whatever the batch size and padding.
        """
        bit_widths = self.cross_bit_widths()
        _compat.start_prediction_progress(self, dataloader, passes=1 + len(bit_widths))
        args = (prediction_loss_only, ignore_keys)
        output = self._evaluation_pass(dataloader, description, *args, metric_key_prefix, count_tokens=True)
        output.metrics[f"{metric_key_prefix}_samples"] = output.num_samples
        spec = self.args.quant_spec
        self.bn_recalibration_samples = 0
        for bits in bit_widths:
            batches, counts = self.calibration_batches(), []
            if batches is not None:
                batches = counted(batches, counts)
            with quantized_weights(self.model, calibration_batches=batches, spec=spec.with_bits(bits)):
                quantized = self._evaluation_pass(
                    dataloader, f"{description} at {bits} bits", *args, f"{metric_key_prefix}_{variant_name(bits)}"
                )
            output.metrics.update(quantized.metrics)
            self.bn_recalibration_samples = sum(counts)  # the same at every bit-width: the same seeded draw
        if self.bn_recalibration_samples and self.is_world_process_zero():
            warn_if_stale_statistics(cross_bit_table(output.metrics, prefix=metric_key_prefix))
        return output

    def _evaluation_pass(
        self, dataloader, description, prediction_loss_only, ignore_keys, prefix: str, count_tokens: bool = False
    ):
        """One `Trainer.evaluation_loop` from clean metric state: the token-level loss and a batch-accumulating
        `compute_metrics` (one with a `reset()`, as `classification_metrics` returns) start empty, so a pass never
        sees the batches of an earlier, interrupted one."""
        reset = getattr(self.compute_metrics, "reset", None)
        if callable(reset):
            reset()
        if self._osc_token_loss is not None:
            self._osc_token_loss.reset()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, prefix)
        if self._osc_token_loss is not None:
            token_metrics = self._osc_token_loss.metrics(prefix)
            if not token_metrics:
                logger.warning(
                    "%s: the model returned no logits with labels, so no token-level loss and perplexity are "
                    "reported (the Trainer's %s_loss is a mean of batch means).",
                    description,
                    prefix,
                )
            if not count_tokens:
                token_metrics.pop(f"{prefix}_tokens", None)
            output.metrics.update(token_metrics)
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, then the accuracy-vs-bit-width figure of its metrics sent to the `report_to`
        integrations that take images (TensorBoard, W&B, MLflow) as `{metric_key_prefix}/accuracy_vs_bits`."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.is_world_process_zero():
            from .report import report_cross_bit_figure

            report_cross_bit_figure(self, metrics, metric_key_prefix)
        return metrics

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Writes `output_dir/README.md`: the method and its settings, the paper's citation, and the cross-bit
        table of the last evaluation with what it was measured on (what `push_to_hub` uploads). Same arguments as
        `Trainer.create_model_card` (`tasks` and `dataset_args` are not used; a single Hub id in `dataset_tags` /
        `dataset` names the evaluation dataset). Nothing is sent anywhere.
        """
        if not self.is_world_process_zero():
            return
        from ..provenance import dataset_id, trainer_provenance
        from .card import last_evaluation, render_trainer_card

        named = [dataset_tags or dataset] if isinstance(dataset_tags or dataset, str) else dataset_tags or dataset
        # the card names the evaluation dataset when one Hub dataset is given (the Trainer holds no dataset id)
        source = dataset_id(named[0]) if named and len(named) == 1 else None
        evaluation = last_evaluation(self.state.log_history)
        provenance = trainer_provenance(self, evaluation, "eval", dataset=source) if evaluation else None
        card = render_trainer_card(
            self.args,
            self.state.log_history,
            model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            base_model=finetuned_from,
            datasets=dataset_tags or dataset,
            tags=tags,
            license=license,
            language=language,
            model_has_batchnorm=has_batchnorm(self.model),
            bn_recalibration_samples=self.bn_recalibration_samples or None,
            provenance=provenance,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is a transformers causal language model (what `AutoModelForCausalLM` builds)."""
    if not isinstance(model, PreTrainedModel):
        return False
    from ..export.folder import task_for

    return task_for({"architectures": [type(model).__name__]})[1] == "AutoModelForCausalLM"
