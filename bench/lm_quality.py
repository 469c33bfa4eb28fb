"""Quality of the tiny language model at every bit-width: FP + PTQ, QAT and the oscillation regularizer, side by side.

A Llama-style decoder (`--lm_size`, from scratch, byte-level tokenizer) trained on the King James Version (Debian's
bible-kjv-text, public domain), group-wise scales (`--group_size` input features a scale), target `--bits`. Each
run is evaluated on held-out chapters in full precision and rounded at 2..8 bits; the table is perplexity (lower is
better). Ratios printed and stored: regularizer / QAT at the target bit-width, regularizer / FP + PTQ and
regularizer / QAT at 2 and 3 bits (below 1: the regularizer is better).

    python bench/lm_quality.py                      # CPU: micro model, 2 seeds, a few hundred steps
    bench/gpu.sh --lm                               # GPU: tiny model, longer run (bench/gpu.sh)

Writes bench/results/lm_quality.json (override with --output).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from hf_oscq import OscillationConfig, OscillationTrainer
from hf_oscq.errors import configure_logging
from hf_oscq.quantization.spec import DEFAULT_EVAL_BITS
from hf_oscq.scripts.lm_recipe import LMRecipeArguments, build_lm
from hf_oscq.scripts.text import TokenBlocks, byte_tokenizer, load_kjv
from hf_oscq.training.metrics import cross_bit_table

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("none", "qat", "oscillation")


def train_and_evaluate(method: str, seed: int, args, tokenizer, train, evaluation, workdir: Path) -> dict:
    recipe = LMRecipeArguments(lm_size=args.lm_size, block_size=args.block_size)
    torch.manual_seed(seed)
    model = build_lm(recipe, tokenizer)
    config = OscillationConfig(
        output_dir=str(workdir / f"{method}-{seed}"),
        osc_method=method,
        osc_bits=args.bits,
        osc_group_size=args.group_size,
        osc_lambda=args.osc_lambda if method == "oscillation" else 1.0,
        osc_eval_bits=list(DEFAULT_EVAL_BITS),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.max_steps // 20,
        weight_decay=0.0,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        save_strategy="no",
        logging_steps=max(1, args.max_steps // 10),
        report_to=[],
        use_cpu=args.device == "cpu",
        seed=seed,
        disable_tqdm=True,
    )
    trainer = OscillationTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    table = cross_bit_table(trainer.evaluate(evaluation, metric_key_prefix="test"))
    return {"table": table, "train_seconds": seconds}


def mean_perplexity(runs: list[dict], variant: str) -> float:
    return statistics.mean(run["table"][variant]["perplexity"] for run in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm_size", default="micro")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group_size", type=int, default=32)
    parser.add_argument("--osc_lambda", type=float, default=10.0)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max_eval_blocks", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/hf_oscq_lm_quality")
    parser.add_argument("--corpus_file", default=None, help="saved `bible -f Gen1:1-Rev22:21` output (no Debian)")
    parser.add_argument("--output", default=str(RESULTS / "lm_quality.json"))
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    torch.set_num_threads(args.threads)
    tokenizer = byte_tokenizer()
    corpus = load_kjv(args.corpus_file)
    train = TokenBlocks(corpus.train, tokenizer, args.block_size)
    evaluation = TokenBlocks(corpus.eval, tokenizer, args.block_size, args.max_eval_blocks)
    runs = {method: [] for method in METHODS}
    setup = {
        **{k: v for k, v in vars(args).items() if k not in ("workdir", "output")},
        "corpus": corpus.license,
        "train_blocks": len(train),
        "eval_blocks": len(evaluation),
        "torch": torch.__version__,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in METHODS:
            result = train_and_evaluate(method, seed, args, tokenizer, train, evaluation, Path(args.workdir))
            runs[method].append(result)
            print(f"seed {seed} {method}: {json.dumps(result)}", flush=True)
            # every finished run is kept, whatever stops the bench later
            output.write_text(json.dumps({"setup": setup, "complete": False, "runs": runs}, indent=2) + "\n")
    variants = ["fp"] + [f"w{b}" for b in DEFAULT_EVAL_BITS]
    means = {method: {v: mean_perplexity(runs[method], v) for v in variants} for method in METHODS}
    target = f"w{args.bits}"
    ratios = {
        f"oscillation_over_qat_{target}": means["oscillation"][target] / means["qat"][target],
        **{f"oscillation_over_qat_w{b}": means["oscillation"][f"w{b}"] / means["qat"][f"w{b}"] for b in (2, 3)},
        **{f"oscillation_over_fp_ptq_w{b}": means["oscillation"][f"w{b}"] / means["none"][f"w{b}"] for b in (2, 3)},
    }
    header = "| run | " + " | ".join(variants) + " |"
    lines = [header, "|" + "---|" * (len(variants) + 1)]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(f"{means[method][v]:.2f}" for v in variants) + " |")
    print("\n".join(lines))
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    record = {"setup": setup, "complete": True, "mean_perplexity": means, "ratios": ratios, "runs": runs}
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("lm_quality.py", main))
