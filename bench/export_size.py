"""Checkpoint sizes of every w{b} export against fp32 and fp16, and export time for all seven bit-widths.

Models: timm's ResNet-18 through transformers' TimmWrapper (full size with the ImageNet stem, 10 classes, random
weights: sizes and times do not depend on the values) and the micro ViT of the digits demo. Writes
bench/results/export_size.json.

    python bench/export_size.py
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TimmWrapperForImageClassification, ViTForImageClassification

import hf_oscq
from hf_oscq.export.folder import weights_size

BITS = hf_oscq.DEFAULT_EVAL_BITS
RESULTS = Path(__file__).parent / "results" / "export_size.json"
LABELS = [str(i) for i in range(10)]


def resnet18() -> TimmWrapperForImageClassification:
    return hf_oscq.build_resnet18(hf_oscq.DATASETS["cifar10"], LABELS, cifar_stem=False).eval()


def tiny_vit() -> ViTForImageClassification:
    return hf_oscq.build_vit(hf_oscq.DATASETS["digits"], LABELS, size="micro").eval()


def measure(name: str, model, workdir: Path) -> dict:
    weights = hf_oscq.select_weights(model)
    quantized_fp32 = sum(w.numel() * 4 for w in weights.values())
    model.half().save_pretrained(workdir / f"{name}-fp16")
    fp16 = weights_size(workdir / f"{name}-fp16")
    model.float()
    start = time.perf_counter()
    # sizes only: BatchNorm re-estimation changes statistics, not bytes
    out = hf_oscq.export_quantized(model, workdir / name, bits=BITS, plain_rounding=True)
    seconds = time.perf_counter() - start
    sizes = json.loads((out / "oscq_export.json").read_text())["sizes_bytes"]
    fp32 = sizes["fp"]
    rows = {}
    for b in BITS:
        size = sizes[f"w{b}"]
        rows[f"w{b}"] = {
            "bytes": size,
            "vs_fp32": size / fp32,
            "vs_fp16": size / fp16,
            "quantized_tensors_vs_fp32": sum(hf_oscq.packed_size(w.numel(), b) for w in weights.values())
            / quantized_fp32,
        }
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_parameters": sum(w.numel() for w in weights.values()),
        "fp32_bytes": fp32,
        "fp16_bytes": fp16,
        "variants": rows,
        "export_seconds_all_bits": seconds,
    }


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    results = {"bits": list(BITS), "torch": torch.__version__, "python": platform.python_version(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("resnet18", resnet18), ("tiny_vit", tiny_vit)):
            results["models"][name] = measure(name, build(), Path(tmp))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for name, entry in results["models"].items():
        sys.stdout.write(
            f"{name}: fp32 {entry['fp32_bytes']} B, fp16 {entry['fp16_bytes']} B, "
            f"export of {len(BITS)} bit-widths {entry['export_seconds_all_bits']:.2f} s\n"
        )
        for variant, row in entry["variants"].items():
            sys.stdout.write(
                f"  {variant}: {row['bytes']} B = {row['vs_fp32']:.3f} x fp32, {row['vs_fp16']:.3f} x fp16 "
                f"(quantized tensors {row['quantized_tensors_vs_fp32']:.4f} x fp32)\n"
            )
    sys.stdout.write(f"wrote {RESULTS}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("export_size.py", main))
