"""Where the quality grid's trained weights sit relative to the quantization grid, layer by layer.

For each finished FP cell and each cell trained for `--bits` whose weights are still in the work folder
(bench/quality.py --work_dir), and for each
quantized layer: its size N, the per-weight strength of the penalty's gradient 2 lambda / N (PAPER.md section 3), the
fraction of weights within 0.1 bin of a rounding threshold at the given bit-width (0.2 if positions were uniform),
the mean rounding error in bins (0.25 if uniform), the ratio max|W| / std (the scale follows the largest weight)
and the fraction of weights rounded to 0. Writes bench/results/quality/diagnostics/weight_stats.json.

    python bench/weight_stats.py --bits 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification

import hf_oscq
from hf_oscq import quantize_codes, select_weights

RESULTS = Path(__file__).resolve().parent / "results" / "quality"


def layer_stats(weight: torch.Tensor, bits: int, window: float = 0.1) -> dict[str, float]:
    """Position of the weights inside their quantization bins at `bits` bits (per-tensor scale, PAPER.md section 1).

    An all-zero tensor (scale 0) has every code and position at 0, and a max/std ratio of 0.
    """
    codes, scale = quantize_codes(weight, bits)
    position = weight / scale if scale else torch.zeros_like(weight)
    offset = position - torch.floor(position)  # in [0, 1): 0.5 is a rounding threshold
    return {
        "near_threshold": float(((offset - 0.5).abs() < window).float().mean()),
        "mean_rounding_error_bins": float((codes - position).abs().mean()),
        # The scale follows the largest weight: a high max/std ratio means a coarse grid for all the others.
        "max_over_std": float(weight.abs().max() / weight.std()) if weight.numel() > 1 and scale else 0.0,
        "zero_code_fraction": float((codes == 0).float().mean()),
    }


def model_folder(work_dir: Path, cell: dict) -> Path | None:
    matches = sorted(work_dir.glob(f"**/{cell['name']}/training/{cell['method']}/model.safetensors"))
    return matches[-1].parent if matches else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/bench_quality"))
    args = parser.parse_args(argv)
    assert hf_oscq  # registers resnet18_cifar in timm, needed to load the ResNet-18 folders
    report = {"bits": args.bits, "cells": {}}
    for path in sorted(args.results.glob("*.json")):
        cell = json.loads(path.read_text())["cell"]
        folder = model_folder(args.work_dir, cell)
        if folder is None or cell["bits"] not in (None, args.bits):  # FP runs and runs that target these bits
            continue
        model = AutoModelForImageClassification.from_pretrained(folder)
        osc_lambda = cell["osc_lambda"] or 0.0
        layers = {}
        for name, weight in select_weights(model).items():
            layers[name] = {
                "numel": weight.numel(),
                "penalty_gradient_factor": 2 * osc_lambda / weight.numel(),
                **layer_stats(weight.detach(), args.bits),
            }
        report["cells"][cell["name"]] = layers
        sys.stdout.write(f"{cell['name']}: {len(layers)} layers\n")
    output = args.results / "diagnostics" / f"weight_stats_w{args.bits}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    sys.stdout.write(f"wrote {output}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("weight_stats.py", main))
