"""The model card `OscillationTrainer.create_model_card` writes (and `trainer.push_to_hub()` uploads): the method,
its quantization settings, the cross-bit table of the last evaluation, hyperparameters, versions and citation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..paper import CITATION
from ..provenance import Provenance, metric_of, sentence
from ..quantization.ptq import format_cross_bit_table
from ..quantization.variants import FULL_PRECISION
from ..versions import BUILD_WHEEL, INSTALL_COMMAND, INSTALL_FROM_CLONE, library_versions
from .methods import get_method
from .metrics import cross_bit_table

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "templates" / "trainer_card.md"
TAGS = ["hf_oscq", "oscq", "quantization"]
_HYPERPARAMETERS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optim",
    "weight_decay",
    "lr_scheduler_type",
    "seed",
)


def last_evaluation(log_history: Sequence[dict]) -> dict[str, float]:
    """The log entry of the last cross-bit evaluation in a Trainer's `log_history` (empty when there was none)."""
    for entry in reversed(log_history):
        if any(name != FULL_PRECISION for name in cross_bit_table(entry, prefix="eval")):
            return entry
    return {}


def last_cross_bit_table(log_history: Sequence[dict]) -> dict[str, dict[str, float]]:
    """The cross-bit table of the last evaluation in a Trainer's `log_history` (empty when there was none)."""
    return cross_bit_table(last_evaluation(log_history), prefix="eval")


def _shown_hyperparameters(args) -> dict:
    """The run's hyperparameters as a card lists them; the epochs only where they set the length of the run (a
    positive `max_steps` overrides them)."""
    values = {key: getattr(args, key) for key in _HYPERPARAMETERS if hasattr(args, key)}
    if (values.get("max_steps") or -1) > 0:
        values.pop("num_train_epochs", None)
    else:
        values.pop("max_steps", None)
    return values


def _listed(values: str | Sequence[str] | None) -> list[str] | None:
    return [values] if isinstance(values, str) else list(values) if values else None


def _batchnorm_text(args, model_has_batchnorm: bool, forwarded: int | None) -> str:
    if not model_has_batchnorm:
        return "not needed (no BatchNorm layer)"
    if args.osc_bn_recalibration_samples:
        return f"{forwarded or args.osc_bn_recalibration_samples:,} training images"
    return "none (plain rounding, the paper's PTQ)"


def render_trainer_card(
    args,
    log_history: Sequence[dict],
    model_name: str,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    tags: str | Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    model_has_batchnorm: bool = True,
    bn_recalibration_samples: int | None = None,
    provenance: Provenance | None = None,
) -> ModelCard:
    """The card of a training run. Rendered locally (jinja2 template), no network.

    Args:
        args: the run's `OscillationConfig`.
        log_history: the Trainer's `state.log_history` (the last evaluation gives the cross-bit table).
        model_name: the card's title.
        base_model: the model it was fine-tuned from.
        datasets, tags, license, language: card metadata.
        model_has_batchnorm: whether the model has BatchNorm layers (which re-estimation after rounding concerns).
        bn_recalibration_samples: the number of training images the last evaluation re-estimated BatchNorm on
            (fewer than `osc_bn_recalibration_samples` when the training split is smaller); `None`: the setting.
        provenance: what the last evaluation measured (`provenance.trainer_provenance`); the table's caption.
    """
    spec = args.quant_spec
    table = last_cross_bit_table(log_history)
    metric = metric_of(table)
    measured = any(metric in row for row in table.values())
    versions = library_versions()
    data = ModelCardData(
        library_name="transformers",
        model_name=model_name,
        base_model=base_model,
        license=license,
        language=_listed(language),
        datasets=_listed(datasets),
        tags=TAGS + [tag for tag in _listed(tags) or [] if tag not in TAGS],
    )
    values = _shown_hyperparameters(args)
    hyperparameters = [f"| {key} | `{getattr(value, 'value', value)}` |" for key, value in values.items()]  # enums
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        title=model_name,
        method=get_method(args.osc_method).sentence(args.method_settings()),
        osc_method=args.osc_method,
        osc_lambda=args.osc_lambda if get_method(args.osc_method).uses_lambda else None,
        bits=spec.bits,
        levels=2 * spec.max_code + 1,
        granularity=spec.describe_granularity,
        targets=", ".join(f"`{t}`" for t in spec.target_modules) if spec.target_modules else "Linear, Conv, Embedding",
        excludes=", ".join(f"`{t}`" for t in spec.exclude_modules or ()),
        bn_samples=_batchnorm_text(args, model_has_batchnorm, bn_recalibration_samples),
        metric=metric,
        measured_on=sentence(provenance.describe()) if provenance is not None and measured else None,
        cross_bit_table=format_cross_bit_table({model_name: table}, metric)
        if measured
        else "No evaluation with an accuracy or perplexity was logged: pass compute_metrics and evaluate.",
        eval_bits=" ".join(map(str, args.osc_eval_bits)),
        hyperparameters="\n".join(["| hyperparameter | value |", "|---|---|", *hyperparameters]),
        versions=", ".join(f"{name} {version}" for name, version in versions.items()),
        install=INSTALL_COMMAND,
        install_from_clone=INSTALL_FROM_CLONE,
        build_wheel=BUILD_WHEEL,
        citation=CITATION,
    )
