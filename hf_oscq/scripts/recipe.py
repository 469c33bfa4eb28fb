"""What the training recipes share: parse arguments (YAML + command line), build data and model, train with
`OscillationTrainer` (plus QAT / FP baselines), evaluate cross-bit on the test split, export every bit-width,
write the model cards and push.

Output folder:
```
OUTPUT_DIR/
  training/<method>/   the Trainer's folder per run: checkpoints, TensorBoard logs, oscillation figures
  export/              export_quantized: fp/, w2/ ... w8/, oscq_export.json, model cards
  cross_bit.json       {"runs": {run: cross-bit test table}, "provenance": {run: what it was measured on}};
                       cross_bit.md the same as Markdown tables, each with its provenance as caption
  run_info.json        dataset, model, world size, where things went
```
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import EarlyStoppingCallback, HfArgumentParser

from ..errors import OscqValueError, configure_logging, exit_code
from ..export.compressed_tensors import check_export_fits
from ..export.folder import TRAINING_INFO_NAME, auto_class_for
from ..export.formats import EXPORT_FORMATS, OSCQ_FORMAT, check_export_format
from ..export.writer import export_quantized
from ..hub.model_card import write_model_cards
from ..paths import check_output_path
from ..provenance import trainer_provenance
from ..quantization.spec import DEFAULT_EVAL_BITS
from ..training.config import OscillationConfig
from ..training.methods import method_names
from ..training.metrics import compute_accuracy, cross_bit_table
from ..training.run_record import run_record
from ..training.tracking import OscillationTracker, add_oscillation_tracker
from ..training.trainer import OscillationTrainer
from .data import DATASETS, ImageDataset, load_image_dataset, split_name
from .launch import check_run_settings, resume_point, run_and_end_processes
from .models import MODEL_NAMES, build_image_processor, build_model
from .runs import check_baselines, run_arguments, run_tag
from .tables import comparable_runs, cross_bit_markdown

logger = logging.getLogger(__name__)


@dataclass
class RecipeArguments:
    """Settings of a recipe that are not Trainer arguments."""

    dataset: str = field(default="digits", metadata={"help": f"One of {sorted(DATASETS)}."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Local copy of the dataset (IDX files, save_to_disk folder or parquet)."}
    )
    model: str = field(default="vit", metadata={"help": f"One of {MODEL_NAMES} (set by the recipe script)."})
    vit_size: str = field(default="tiny", metadata={"help": "Tiny ViT size: 'tiny' or 'micro' (see models.py)."})
    patch_size: int | None = field(default=None, metadata={"help": "ViT patch size (must divide the image side)."})
    cifar_stem: bool = field(default=True, metadata={"help": "ResNet-18: 3x3 stride-1 stem, no max-pool."})
    pretrained: bool = field(
        default=False,
        metadata={"help": "Start from ImageNet weights (Hub): timm's ResNet-18, or ViT-Ti/16 for the tiny ViT."},
    )
    baselines: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"Also train these osc_methods with the same settings for comparison: {', '.join(method_names())}."
        },
    )
    export_bits: list[int] = field(
        default_factory=lambda: list(DEFAULT_EVAL_BITS), metadata={"help": "Bit-widths to export."}
    )
    export: bool = field(default=True, metadata={"help": "Export every bit-width and write model cards."})
    export_format: str = field(
        default=OSCQ_FORMAT,
        metadata={"help": f"Format of the w{{b}} folders: one of {EXPORT_FORMATS} (see hf-oscq export --help)."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement of the best metric."}
    )
    validation_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the training split for model selection (0: the test split)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many test images."})
    track_oscillations: bool = field(default=True, metadata={"help": "Count oscillations (PAPER.md section 7)."})
    track_every_n_steps: int = field(default=1, metadata={"help": "Record the integer codes every N steps."})
    expected_world_size: int | None = field(
        default=None, metadata={"help": "Number of processes the run must have (default: what the launcher says)."}
    )

    def __post_init__(self):
        check_export_format(self.export_format)
        if self.dataset not in DATASETS:
            raise OscqValueError(f"--dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}.")
        if self.model not in MODEL_NAMES:
            raise OscqValueError(f"--model must be one of {MODEL_NAMES}, got {self.model!r}.")
        check_baselines(self.baselines)
        if not 0 <= self.validation_fraction < 1:
            raise OscqValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}.")


def parse_arguments(
    argv: list[str] | None = None, model: str | None = None
) -> tuple[RecipeArguments, OscillationConfig]:
    """Parses `--config file.yaml` (defaults) then the command line (overrides) into the two dataclasses."""
    parser = HfArgumentParser((RecipeArguments, OscillationConfig))
    parser.add_argument("--config", default=None, help="YAML file of arguments; the command line overrides it.")
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    defaults = {"model": model} if model else {}
    if known.config:
        loaded = yaml.safe_load(Path(known.config).read_text()) or {}
        destinations = {action.dest for action in parser._actions}
        unknown = sorted(set(loaded) - destinations)
        if unknown:
            raise OscqValueError(f"{known.config}: unknown keys {unknown}; keys are the --flags of this recipe.")
        defaults.update(loaded)
    parser.set_defaults(**defaults)
    recipe, training, _ = parser.parse_args_into_dataclasses(argv, return_remaining_strings=False)
    if model and recipe.model != model:
        raise OscqValueError(f"This recipe trains --model {model}; use the other recipe script for {recipe.model}.")
    return recipe, training


def train_one(method: str, recipe: RecipeArguments, training: OscillationConfig, data, output_dir: Path):
    """Trains one run and returns `(trainer, cross-bit test table, what it was measured on)`."""
    args = run_arguments(training, output_dir, method)
    torch.manual_seed(args.seed)
    model = build_model(
        recipe.model,
        data.info,
        data.label_names,
        vit_size=recipe.vit_size,
        patch_size=recipe.patch_size,
        cifar_stem=recipe.cifar_stem,
        pretrained=recipe.pretrained,
    )
    if recipe.export:  # a model the export format cannot hold is refused now, not after training
        check_export_fits(model, args.quant_spec, recipe.export_format)
    callbacks = []
    if recipe.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping_patience))
    trainer = OscillationTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation if data.validation is not None else data.eval,
        compute_metrics=compute_accuracy,
        callbacks=callbacks,
        processing_class=build_image_processor(data.info),
    )
    if recipe.track_oscillations:
        add_oscillation_tracker(
            trainer, OscillationTracker(every_n_steps=recipe.track_every_n_steps, spec=args.quant_spec)
        )
    trainer.train(resume_from_checkpoint=resume_point(args.resume_from_checkpoint, args.output_dir))
    trainer.save_model()  # the final (or, with load_best_model_at_end, the best) weights, in the run's folder
    trainer.save_state()
    if trainer.is_world_process_zero():
        # the local copy of the data too (never in the export, which may be published)
        record = _training_record(args, recipe, data) | {"data_dir": recipe.data_dir}
        (Path(args.output_dir) / TRAINING_INFO_NAME).write_text(json.dumps(record, indent=2) + "\n")
    trainer.args.osc_eval_bits = sorted(set(args.osc_eval_bits) | set(recipe.export_bits))
    metrics = trainer.evaluate(data.eval, metric_key_prefix="test")
    measured_on = trainer_provenance(
        trainer, metrics, "test", dataset=data.info.hub_id or data.info.name, split=split_name(data.info, args.seed)
    )
    return trainer, cross_bit_table(metrics), measured_on


def _training_record(args: OscillationConfig, recipe: RecipeArguments, data: ImageDataset) -> dict:
    """How a run was trained and on how many images its cross-bit table was measured: next to its weights
    (`TRAINING_INFO_NAME`, read by `hf-oscq export`) and in the export's manifest (the cards say both counts)."""
    return {
        **run_record(args),  # method and quantization spec, as the Trainer records them: `hf-oscq export` uses them
        "dataset": recipe.dataset,
        "dataset_id": DATASETS[recipe.dataset].hub_id,  # the Hub id of the dataset, None for scikit-learn's digits
        "model": _describe_model(recipe),
        "train_samples": len(data.train),
        "eval_samples": len(data.eval),
        # the training split as load_image_dataset made it, which `hf-oscq export` rebuilds to re-estimate BatchNorm
        "max_train_samples": recipe.max_train_samples,
        "validation_fraction": recipe.validation_fraction,
        "hyperparameters": {
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "train_batch_size": args.per_device_train_batch_size * args.world_size,
            "optimizer": getattr(args.optim, "value", args.optim),
            "weight_decay": args.weight_decay,
            "seed": args.seed,
            "eval_batch_size": args.per_device_eval_batch_size,  # also the BatchNorm re-estimation's batch size
            "pretrained": recipe.pretrained,
        },
    }


def _describe_model(recipe: RecipeArguments) -> str:
    if recipe.model == "vit":
        if recipe.pretrained:
            return "tiny ViT (timm ViT-Ti/16, ImageNet-pretrained, patch embedding resampled)"
        return f"tiny ViT ({recipe.vit_size!r} size of hf_oscq.scripts.models)"
    details = ["timm", "CIFAR stem" if recipe.cifar_stem else "ImageNet stem"]
    return f"ResNet-18 ({', '.join(details + (['ImageNet-pretrained'] if recipe.pretrained else []))})"


def _export(trainer, recipe: RecipeArguments, data, tables: dict, provenances: dict, output_dir: Path):
    export_dir = output_dir / "export"
    args = trainer.args
    comparisons = comparable_runs(tables, provenances, args.osc_method) or None
    model = trainer.model
    if trainer.is_fsdp_enabled:  # FSDP2 shards the weights: export the whole model that save_model gathered
        model = auto_class_for(args.output_dir).from_pretrained(args.output_dir).to(args.device)
    export_quantized(
        model,
        export_dir,
        bits=tuple(recipe.export_bits),
        spec=args.quant_spec,
        image_processor=build_image_processor(data.info),
        metrics=tables[args.osc_method],
        # the same BatchNorm re-estimation as the cross-bit evaluation whose numbers the cards carry
        calibration_batches=trainer.calibration_batches,
        plain_rounding=args.osc_bn_recalibration_samples == 0,
        calibration_source={
            "dataset": recipe.dataset,
            "seed": args.seed,
            "batch_size": args.per_device_eval_batch_size,
        },
        training=_training_record(args, recipe, data),
        comparisons=comparisons,
        format=recipe.export_format,
        provenance=provenances[args.osc_method],
    )
    write_model_cards(export_dir, repo_id=args.hub_model_id)
    return export_dir


def run_recipe(recipe: RecipeArguments, training: OscillationConfig) -> dict:
    """Runs a recipe end to end (see the module docstring for what lands where) and returns its summary."""
    training = check_run_settings(training, recipe.expected_world_size)
    check_output_path(training.output_dir, "--output_dir", "folder")  # before any data or model loads
    output_dir = Path(training.output_dir)
    data = load_image_dataset(
        recipe.dataset,
        recipe.data_dir,
        seed=training.seed,
        max_train_samples=recipe.max_train_samples,
        max_eval_samples=recipe.max_eval_samples,
        validation_fraction=recipe.validation_fraction,
    )
    tables, provenances, tags, trainer = {}, {}, {}, None
    for method in [training.osc_method, *[m for m in recipe.baselines if m != training.osc_method]]:
        run_trainer, tables[method], provenances[method] = train_one(method, recipe, training, data, output_dir)
        tags[method] = run_tag(run_trainer.args)
        trainer = trainer or run_trainer
        logger.info("%s: %s", method, tables[method])
    summary = {
        "dataset": recipe.dataset,
        "model": recipe.model,
        "world_size": trainer.args.world_size,
        "tables": tables,
        "provenance": {method: provenance.to_dict() for method, provenance in provenances.items()},
        "table": cross_bit_markdown(tables, provenances, training, tags),
        "export_dir": None,
    }
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        record = {"runs": tables, "provenance": summary["provenance"]}
        (output_dir / "cross_bit.json").write_text(json.dumps(record, indent=2))
        (output_dir / "cross_bit.md").write_text(summary["table"] + "\n")
        if recipe.export:
            summary["export_dir"] = str(_export(trainer, recipe, data, tables, provenances, output_dir))
            if training.push_to_hub:
                from ..hub.push import push_to_hub

                push_to_hub(
                    summary["export_dir"],
                    training.hub_model_id,
                    private=bool(training.hub_private_repo),
                    token=training.hub_token,
                )
        info = {key: value for key, value in summary.items() if key not in ("tables", "table", "provenance")}
        (output_dir / "run_info.json").write_text(json.dumps(info))
    trainer.accelerator.wait_for_everyone()
    return summary


def main(model: str, argv: list[str] | None = None) -> int:
    """Entry point of `recipes/train_<model>.py`: returns the exit code; an `OscqError` (bad arguments or data) is
    printed as one line on stderr, `train_<model>.py: error: <message>`, with exit code 1, as `hf-oscq` does."""
    configure_logging()

    def run() -> None:
        summary = run_recipe(*parse_arguments(argv, model))
        if summary["export_dir"] is not None:
            sys.stdout.write(f"{summary['table']}\n\nExported to {summary['export_dir']}\n")

    return exit_code(f"train_{model}.py", run_and_end_processes(run))
