"""Serving the language-model recipe's compressed-tensors exports with vLLM: greedy decode tokens/s of w4 and w8
against the fp16 model, and each variant's perplexity through vLLM against hf_oscq's own.

    python bench/serve_vllm.py --export outputs/lm_vllm/export           # a GPU with vLLM (bench/gpu.sh --vllm)
    python bench/serve_vllm.py --export DIR --engine transformers --device cpu --dry-run    # CPU: the same path

`--export` is an export of `recipes/train_lm.py ... --export_format compressed-tensors` (bench/gpu.sh --vllm trains
one). For `fp`, `w4` and `w8` (those present) in turn, the engine loads the folder as it is (vLLM in float16, its
compressed-tensors weight-only kernels for w4 / w8; the transformers engine with the compressed-tensors package, in
float32), then:
* decodes `--max_new_tokens` greedy tokens after each of `--prompts` prompts (the first 32 tokens of held-out blocks),
  all at once; tokens/s = generated tokens / wall seconds, median of `--rounds` rounds; the ratio to `fp`'s is printed;
* scores `--eval_blocks` held-out `--block_size`-token blocks of the recipe's evaluation text (the recipe's own
  blocks): perplexity = exp(mean next-token negative log-likelihood), from the engine's prompt log-probabilities.
hf_oscq's perplexity of the same blocks is `quantize_model` of `fp/` with the export's spec (float32, CPU). The check:
|engine / hf_oscq - 1| <= `--tolerance` for every variant (1e-2 by default: vLLM computes in float16, hf_oscq in
float32; the fp row shows how much of the difference is float16 alone). Writes bench/results/serve_vllm.json (a dry
run: serve_vllm_dry_run.json) with the dependency versions; exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("fp", "w4", "w8")
PROMPT_TOKENS = 32


class VllmEngine:
    """vLLM's offline engine on one folder, in float16."""

    def __init__(self, folder: Path, max_model_len: int):
        from vllm import LLM

        self.llm = LLM(
            model=str(folder), dtype="float16", seed=0, max_model_len=max_model_len, gpu_memory_utilization=0.3
        )

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(output.outputs[0].token_ids) for output in outputs)

    def negative_log_likelihood(self, blocks: list[list[int]]) -> tuple[float, int]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=b) for b in blocks], params, use_tqdm=False)
        total, count = 0.0, 0
        for block, output in zip(blocks, outputs):
            for position in range(1, len(block)):  # entry 0 is None: the first token has no prediction
                total -= output.prompt_logprobs[position][block[position]].logprob
                count += 1
        return total, count

    def close(self) -> None:
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()


class TransformersEngine:
    """transformers (with the compressed-tensors package for w4 / w8) on one folder, in float32: the dry run's
    stand-in for vLLM on a CPU."""

    def __init__(self, folder: Path, device: str):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        ids = torch.tensor(prompts, device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    def negative_log_likelihood(self, blocks: list[list[int]]) -> tuple[float, int]:
        ids = torch.tensor(blocks, device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[:, :-1].float()
        total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        return float(total), ids[:, 1:].numel()

    def close(self) -> None:
        del self.model
        gc.collect()


def hf_oscq_perplexities(export: Path, manifest: dict, variants: list[str], blocks) -> dict[str, float]:
    """hf_oscq's perplexity of each variant on `blocks`: `quantize_model` of fp/ with the export's spec, float32."""
    from transformers import AutoModelForCausalLM

    import hf_oscq
    from hf_oscq.export.folder import export_spec
    from hf_oscq.quantization.variants import variant_bits
    from hf_oscq.training.metrics import evaluate_perplexity

    model = AutoModelForCausalLM.from_pretrained(export / "fp", dtype=torch.float32).eval()
    table = {}
    for variant in variants:
        bits = variant_bits(variant)
        quantized = model if bits is None else hf_oscq.quantize_model(model, spec=export_spec(manifest, bits))
        table[variant] = evaluate_perplexity(quantized, blocks, batch_size=8)["perplexity"]
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="a compressed-tensors export of the language-model recipe")
    parser.add_argument("--engine", choices=("vllm", "transformers"), default="vllm")
    parser.add_argument("--device", default="cuda", help="the transformers engine's device")
    parser.add_argument("--corpus_file", default=None, help="saved `bible -f Gen1:1-Rev22:21` output (no Debian)")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--eval_blocks", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--dry-run", action="store_true", help="seconds-sized: 2 blocks, 2 prompts, 4 tokens")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.dry_run:
        args.eval_blocks, args.prompts, args.max_new_tokens, args.rounds = 2, 2, 4, 1
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    from hf_oscq.errors import configure_logging
    from hf_oscq.export.folder import export_format, read_export_manifest
    from hf_oscq.export.formats import COMPRESSED_TENSORS_FORMAT
    from hf_oscq.scripts.text import TokenBlocks, load_kjv
    from hf_oscq.versions import library_versions

    configure_logging()
    export = Path(args.export)
    manifest = read_export_manifest(export)
    if export_format(manifest) != COMPRESSED_TENSORS_FORMAT:
        sys.stderr.write(f"serve_vllm.py: {export} is not a compressed-tensors export (--export_format).\n")
        return 2
    variants = [v for v in VARIANTS if (export / v).is_dir()]
    tokenizer = AutoTokenizer.from_pretrained(export / "fp")
    blocks = TokenBlocks(load_kjv(args.corpus_file).eval, tokenizer, args.block_size, args.eval_blocks)
    prompts = blocks.blocks[: args.prompts, :PROMPT_TOKENS].tolist()
    while len(prompts) < args.prompts:  # fewer blocks than prompts: repeat them
        prompts += prompts[: args.prompts - len(prompts)]
    ours = hf_oscq_perplexities(export, manifest, variants, blocks)

    rows = {}
    for variant in variants:
        if args.engine == "vllm":
            engine = VllmEngine(export / variant, max_model_len=args.block_size + args.max_new_tokens + PROMPT_TOKENS)
        else:
            engine = TransformersEngine(export / variant, args.device)
        engine.generate(prompts[:1], 2)  # warm-up
        speeds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            tokens = engine.generate(prompts, args.max_new_tokens)
            speeds.append(tokens / (time.perf_counter() - start))
        total, count = engine.negative_log_likelihood(blocks.blocks.tolist())
        engine.close()
        perplexity = math.exp(total / count)
        rows[variant] = {
            "tokens_per_s": statistics.median(speeds),
            "perplexity": perplexity,
            "perplexity_hf_oscq": ours[variant],
            "perplexity_ratio": perplexity / ours[variant],
        }
    for row in rows.values():
        row["speed_vs_fp"] = row["tokens_per_s"] / rows["fp"]["tokens_per_s"]
        row["perplexity_check"] = abs(row["perplexity_ratio"] - 1) <= args.tolerance

    versions = library_versions()
    for name in ("vllm", "compressed_tensors"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    config = json.loads((export / "fp" / "config.json").read_text())
    record = {
        "engine": args.engine,
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "export": str(export),
        "spec": {key: manifest.get(key) for key in ("granularity", "group_size", "target_modules", "exclude_modules")},
        "model": {key: config.get(key) for key in ("hidden_size", "num_hidden_layers", "intermediate_size")},
        "eval_blocks": len(blocks),
        "block_size": args.block_size,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "tolerance": args.tolerance,
        "variants": rows,
        "versions": versions,
        "python": platform.python_version(),
    }
    name = "serve_vllm_dry_run.json" if args.dry_run else f"serve_{args.engine}.json"
    output = Path(args.output) if args.output else RESULTS / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    for variant, row in rows.items():
        sys.stdout.write(
            f"{variant}: {row['tokens_per_s']:.1f} tokens/s ({row['speed_vs_fp']:.2f}x fp), perplexity "
            f"{row['perplexity']:.4f} vs hf_oscq {row['perplexity_hf_oscq']:.4f} "
            f"(ratio {row['perplexity_ratio']:.6f}, {'ok' if row['perplexity_check'] else 'FAILED'})\n"
        )
    sys.stdout.write(f"wrote {output}\n")
    return 0 if all(row["perplexity_check"] for row in rows.values()) else 1


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("serve_vllm.py", main))
