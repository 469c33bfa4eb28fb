"""What a training method is: `TrainingMethod`, the one object that owns what a method adds to the loss or the forward
pass, which settings it reads and how they are validated, its labels and model-card sentences; and `TrainingStep`,
what a method sees of one training step of `OscillationTrainer`."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ...quantization.spec import QuantSpec


@dataclass
class MethodLoss:
    """One training step's loss as a method makes it.

    Attributes:
        task_loss: the task loss (what the model's forward returns; for several forward passes, their mean), a scalar.
        outputs: the model outputs to return with it (the last forward pass's).
        penalties: `{log name: (value, weight)}`: terms added to the loss as `weight * value`, each logged under its
            name (averaged over the logging interval, like the Trainer's `loss`).
        logs: more scalars logged like the task loss (per-bit-width task losses, say).
    """

    task_loss: torch.Tensor
    outputs: Any = None
    penalties: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingStep:
    """One training step of `OscillationTrainer`, as a method sees it: the settings, the selected weights and the
    task loss of a forward pass, with or without fake-quantized weights.

    Args:
        trainer: the `OscillationTrainer`.
        model: the model the Trainer passes to `compute_loss` (possibly wrapped by DDP).
        inputs: the batch.
        return_outputs, num_items_in_batch: as `Trainer.compute_loss` receives them.
    """

    def __init__(self, trainer, model: torch.nn.Module, inputs: dict, return_outputs: bool, num_items_in_batch):
        self.trainer = trainer
        self.model = model
        self.inputs = inputs
        self.return_outputs = return_outputs
        self.num_items_in_batch = num_items_in_batch

    @property
    def args(self):
        """The run's `OscillationConfig`."""
        return self.trainer.args

    @property
    def spec(self) -> QuantSpec:
        """The run's `QuantSpec` (`args.quant_spec`)."""
        return self.trainer.args.quant_spec

    @property
    def progress(self) -> float:
        """The fraction of training done when this step starts, in [0, 1] (`global_step / max_steps`)."""
        state = self.trainer.state
        return min(1.0, state.global_step / state.max_steps) if state.max_steps else 0.0

    def weights(self) -> dict[str, torch.Tensor]:
        """The selected weights as registered now (FSDP2 `DTensor`s under FSDP2), by parameter name."""
        return self.trainer._quantized_weights()

    def out_dims(self) -> list[int]:
        """The output-channel dimension of each selected weight, in `weights()` order."""
        self.trainer._quantized_weights()
        return self.trainer._output_dims()

    def before_forward(self, penalty: torch.Tensor) -> None:
        """Hands a penalty computed before the forward pass to DDP's search for used parameters (a no-op outside
        DDP), so that a selected weight the forward pass skips still gets exactly its penalty gradient."""
        if self.trainer._through_ddp(self.model):
            self.trainer._osc_pending_penalty = penalty

    def task_loss(self, spec: QuantSpec | None = None) -> tuple[torch.Tensor, Any]:
        """`(loss, outputs)` of a forward pass of the batch, with the selected weights fake-quantized at `spec`
        (straight-through estimator) when given, else in full precision."""
        from ...quantization.qat import fake_quantized_forward

        trainer = self.trainer
        if spec is None:
            result = trainer._task_loss(self.model, self.inputs, True, self.num_items_in_batch)
        else:
            with fake_quantized_forward(trainer.model, self.weights(), spec=spec):
                result = trainer._task_loss(self.model, self.inputs, True, self.num_items_in_batch)
        return result


class TrainingMethod(ABC):
    """A training method of `OscillationTrainer` (`osc_method`): subclass it, set the class attributes, implement
    `loss`, and register an instance with `register_method`.

    Attributes:
        name: the `osc_method` value.
        label: the method's name on model cards (`"oscillation regularizer"`).
        short_label: its name in the Space and plot legends (`"Oscillation"`).
        trained_how: how a model was trained, as the export cards' summaries say it (`"with ..."`), `{paper}` standing
            for the paper's link.
        default_lambda: the `osc_lambda` used when none is given; `None` for a method that takes no `osc_lambda`.
        settings: the `OscillationConfig` fields the method reads besides the quantization spec and `osc_lambda`;
            another method's settings set to a non-default value warn that they are ignored.
        quantized_forward: whether forward passes see fake-quantized weights (activation checkpointing would then
            recompute them in full precision, so it is refused).
        sharding_aware: whether the method handles FSDP2-sharded weights (scales and sums over whole tensors).
        trains_towards_grid: whether training depends on the quantization grid (bit-width and scale granularity):
            exporting such a run with another spec than it trained with is refused (`hf-oscq export`).
        selects_on_full_precision: whether checkpoints of this method are selected on full-precision accuracy (the
            FP + PTQ baseline, PAPER.md section 4) rather than the metric at the target bit-width.
        comparison_key: the key of its runs in an export's `comparisons`.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    short_label: ClassVar[str]
    trained_how: ClassVar[str]
    default_lambda: ClassVar[float | None] = None
    settings: ClassVar[tuple[str, ...]] = ()
    quantized_forward: ClassVar[bool] = False
    sharding_aware: ClassVar[bool] = True
    trains_towards_grid: ClassVar[bool] = True
    selects_on_full_precision: ClassVar[bool] = False

    @property
    def comparison_key(self) -> str:
        return self.name

    @property
    def uses_lambda(self) -> bool:
        """Whether the method weighs a term with `osc_lambda`."""
        return self.default_lambda is not None

    def validate(self, args) -> None:
        """Checks the method's own settings on an `OscillationConfig` (and may normalize them in place).

        Raises:
            OscqValueError: for a setting the method cannot use.
        """
        return None

    @abstractmethod
    def loss(self, step: TrainingStep) -> MethodLoss:
        """The loss of one training step."""

    def tag(self, settings: Mapping[str, Any]) -> str:
        """The run's row label in tables (`"QAT @3"`), from its training record or settings (`osc_bits`, ...)."""
        return f"{self.label} @{settings.get('osc_bits')}"

    def sentence(self, settings: Mapping[str, Any]) -> str:
        """How a run was trained, as the model cards open their training section with."""
        return f"Trained with {self.label} (`osc_method={self.name!r}`)."

    def warn_ignored_lambda(self, osc_lambda: float | None, default: float) -> None:
        """Warns that an `osc_lambda` set for a method that takes none is ignored (its default and 0 are quiet)."""
        if not self.uses_lambda and osc_lambda not in (None, 0, default):
            warnings.warn(
                f"osc_lambda={osc_lambda} is ignored with osc_method={self.name!r}: it adds no weighted term.",
                UserWarning,
                stacklevel=3,
            )
