"""The language-model recipe (`recipes/train_lm.py`): a causal LM trained with `OscillationTrainer` (plus QAT / FP
baselines), its perplexity at every bit-width on held-out text, every bit-width exported with the tokenizer, model
cards, a generated sample per bit-width, and an optional push.

Two starts: a tiny Llama-style model from scratch (`--lm_size`, byte-level tokenizer built here) on the offline
King James Version (`--dataset kjv`), or a Hub model (`--model_name_or_path`, its own tokenizer) on a Hub text
dataset (`--dataset_name`); the Hub ones fail offline with `HubUnreachableError`.

Output folder:
```
OUTPUT_DIR/
  training/<method>/   the Trainer's folder per run (model and tokenizer)
  export/              fp/, w2/ ... w8/ (each with the tokenizer), oscq_export.json, model cards
  cross_bit.json       {"runs": {run: {variant: {"loss": ..., "perplexity": ...}}}, "provenance": {run: ...}};
                       cross_bit.md the perplexity tables, each with what it was measured on as caption
  samples.json         {variant: greedy continuation of --prompt}
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
from transformers import HfArgumentParser

from ..errors import OscqValueError, configure_logging, exit_code
from ..export.compressed_tensors import check_export_fits
from ..export.folder import TRAINING_INFO_NAME
from ..export.formats import EXPORT_FORMATS, OSCQ_FORMAT, check_export_format
from ..export.writer import export_quantized
from ..hub.model_card import write_model_cards
from ..paths import check_output_path
from ..provenance import trainer_provenance
from ..quantization.spec import DEFAULT_EVAL_BITS
from ..training.config import OscillationConfig
from ..training.methods import method_names
from ..training.metrics import cross_bit_table
from ..training.run_record import run_record
from ..training.trainer import OscillationTrainer
from .data import HubUnreachableError
from .launch import check_run_settings, resume_point, run_and_end_processes
from .runs import check_baselines, run_arguments
from .tables import comparable_runs, cross_bit_markdown
from .text import KJV, TextCorpus, TokenBlocks, byte_tokenizer, load_hub_text, load_kjv

logger = logging.getLogger(__name__)

# Llama-style decoder sizes for training from scratch (widths divisible by group sizes 32 and 64).
LM_SIZES = {
    "micro": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4},
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4},
}


@dataclass
class LMRecipeArguments:
    """Settings of the language-model recipe that are not Trainer arguments."""

    dataset: str = field(default=KJV, metadata={"help": "'kjv' (offline, Debian's bible-kjv-text) or 'hub'."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub text dataset (implies --dataset hub)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration, e.g. wikitext-2-raw-v1."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    corpus_file: str | None = field(
        default=None,
        metadata={"help": "kjv without Debian's bible-kjv: a file holding `bible -f Gen1:1-Rev22:21`'s output."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub model (or local folder) to fine-tune; default: a tiny model from scratch."},
    )
    lm_size: str = field(default="micro", metadata={"help": f"From-scratch model size: one of {sorted(LM_SIZES)}."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training / evaluation sequence."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Use only this many training blocks."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Use only this many evaluation blocks."})
    baselines: list[str] = field(
        default_factory=list,
        metadata={"help": f"Also train these osc_methods for comparison: {', '.join(method_names())}."},
    )
    export_bits: list[int] = field(default_factory=lambda: list(DEFAULT_EVAL_BITS), metadata={"help": "Bit-widths."})
    export: bool = field(default=True, metadata={"help": "Export every bit-width and write model cards."})
    export_format: str = field(
        default=OSCQ_FORMAT,
        metadata={"help": f"Format of the w{{b}} folders: one of {EXPORT_FORMATS} (see hf-oscq export --help)."},
    )
    prompt: str = field(default="And God said", metadata={"help": "Prompt of the generated samples."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per sample."})
    expected_world_size: int | None = field(
        default=None, metadata={"help": "Number of processes the run must have (default: what the launcher says)."}
    )

    def __post_init__(self):
        check_export_format(self.export_format)
        if self.dataset_name:
            self.dataset = "hub"
        if self.dataset not in (KJV, "hub") or (self.dataset == "hub" and not self.dataset_name):
            raise OscqValueError(f"--dataset is 'kjv', or 'hub' with --dataset_name NAME; got {self.dataset!r}.")
        if self.lm_size not in LM_SIZES:
            raise OscqValueError(f"--lm_size must be one of {sorted(LM_SIZES)}, got {self.lm_size!r}.")
        check_baselines(self.baselines)


def parse_arguments(argv: list[str] | None = None) -> tuple[LMRecipeArguments, OscillationConfig]:
    """Parses `--config file.yaml` (defaults) then the command line (overrides) into the two dataclasses."""
    parser = HfArgumentParser((LMRecipeArguments, OscillationConfig))
    parser.add_argument("--config", default=None, help="YAML file of arguments; the command line overrides it.")
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        loaded = yaml.safe_load(Path(known.config).read_text()) or {}
        unknown = sorted(set(loaded) - {action.dest for action in parser._actions})
        if unknown:
            raise OscqValueError(f"{known.config}: unknown keys {unknown}; keys are the --flags of this recipe.")
        parser.set_defaults(**loaded)
    recipe, training, _ = parser.parse_args_into_dataclasses(argv, return_remaining_strings=False)
    return recipe, training


def load_tokenizer(recipe: LMRecipeArguments):
    """The Hub model's tokenizer, or the byte-level one for a model trained from scratch."""
    if recipe.model_name_or_path is None:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(recipe.model_name_or_path)
    except OSError as error:
        raise _unreachable(recipe.model_name_or_path, error) from None


def _unreachable(name: str, error: OSError) -> HubUnreachableError:
    return HubUnreachableError(
        f"--model_name_or_path {name!r} is not a local folder and the Hugging Face Hub could not be reached "
        f"({str(error).splitlines()[0]}). Train the tiny model from scratch (drop --model_name_or_path) on "
        "--dataset kjv, or run where the Hub is reachable (a cached download also works offline)."
    )


def build_lm(recipe: LMRecipeArguments, tokenizer) -> torch.nn.Module:
    """The Hub model, or a Llama-style decoder of `--lm_size` sized for the tokenizer, from scratch."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if recipe.model_name_or_path is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(recipe.model_name_or_path)
        except OSError as error:
            raise _unreachable(recipe.model_name_or_path, error) from None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=recipe.block_size,
        num_key_value_heads=LM_SIZES[recipe.lm_size]["num_attention_heads"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **LM_SIZES[recipe.lm_size],
    )
    return AutoModelForCausalLM.from_config(config)


def load_corpus(recipe: LMRecipeArguments) -> TextCorpus:
    if recipe.dataset == KJV:
        return load_kjv(recipe.corpus_file)
    return load_hub_text(recipe.dataset_name, recipe.dataset_config, recipe.text_column)


def train_one(method: str, recipe, training, tokenizer, train, evaluation, output_dir: Path, corpus: TextCorpus):
    """Trains one run and returns `(trainer, cross-bit table of loss and perplexity on the evaluation text, what it
    was measured on)`."""
    args = run_arguments(training, output_dir, method)
    torch.manual_seed(args.seed)
    model = build_lm(recipe, tokenizer)
    if recipe.export:  # a model the export format cannot hold is refused now, not after training
        check_export_fits(model, args.quant_spec, recipe.export_format)
    trainer = OscillationTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=resume_point(args.resume_from_checkpoint, args.output_dir))
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():  # how it was trained, next to the weights (read by `hf-oscq export`)
        record = json.dumps(training_record(args, recipe, corpus), indent=2)
        (Path(args.output_dir) / TRAINING_INFO_NAME).write_text(record + "\n")
    trainer.args.osc_eval_bits = sorted(set(args.osc_eval_bits) | set(recipe.export_bits))
    metrics = trainer.evaluate(evaluation, metric_key_prefix="test")
    measured_on = trainer_provenance(trainer, metrics, "test", dataset=corpus.name, split=corpus.eval_split)
    return trainer, cross_bit_table(metrics), measured_on


def generate_samples(export_dir: Path, prompt: str, max_new_tokens: int) -> dict[str, str]:
    """Greedy continuation of `prompt` by every exported variant, loaded from its folder (packed weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..export.folder import variant_folders

    samples = {}
    for name, folder in variant_folders(export_dir).items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        samples[name] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return samples


def _export(
    trainer,
    recipe: LMRecipeArguments,
    corpus: TextCorpus,
    tokenizer,
    tables: dict,
    provenances: dict,
    output_dir: Path,
) -> Path:
    args = trainer.args
    comparisons = comparable_runs(tables, provenances, args.osc_method) or None
    model = trainer.model
    if trainer.is_fsdp_enabled:  # sharded weights: export the whole model that save_model gathered
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.output_dir)
    export_dir = export_quantized(
        model,
        output_dir / "export",
        bits=tuple(recipe.export_bits),
        spec=args.quant_spec,
        tokenizer=tokenizer,
        metrics=tables[args.osc_method],
        training=training_record(args, recipe, corpus),
        comparisons=comparisons,
        format=recipe.export_format,
        provenance=provenances[args.osc_method],
    )
    write_model_cards(export_dir, repo_id=args.hub_model_id)
    return export_dir


def training_record(args: OscillationConfig, recipe: LMRecipeArguments, corpus: TextCorpus) -> dict:
    """How a run was trained: next to its weights (`oscq_training.json`, read by `hf-oscq export`) and in the export's
    manifest. The method and quantization spec (group size included) are the Trainer's record (`run_record`)."""
    trained = {key: value for key, value in run_record(args).items() if key != "osc_bn_recalibration_samples"}
    return {
        **trained,  # no BatchNorm to re-estimate in these models
        "dataset": corpus.name,
        "dataset_license": corpus.license,
        "model": recipe.model_name_or_path or f"Llama-style decoder from scratch ({recipe.lm_size!r})",
        "hyperparameters": {
            "learning_rate": args.learning_rate,
            "max_steps": args.max_steps,
            "num_train_epochs": args.num_train_epochs,
            "train_batch_size": args.per_device_train_batch_size * args.world_size,
            "block_size": recipe.block_size,
            "optimizer": str(args.optim),
            "weight_decay": args.weight_decay,
            "seed": args.seed,
        },
    }


def run_recipe(recipe: LMRecipeArguments, training: OscillationConfig) -> dict:
    """Runs the recipe end to end (see the module docstring for what lands where) and returns its summary."""
    training = check_run_settings(training, recipe.expected_world_size)
    check_output_path(training.output_dir, "--output_dir", "folder")  # before any data or model loads
    output_dir = Path(training.output_dir)
    tokenizer = load_tokenizer(recipe)
    corpus = load_corpus(recipe)
    train = TokenBlocks(corpus.train, tokenizer, recipe.block_size, recipe.max_train_blocks)
    evaluation = TokenBlocks(corpus.eval, tokenizer, recipe.block_size, recipe.max_eval_blocks)
    tables, provenances, trainer = {}, {}, None
    for method in [training.osc_method, *[m for m in recipe.baselines if m != training.osc_method]]:
        run_trainer, tables[method], provenances[method] = train_one(
            method, recipe, training, tokenizer, train, evaluation, output_dir, corpus
        )
        trainer = trainer or run_trainer
        logger.info("%s: %s", method, tables[method])
    summary = {
        "dataset": corpus.name,
        "model": recipe.model_name_or_path or f"scratch-{recipe.lm_size}",
        "world_size": trainer.args.world_size,
        "tables": tables,
        "provenance": {method: provenance.to_dict() for method, provenance in provenances.items()},
        "table": cross_bit_markdown(tables, provenances, training),
        "export_dir": None,
    }
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        record = {"runs": tables, "provenance": summary["provenance"]}
        (output_dir / "cross_bit.json").write_text(json.dumps(record, indent=2))
        (output_dir / "cross_bit.md").write_text(summary["table"] + "\n")
        if recipe.export:
            export_dir = _export(trainer, recipe, corpus, tokenizer, tables, provenances, output_dir)
            summary["export_dir"] = str(export_dir)
            samples = generate_samples(export_dir, recipe.prompt, recipe.max_new_tokens)
            (output_dir / "samples.json").write_text(json.dumps({"prompt": recipe.prompt, **samples}, indent=2))
            if training.push_to_hub:
                from ..hub.push import push_to_hub

                push_to_hub(export_dir, training.hub_model_id, private=bool(training.hub_private_repo))
        info = {key: value for key, value in summary.items() if key not in ("tables", "table", "provenance")}
        (output_dir / "run_info.json").write_text(json.dumps(info))
    trainer.accelerator.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of `recipes/train_lm.py`: returns the exit code; an `OscqError` (bad arguments or data) is printed
    as one line on stderr, `train_lm.py: error: <message>`, with exit code 1, as `hf-oscq` does."""
    configure_logging()

    def run() -> None:
        summary = run_recipe(*parse_arguments(argv))
        if summary["export_dir"] is not None:
            sys.stdout.write(f"{summary['table']}\n\nExported to {summary['export_dir']}\n")

    return exit_code("train_lm.py", run_and_end_processes(run))
