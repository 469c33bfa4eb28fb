"""What a loaded checkpoint costs at run time: speed (LM decode and prefill, image forward passes), weight memory and
load time of packed `w{b}` models against fp32, bf16 and torchao's int8 weight-only, measured side by side.

Models (random weights: costs do not depend on values):
* `lm1024`: a Llama-style decoder, hidden 1024, intermediate 2816, 2 layers, 16 heads, the byte-level vocabulary of
  the LM recipe (25 M quantized weights), group-wise scales of 32 input features;
* `lm_recipe`: the LM recipe's from-scratch model (`lm_size` micro: hidden 64, 2 layers), group-wise 32;
* `resnet18`: ResNet-18 (timm through TimmWrapper, CIFAR stem) and `vit`: the tiny ViT (hidden 192, 6 layers), as
  the recipes build them for 32x32 CIFAR-10 images, one scale per tensor.

Variants, all loaded with `from_pretrained` from one export: `fp32` (fp/), `bf16` (fp/ with `dtype=torch.bfloat16`),
`torchao int8` (fp/ quantized on load with transformers' `TorchAoConfig(Int8WeightOnlyConfig())`: Linear layers
only), `w2` .. `w8` (the packed folders, on the compiled kernels where they build).

Measured, for every torch thread count of `--threads`, variants interleaved within each repeat (medians):
* LM: greedy decode tokens/s at batch 1 (`generate`, a 16-token prompt, `--new_tokens` new tokens) and prefill time of
  256 tokens at batch 1; images: forward time at batch 1 and 64; under `torch.inference_mode`.
* Weight bytes each loaded model holds (tensor subclasses counted by their inner tensors), the quantized tensors'
  share of their fp32 bytes; load time and peak RSS in fresh processes (`--loads` per variant, interleaved).
* The load average (1 minute) before and after each model's measures: the machine is shared.

The goals (`GOALS`) are evaluated on the measures and marked met or not in the JSON and the printed table:

    python bench/runtime_memory.py [--threads 1 2] [--repeats 5] [--loads 3] [--models lm1024 lm_recipe ...]
        [--device cuda] [--document docs/RESULTS.md]
    python bench/runtime_memory.py --from_record bench/results/runtime_memory.json --document docs/RESULTS.md

On CUDA (`bench/gpu.sh --runtime`), packed weights are dequantized in each forward pass by torch operations (no
GPU weight-only kernel holds hf_oscq's grid exactly: torchao's int4 kernels take bfloat16 scales), and load measures
are skipped (they read the CPU's memory).

Writes bench/results/runtime_memory.json (with the dependency versions), prints the tables, and with `--document`
replaces the generated block of that Markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import hf_oscq

RESULTS = Path(__file__).parent / "results" / "runtime_memory.json"
LABELS = [str(i) for i in range(10)]
BITS = (2, 3, 4, 5, 6, 7, 8)
PEERS = ("fp32", "bf16", "torchao int8")
VARIANTS = (*PEERS, *(f"w{b}" for b in BITS))
LANGUAGE_MODELS = ("lm1024", "lm_recipe")
BEGIN, END = "<!-- BEGIN GENERATED: bench/runtime_memory.py -->", "<!-- END GENERATED: bench/runtime_memory.py -->"

_LOAD_SCRIPT = r"""
import json, sys, time
import torch
import hf_oscq
sys.path.insert(0, sys.argv[1])
from runtime_memory import dummy_inputs, load_variant, vm_kb
torch.set_num_threads(1)
if "torchao" in sys.argv[3]:
    import torchao.quantization  # imported before measuring, as transformers and hf_oscq are
before = vm_kb("VmRSS")
start = time.perf_counter()
model = load_variant(sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
peak = vm_kb("VmHWM")
with torch.inference_mode():  # touches every weight: memory-mapped float weights become resident only now
    model(**dummy_inputs(model))
print(json.dumps({"seconds": seconds, "peak_rss_kb": peak, "rss_before_kb": before,
                  "peak_rss_forward_kb": vm_kb("VmHWM")}))
"""


def vm_kb(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def build(name: str):
    """The float model `name` (see the module docstring) and its export spec."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_oscq.scripts.lm_recipe import LM_SIZES
    from hf_oscq.scripts.text import byte_tokenizer

    torch.manual_seed(0)
    if name in LANGUAGE_MODELS:
        tokenizer = byte_tokenizer()
        sizes = LM_SIZES["micro"] if name == "lm_recipe" else {
            "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2, "num_attention_heads": 16,
        }  # fmt: skip
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            num_key_value_heads=sizes["num_attention_heads"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            **sizes,
        )
        return LlamaForCausalLM(config).eval(), hf_oscq.QuantSpec(4, "group", group_size=32)
    info = hf_oscq.DATASETS["cifar10"]
    if name == "resnet18":
        return hf_oscq.build_resnet18(info, LABELS, cifar_stem=True).eval(), hf_oscq.QuantSpec(4)
    return hf_oscq.build_vit(info, LABELS, size="tiny").eval(), hf_oscq.QuantSpec(4)


def dummy_inputs(model) -> dict:
    if hasattr(model, "generate") and model.can_generate():
        return {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    return {"pixel_values": torch.zeros(1, 3, 32, 32, dtype=model.dtype)}


def load_variant(export_dir: str | Path, variant: str):
    from transformers import TorchAoConfig

    export_dir = Path(export_dir)
    auto = hf_oscq.auto_class_for(export_dir / "fp")
    if variant == "fp32":
        return auto.from_pretrained(export_dir / "fp").eval()
    if variant == "bf16":
        return auto.from_pretrained(export_dir / "fp", dtype=torch.bfloat16).eval()
    if variant.startswith("w"):
        return auto.from_pretrained(export_dir / variant).eval()
    from torchao.quantization import Int8WeightOnlyConfig

    config = TorchAoConfig(Int8WeightOnlyConfig())
    return auto.from_pretrained(export_dir / "fp", quantization_config=config).eval()


def _storage(tensor: torch.Tensor, seen: set[int]) -> int:
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_storage(getattr(tensor, name), seen) for name in names)
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()


def weight_bytes(model, quantized_names: set[str]) -> dict:
    seen: set[int] = set()
    total = sum(_storage(t, seen) for t in [*model.parameters(), *model.buffers()])
    quantized, quantized_fp32 = 0, 0
    for name, parameter in model.named_parameters():
        if name in quantized_names:
            quantized += _storage(parameter, set())
            quantized_fp32 += 4 * parameter.numel()
    return {"total": total, "quantized": quantized, "quantized_vs_fp32": quantized / quantized_fp32}


def measure_loads(export_dir: Path, loads: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for _ in range(loads):
        for variant in VARIANTS:
            completed = subprocess.run(
                [sys.executable, "-c", _LOAD_SCRIPT, str(Path(__file__).parent), str(export_dir), variant],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
            )
            runs[variant].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return {
        variant: {
            "load_seconds": statistics.median(run["seconds"] for run in results),
            "peak_rss_mb": statistics.median(run["peak_rss_kb"] for run in results) / 1024,
            "peak_rss_above_imports_mb": statistics.median(
                run["peak_rss_kb"] - run["rss_before_kb"] for run in results
            )
            / 1024,
            "peak_rss_with_first_forward_mb": statistics.median(run["peak_rss_forward_kb"] for run in results) / 1024,
        }
        for variant, results in runs.items()
    }


def _timed(run, model, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(model)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _workloads(name: str, new_tokens: int, device: str) -> dict:
    """`{measure: how to run a model on its inputs}` of model `name`."""
    generator = torch.Generator().manual_seed(0)
    if name in LANGUAGE_MODELS:
        prompt = torch.randint(3, 250, (1, 16), generator=generator).to(device)
        prefill = torch.randint(3, 250, (1, 256), generator=generator).to(device)

        def decode(model):
            model.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )

        return {"decode_b1": decode, "prefill_256": lambda model: model(input_ids=prefill)}
    images = {batch: torch.randn(batch, 3, 32, 32, generator=generator).to(device) for batch in (1, 64)}
    return {
        f"forward_b{batch}": (lambda model, pixels=pixels: model(pixel_values=pixels.to(model.dtype)))
        for batch, pixels in images.items()
    }


def measure_speed(name: str, models: dict, threads: int, args) -> dict[str, dict]:
    """Median seconds of each workload per variant, variants interleaved in every repeat."""
    torch.set_num_threads(threads)
    workloads = _workloads(name, args.new_tokens, args.device)
    times = {variant: {measure: [] for measure in workloads} for variant in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: first-call costs (kernel build, allocations)
            for run in workloads.values():
                run(model)
        for _ in range(args.repeats):
            for measure, run in workloads.items():
                for variant, model in models.items():
                    times[variant][measure].append(_timed(run, model, args.device))
    rows = {}
    for variant, measures in times.items():
        row = {f"{measure}_ms": 1000 * statistics.median(values) for measure, values in measures.items()}
        if "decode_b1_ms" in row:
            row["decode_tokens_per_s"] = args.new_tokens / (row["decode_b1_ms"] / 1000)
        rows[variant] = row
    fp = rows["fp32"]
    for row in rows.values():
        row["vs_fp32"] = {key: row[key] / fp[key] for key in fp if key.endswith("_ms") or key.endswith("_per_s")}
    return rows


def run_model(name: str, workdir: Path, args) -> dict:
    model, spec = build(name)
    quantized_names = set(hf_oscq.select_weights(model, spec=spec))
    # plain rounding for BatchNorm models: the costs measured here do not depend on the statistics
    export_dir = hf_oscq.export_quantized(model, workdir / name, bits=BITS, spec=spec, plain_rounding=True)
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_parameters": sum(model.get_parameter(n).numel() for n in quantized_names),
        "spec": spec.to_dict(),
        "load_average_1min": {"before": os.getloadavg()[0]},
    }
    loads = measure_loads(export_dir, args.loads) if args.loads else {}
    models = {variant: load_variant(export_dir, variant).to(args.device) for variant in VARIANTS}
    result["memory"] = {variant: weight_bytes(loaded, quantized_names) for variant, loaded in models.items()}
    result["load"] = loads
    result["speed"] = {str(threads): measure_speed(name, models, threads, args) for threads in args.threads}
    result["load_average_1min"]["after"] = os.getloadavg()[0]
    return result


# (goal, models it applies to, how to evaluate it on one model's result at one thread count: (met, worst, where))
def _decode_goal(result, threads: str, low: float, bits) -> tuple[bool, float, str]:
    speed = result["speed"][threads]
    ratios = {f"w{b}": speed[f"w{b}"]["vs_fp32"]["decode_tokens_per_s"] for b in bits}
    variant, worst = min(ratios.items(), key=lambda item: item[1])
    return worst >= low, worst, variant


def _forward_goal(result, threads: str, measure: str, high: float) -> tuple[bool, float, str]:
    speed = result["speed"][threads]
    ratios = {f"w{b}": speed[f"w{b}"]["vs_fp32"][measure] for b in BITS}
    variant, worst = max(ratios.items(), key=lambda item: item[1])
    return worst <= high, worst, variant


def _memory_goal(result, threads: str) -> tuple[bool, float, str]:
    excess = {b: result["memory"][f"w{b}"]["quantized_vs_fp32"] / (b / 32) for b in BITS}
    bits, worst = max(excess.items(), key=lambda item: item[1])
    return worst <= 1.03, worst, f"w{bits}: quantized tensors / (b/32 of fp32)"


def _load_goal(result, threads: str) -> tuple[bool, float, str]:
    if not result["load"]:
        return False, float("nan"), "not measured (--loads 0)"
    fp = result["load"]["fp32"]["load_seconds"]
    ratios = {b: result["load"][f"w{b}"]["load_seconds"] / fp for b in BITS}
    bits, worst = max(ratios.items(), key=lambda item: item[1])
    return worst <= 1.2, worst, f"w{bits} (1 thread)"


# (goal, models, per thread count or not, evaluation)
GOALS = [
    ("LM decode at batch 1 >= 1.0x fp32 tokens/s at every bit-width", LANGUAGE_MODELS, True,
     lambda r, t: _decode_goal(r, t, 1.0, BITS)),
    ("LM decode at batch 1 >= 1.5x fp32 tokens/s at 2-4 bits", LANGUAGE_MODELS, True,
     lambda r, t: _decode_goal(r, t, 1.5, (2, 3, 4))),
    ("batch 1 forward <= 1.2x fp32 time at every bit-width", ("resnet18", "vit"), True,
     lambda r, t: _forward_goal(r, t, "forward_b1_ms", 1.2)),
    ("batch 64 forward <= 1.05x fp32 time at every bit-width", ("resnet18", "vit"), True,
     lambda r, t: _forward_goal(r, t, "forward_b64_ms", 1.05)),
    ("quantized weights in memory <= b/32 of fp32 + 3 %", (*LANGUAGE_MODELS, "resnet18", "vit"), False,
     _memory_goal),
    ("load time <= 1.2x fp32", (*LANGUAGE_MODELS, "resnet18", "vit"), False, _load_goal),
]  # fmt: skip


def evaluate_goals(report: dict) -> list[dict]:
    """One row per goal, model and (for speed goals) thread count: met or not, the worst ratio and where."""
    rows = []
    for goal, applies_to, per_thread_count, evaluate in GOALS:
        for name, result in report["models"].items():
            if name not in applies_to:
                continue
            for threads in result["speed"] if per_thread_count else ["-"]:
                met, worst, where = evaluate(result, threads)
                rows.append(
                    {"goal": goal, "model": name, "threads": threads, "met": met, "worst": worst, "where": where}
                )
    return rows


def tables(report: dict) -> str:
    """Markdown tables of the report: speed per model and thread count, memory and load, goals."""
    lines = []
    for name, result in report["models"].items():
        load = result["load_average_1min"]
        lines += [f"**{name}** ({result['quantized_parameters'] / 1e6:.1f} M quantized weights, "
                  f"{result['spec']['granularity']} scales; load average {load['before']:.1f} before, "
                  f"{load['after']:.1f} after)", ""]  # fmt: skip
        measures = list(next(iter(result["speed"].values()))["fp32"])
        measures = [m for m in measures if m.endswith("_ms") or m.endswith("_per_s")]
        header = ["threads", "variant", *measures]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for threads, speed in result["speed"].items():
            for variant, row in speed.items():
                cells = [f"{row[m]:.1f} ({row['vs_fp32'][m]:.2f}x)" for m in measures]
                lines.append(f"| {threads} | {variant} | " + " | ".join(cells) + " |")
        lines += ["", "| variant | weights in memory (MB) | quantized tensors / fp32 | load (s) | peak RSS loading "
                  "(MB) |", "|---|---|---|---|---|"]  # fmt: skip
        for variant, memory in result["memory"].items():
            load_row = result["load"].get(variant)
            load_cell = f"{load_row['load_seconds']:.2f}" if load_row else "-"
            rss_cell = f"{load_row['peak_rss_mb']:.0f}" if load_row else "-"
            lines.append(f"| {variant} | {memory['total'] / 1e6:.2f} | {memory['quantized_vs_fp32']:.4f} | "
                         f"{load_cell} | {rss_cell} |")  # fmt: skip
        lines.append("")
    lines += ["| goal | model | threads | met | worst ratio | where |", "|---|---|---|---|---|---|"]
    for row in report["goals"]:
        lines.append(f"| {row['goal']} | {row['model']} | {row['threads']} | {'met' if row['met'] else 'NOT met'} | "
                     f"{row['worst']:.3f} | {row['where']} |")  # fmt: skip
    return "\n".join(lines)


def replace_block(document: Path, text: str) -> None:
    """Replaces what lies between the BEGIN and END markers of `document` by `text`."""
    content = document.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{document} has no block marked {BEGIN} ... {END} to replace")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    document.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    from hf_oscq.quantization import kernel_build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant and workload")
    parser.add_argument("--loads", type=int, default=3, help="fresh processes per variant for the load measures")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per decode run")
    parser.add_argument("--models", nargs="+", default=[*LANGUAGE_MODELS, "resnet18", "vit"],
                        choices=[*LANGUAGE_MODELS, "resnet18", "vit"])  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (packed weights dequantize there)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--document", type=Path, help="Markdown file whose generated block gets the tables")
    parser.add_argument("--from_record", type=Path, help="measure nothing: tables and goals of this JSON record")
    args = parser.parse_args(argv)
    if args.from_record:  # the goals re-evaluated, the tables regenerated, the record's measures unchanged
        report = json.loads(args.from_record.read_text())
        report["goals"] = evaluate_goals(report)
        args.from_record.write_text(json.dumps(report, indent=1) + "\n")
        text = tables(report)
        if args.document:
            replace_block(args.document, text)
        sys.stdout.write(text + "\n")
        return 0
    if args.device == "cuda":
        report_device = torch.cuda.get_device_name()  # fails here, before any work, without a GPU
    else:
        report_device = platform.processor() or platform.machine()
    import torchao
    import transformers

    report = {
        "command": "python bench/runtime_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "repeats": args.repeats,
        "loads": args.loads,
        "new_tokens": args.new_tokens,
        "device": f"{args.device}: {report_device}",
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "versions": {
            "hf_oscq": hf_oscq.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torchao": torchao.__version__,
        },  # fmt: skip
        "packed_kernels": kernel_build.kernels_unavailable_reason() or "compiled",
        "models": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            report["models"][name] = run_model(name, Path(workdir), args)
    report["goals"] = evaluate_goals(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    text = tables(report)
    if args.document:
        replace_block(args.document, text)
    sys.stdout.write(text + f"\n\nwrote {args.output}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("runtime_memory.py", main))
