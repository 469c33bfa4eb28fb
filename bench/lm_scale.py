"""Where rounding starts to matter for the language-model recipe: perplexity of plainly trained (FP) models of the
LM recipe, at a few sizes and step counts, in full precision and rounded after training at 2..4 bits with every
scale granularity (per tensor, per channel, group-wise 32 / 64 / 128). One FP training per (size, steps); the
rounding is what `quantize_model` does, so each granularity is the same weights rounded another way.

The comparison of the methods on a language model (bench/lm_quality.py) needs a setting where FP + PTQ at 3 bits
costs at least 5 % perplexity; this bench finds the cheapest such setting and records the cost of each (seconds per
training step, 1 thread).

    python bench/lm_scale.py                                     # micro and tiny, 600 steps
    python bench/lm_scale.py --sizes tiny --steps 600 1200

Writes bench/results/lm_scale.json (override with --output); rows are kept as they finish.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from hf_oscq import OscillationConfig, OscillationTrainer, QuantSpec, quantize_model
from hf_oscq.errors import configure_logging
from hf_oscq.paths import check_output_path
from hf_oscq.scripts.lm_recipe import LM_SIZES, LMRecipeArguments, build_lm
from hf_oscq.scripts.text import TokenBlocks, byte_tokenizer, load_kjv
from hf_oscq.training.metrics import evaluate_perplexity

RESULTS = Path(__file__).resolve().parent / "results"


def specs(bits: int, hidden: int) -> dict[str, QuantSpec]:
    """Every granularity the recipe can use at `bits`, group sizes that divide the model's widths."""
    found = {"per_tensor": QuantSpec(bits), "per_channel": QuantSpec(bits, "per_channel")}
    for group in (32, 64, 128):
        if hidden % group == 0:
            found[f"group{group}"] = QuantSpec(bits, "group", group_size=group)
    return found


def probe(size: str, steps: int, args, tokenizer, train, evaluation, workdir: Path) -> dict:
    recipe = LMRecipeArguments(lm_size=size, block_size=args.block_size)
    torch.manual_seed(args.seed)
    model = build_lm(recipe, tokenizer)
    config = OscillationConfig(
        output_dir=str(workdir / f"{size}-{steps}"),
        osc_method="none",
        max_steps=steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 20,
        weight_decay=0.0,
        per_device_train_batch_size=args.batch_size,
        save_strategy="no",
        logging_steps=max(1, steps // 10),
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        osc_eval_bits=[],
    )
    trainer = OscillationTrainer(model=model, args=config, train_dataset=train)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    table = {"fp": evaluate_perplexity(model, evaluation, 64)["perplexity"]}
    for bits in args.bits:
        for name, spec in specs(bits, LM_SIZES[size]["hidden_size"]).items():
            rounded = quantize_model(model, spec=spec)
            table[f"w{bits}_{name}"] = evaluate_perplexity(rounded, evaluation, 64)["perplexity"]
    return {
        "size": size,
        "model": LM_SIZES[size],
        "steps": steps,
        "train_seconds": seconds,
        "seconds_per_step": seconds / steps,
        "perplexity": table,
        "cost_vs_fp": {key: value / table["fp"] - 1 for key, value in table.items() if key != "fp"},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["micro", "tiny"], choices=sorted(LM_SIZES))
    parser.add_argument("--steps", type=int, nargs="+", default=[600])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_eval_blocks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/hf_oscq_lm_scale")
    parser.add_argument("--output", default=str(RESULTS / "lm_scale.json"))
    args = parser.parse_args()
    check_output_path(args.output, "--output", "file")  # before the first step of training
    check_output_path(args.workdir, "--workdir", "folder")
    configure_logging(logging.WARNING)
    torch.set_num_threads(args.threads)
    tokenizer = byte_tokenizer()
    corpus = load_kjv()
    train = TokenBlocks(corpus.train, tokenizer, args.block_size)
    evaluation = TokenBlocks(corpus.eval, tokenizer, args.block_size, args.max_eval_blocks)
    setup = {k: v for k, v in vars(args).items() if k not in ("workdir", "output")}
    setup |= {"corpus": corpus.license, "eval_tokens": len(evaluation) * args.block_size, "torch": torch.__version__}
    output = Path(args.output)
    rows = []
    for size in args.sizes:
        for steps in args.steps:
            rows.append(probe(size, steps, args, tokenizer, train, evaluation, Path(args.workdir)))
            row = rows[-1]
            print(
                f"{size} {steps} steps ({row['seconds_per_step']:.2f} s/step): "
                + ", ".join(f"{k} {100 * v:+.1f} %" for k, v in row["cost_vs_fp"].items()),
                flush=True,
            )
            record = {"setup": setup, "rows": rows, "load_average": list(os.getloadavg())}
            output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("lm_scale.py", main))
