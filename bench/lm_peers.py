"""The methods side by side on the language-model recipe, at a scale where rounding matters: the recipe's own
setting (`recipes/configs/lm_kjv_scratch.yaml`: the micro Llama-style decoder, 600 steps of 32 x 128 bytes of the
King James Version, group-wise scales of 32 input features), where plain rounding at 3 bits costs 12.8 % perplexity
(bench/lm_scale.py, `bench/results/lm_scale.json`). FP + PTQ, QAT @4, the regularizer @4 at each lambda of
`--lambdas`, KURE at each of `--kure_lambdas`, for each seed; perplexity per byte at full precision and rounded at
every bit-width 2..8, token-level (the sum of the token losses over the number of predicted tokens, as
`hf-oscq eval` computes it) on the recipe's held-out chapters.

    python bench/lm_peers.py                                  # every cell; finished cells are skipped
    python bench/lm_peers.py --seeds 0 --lambdas 10 --methods oscillation

Each cell's record goes to bench/results/lm_peers/<cell>.json as soon as it finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import time
from importlib.metadata import version
from pathlib import Path

import torch

from hf_oscq import quantize_model
from hf_oscq.errors import configure_logging
from hf_oscq.paths import check_output_path
from hf_oscq.quantization.spec import DEFAULT_EVAL_BITS
from hf_oscq.scripts import lm_recipe
from hf_oscq.scripts.text import EVAL_EVERY_CHAPTERS, TokenBlocks
from hf_oscq.training.metrics import evaluate_perplexity
from hf_oscq.training.trainer import OscillationTrainer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "lm_peers"
CONFIG = ROOT / "recipes" / "configs" / "lm_kjv_scratch.yaml"
LAMBDA_METHODS = ("oscillation", "kure")


def cell_name(method: str, bits: int, osc_lambda: float | None, seed: int) -> str:
    if method == "none":
        return f"fp_s{seed}"
    if method == "kure":
        return f"kure_lam{osc_lambda:g}_s{seed}"
    tag = {"oscillation": "osc", "qat": "qat", "dampening": "damp", "multibit_qat": "mbqat"}[method]
    return f"{tag}{bits}" + (f"_lam{osc_lambda:g}" if osc_lambda is not None else "") + f"_s{seed}"


def run_cell(
    method: str, osc_lambda: float | None, seed: int, bits: int, workdir: Path, overrides: list[str] = ()
) -> dict:
    recipe, training = lm_recipe.parse_arguments(["--config", str(CONFIG), *overrides])
    changes = {
        "output_dir": str(workdir / cell_name(method, bits, osc_lambda, seed)),
        "osc_method": method,
        "osc_bits": bits,
        "osc_lambda": osc_lambda,
        "seed": seed,
        "report_to": [],
        "disable_tqdm": True,
        "osc_eval_bits": [],  # evaluated below, token-level, on the whole held-out text of the recipe
    }
    training = dataclasses.replace(training, **changes)
    tokenizer = lm_recipe.load_tokenizer(recipe)
    corpus = lm_recipe.load_corpus(recipe)
    train = TokenBlocks(corpus.train, tokenizer, recipe.block_size, recipe.max_train_blocks)
    evaluation = TokenBlocks(corpus.eval, tokenizer, recipe.block_size, recipe.max_eval_blocks)
    torch.manual_seed(seed)
    model = lm_recipe.build_lm(recipe, tokenizer)
    trainer = OscillationTrainer(model=model, args=training, train_dataset=train)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    model.eval()
    spec = training.quant_spec
    table = {"fp": evaluate_perplexity(model, evaluation, training.per_device_eval_batch_size)}
    for rounded_bits in DEFAULT_EVAL_BITS:
        rounded = quantize_model(model, spec=spec.with_bits(rounded_bits))
        table[f"w{rounded_bits}"] = evaluate_perplexity(rounded, evaluation, training.per_device_eval_batch_size)
    return {
        "cell": {"method": method, "bits": bits, "osc_lambda": osc_lambda, "seed": seed},
        "method_settings": training.method_settings(),
        "spec": spec.to_dict(),
        "table": table,
        "evaluated_on": {
            "dataset": "local: King James Version (Debian bible-kjv-text)",
            "split": f"held out: every {EVAL_EVERY_CHAPTERS}th chapter",
            "examples": len(evaluation),
            "tokens": len(evaluation) * (recipe.block_size - 1),
            "metric": "perplexity per byte, token-level",
        },
        "recipe": {
            "config": str(CONFIG.relative_to(ROOT)),
            "lm_size": recipe.lm_size,
            "block_size": recipe.block_size,
        },
        "hyperparameters": {
            "max_steps": training.max_steps,
            "train_batch_size": training.per_device_train_batch_size,
            "learning_rate": training.learning_rate,
        },
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "versions": {name: version(name) for name in ("hf_oscq", "torch", "transformers", "accelerate")},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["none", "qat", "oscillation", "kure"])
    parser.add_argument("--bits", type=int, default=4, help="target bit-width of QAT and the regularizer")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 10.0, 100.0], help="the regularizer's")
    parser.add_argument("--kure_lambdas", type=float, nargs="+", default=[1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/hf_oscq_lm_peers")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--recipe_args", default="", help="recipe flags over the config, one string (smoke runs: '--max_steps 3')"
    )
    args = parser.parse_args()
    check_output_path(args.results, "--results", "folder")  # before the first cell trains
    check_output_path(args.workdir, "--workdir", "folder")
    configure_logging(logging.WARNING)
    torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    sweeps = {"oscillation": args.lambdas, "kure": args.kure_lambdas}
    for seed in args.seeds:
        for method in args.methods:
            for osc_lambda in sweeps.get(method, [None]):
                name = cell_name(method, args.bits, osc_lambda, seed)
                path = args.results / f"{name}.json"
                if path.exists():
                    continue
                record = run_cell(
                    method, osc_lambda, seed, args.bits, Path(args.workdir), shlex.split(args.recipe_args)
                )
                path.write_text(json.dumps(record, indent=2) + "\n")
                table = record["table"]
                print(f"{name}: " + ", ".join(f"{k} {v['perplexity']:.2f}" for k, v in table.items()), flush=True)
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("lm_peers.py", main))
