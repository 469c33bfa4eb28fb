"""What a loaded checkpoint costs at run time: weight memory, peak RSS while loading, load time, forward latency.

Models as the recipes build them: ResNet-18 (timm, CIFAR stem, through transformers' TimmWrapper) and the tiny ViT
(hidden 192, 6 layers, 64 tokens), both for 32x32 CIFAR-10 images, random weights (costs do not depend on values).
Variants, all loaded with `from_pretrained`: `fp32` (the export's fp/ folder), `packed w2/w3/w4/w8` (the w{b}/
folders: codes stay packed, dequantized on the fly), `dequantized w3` (`OscqQuantizationConfig(dequantize=True)`)
and `torchao int8` (the fp/ folder quantized on load with transformers' `TorchAoConfig(Int8WeightOnlyConfig())`,
the reference weight-only peer; it quantizes Linear layers only).

* weight bytes: storage bytes of every parameter and buffer, tensor subclasses counted by their inner tensors;
  `quantized_vs_fp32` is the bytes of the quantized weights against 4 bytes per quantized weight.
* load: a fresh Python process per load (imports done first): peak RSS (VmHWM) during `from_pretrained`, its rise
  above the RSS after the imports, the peak once a first forward pass has touched every weight (safetensors files
  are memory-mapped: float weights a load never reads become resident only then), and the time of
  `from_pretrained`; medians of `--loads` processes per variant, variants interleaved.
* forward: batch 1 and 64, `torch.inference_mode`, medians of `--repeats` passes, variants interleaved in one loop.

    python bench/runtime_memory.py [--threads 1] [--repeats 5] [--loads 3]

Writes bench/results/runtime_memory.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
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
from hf_oscq import OscqQuantizationConfig

RESULTS = Path(__file__).parent / "results" / "runtime_memory.json"
LABELS = [str(i) for i in range(10)]
PACKED_BITS = (2, 3, 4, 8)
VARIANTS = ["fp32", *[f"packed w{b}" for b in PACKED_BITS], "dequantized w3", "torchao int8"]

_LOAD_SCRIPT = r"""
import json, sys, time
import torch
import hf_oscq
from transformers import AutoModelForImageClassification
sys.path.insert(0, sys.argv[1])
from runtime_memory import load_variant, vm_kb
torch.set_num_threads(1)
if "torchao" in sys.argv[3]:
    import torchao.quantization  # imported before measuring, as transformers and hf_oscq are
before = vm_kb("VmRSS")
start = time.perf_counter()
model = load_variant(sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
peak = vm_kb("VmHWM")
with torch.inference_mode():  # touches every weight: memory-mapped float weights become resident only now
    model(pixel_values=torch.zeros(1, 3, 32, 32))
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
    info = hf_oscq.DATASETS["cifar10"]
    if name == "resnet18":
        return hf_oscq.build_resnet18(info, LABELS, cifar_stem=True).eval()
    return hf_oscq.build_vit(info, LABELS, size="tiny").eval()


def load_variant(export_dir: str | Path, variant: str):
    from transformers import AutoModelForImageClassification, TorchAoConfig

    export_dir = Path(export_dir)
    if variant == "fp32":
        return AutoModelForImageClassification.from_pretrained(export_dir / "fp")
    if variant.startswith("packed"):
        return AutoModelForImageClassification.from_pretrained(export_dir / variant.split()[1])
    if variant == "dequantized w3":
        config = OscqQuantizationConfig(dequantize=True)
        return AutoModelForImageClassification.from_pretrained(export_dir / "w3", quantization_config=config)
    from torchao.quantization import Int8WeightOnlyConfig

    config = TorchAoConfig(Int8WeightOnlyConfig())
    return AutoModelForImageClassification.from_pretrained(export_dir / "fp", quantization_config=config)


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
                env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
            )
            runs[variant].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return {
        variant: {
            "load_seconds": statistics.median(run["seconds"] for run in results),
            "peak_rss_mb": statistics.median(run["peak_rss_kb"] for run in results) / 1024,
            "rss_before_load_mb": statistics.median(run["rss_before_kb"] for run in results) / 1024,
            "peak_rss_with_first_forward_mb": statistics.median(run["peak_rss_forward_kb"] for run in results) / 1024,
            "peak_rss_above_imports_mb": statistics.median(
                run["peak_rss_kb"] - run["rss_before_kb"] for run in results
            )
            / 1024,
        }
        for variant, results in runs.items()
    }


def measure_forward(models: dict, repeats: int) -> dict[str, dict]:
    times: dict[str, dict[int, list[float]]] = {variant: {1: [], 64: []} for variant in models}
    generator = torch.Generator().manual_seed(0)
    inputs = {batch: torch.randn(batch, 3, 32, 32, generator=generator) for batch in (1, 64)}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(pixel_values=inputs[1])
        for _ in range(repeats):
            for batch in (1, 64):
                for variant, model in models.items():
                    start = time.perf_counter()
                    model(pixel_values=inputs[batch])
                    times[variant][batch].append(time.perf_counter() - start)
    return {
        variant: {f"forward_b{batch}_ms": 1000 * statistics.median(values) for batch, values in batches.items()}
        for variant, batches in times.items()
    }


def run_model(name: str, workdir: Path, repeats: int, loads: int) -> dict:
    model = build(name)
    quantized_names = set(hf_oscq.select_weights(model))
    export_dir = hf_oscq.export_quantized(model, workdir / name, bits=PACKED_BITS)
    rows = {variant: {} for variant in VARIANTS}
    for variant, load in measure_loads(export_dir, loads).items():
        rows[variant].update(load)
    models = {variant: load_variant(export_dir, variant).eval() for variant in VARIANTS}
    for variant, loaded in models.items():
        rows[variant]["weight_bytes"] = weight_bytes(loaded, quantized_names)
    for variant, forward in measure_forward(models, repeats).items():
        rows[variant].update(forward)
    fp = rows["fp32"]
    for row in rows.values():
        row["vs_fp32"] = {
            "weight_bytes": row["weight_bytes"]["total"] / fp["weight_bytes"]["total"],
            "peak_rss": row["peak_rss_mb"] / fp["peak_rss_mb"],
            "peak_rss_above_imports": row["peak_rss_above_imports_mb"] / fp["peak_rss_above_imports_mb"],
            "peak_rss_with_first_forward": row["peak_rss_with_first_forward_mb"]
            / fp["peak_rss_with_first_forward_mb"],
            "load_seconds": row["load_seconds"] / fp["load_seconds"],
            "forward_b1": row["forward_b1_ms"] / fp["forward_b1_ms"],
            "forward_b64": row["forward_b64_ms"] / fp["forward_b64_ms"],
        }
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_parameters": sum(model.get_parameter(n).numel() for n in quantized_names),
        "variants": rows,
    }


def table(report: dict) -> str:
    lines = [
        "| model | variant | weights in memory (MB) | quantized tensors vs fp32 | peak RSS loading (MB) "
        "| above imports (MB) | peak RSS with 1st forward (MB) | load (s) | forward b1 (ms) | forward b64 (ms) "
        "| b64 vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in report["models"].items():
        for variant, row in result["variants"].items():
            lines.append(
                f"| {name} | {variant} | {row['weight_bytes']['total'] / 1e6:.2f} "
                f"| {row['weight_bytes']['quantized_vs_fp32']:.4f} | {row['peak_rss_mb']:.0f} "
                f"| {row['peak_rss_above_imports_mb']:.1f} | {row['peak_rss_with_first_forward_mb']:.0f} "
                f"| {row['load_seconds']:.2f} "
                f"| {row['forward_b1_ms']:.1f} | {row['forward_b64_ms']:.0f} "
                f"| {row['vs_fp32']['forward_b64']:.2f}x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the forward passes")
    parser.add_argument("--repeats", type=int, default=5, help="forward passes per variant and batch size")
    parser.add_argument("--loads", type=int, default=3, help="fresh processes per variant for the load measures")
    parser.add_argument("--models", nargs="+", default=["resnet18", "vit"], choices=["resnet18", "vit"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {
        "command": "python bench/runtime_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "repeats": args.repeats,
        "loads": args.loads,
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            report["models"][name] = run_model(name, Path(workdir), args.repeats, args.loads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    sys.stdout.write(table(report) + f"\n\nwrote {args.output}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("runtime_memory.py", main))
