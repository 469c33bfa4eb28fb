"""Training-step overhead of each mode against plain full-precision training, measured side by side.

Every mode runs the exact computation `OscillationTrainer.compute_loss` adds on top of the task loss:
* fp: plain step;
* oscillation: task loss + osc_lambda * fused_oscillation_penalty (the trainer's path);
* qat: forward through fake_quantized_forward;
* reference: task loss + osc_lambda * oscillation_penalty (plain autograd through the quantizer, the way the paper's
  reference code computes it).
Each step is forward, backward and an Adam update with 32x32 inputs, on ResNet-18 (timm) or the recipes' tiny ViT.
Modes are interleaved in a rotating order and the median step time is reported, so machine noise hits every mode
alike.

    python bench/overhead.py                        # CPU, ResNet-18, batch 128 and 32
    python bench/overhead.py --model vit --batch-sizes 128
    python bench/overhead.py --device cuda --batch-sizes 256 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from hf_oscq import (
    PenaltyWorkspace,
    QuantSpec,
    fake_quantized_forward,
    fused_oscillation_penalty,
    oscillation_penalty,
    select_weights,
)
from hf_oscq.quantization.selection import output_dims
from hf_oscq.scripts.data import DATASETS
from hf_oscq.scripts.models import build_vit

MODES = ("fp", "oscillation", "qat", "reference")


WORKLOADS = {
    "lm": "tiny Llama from its config (hidden 256, 4 layers, 4 heads, 257 byte tokens), 128-token sequences, "
    "group-wise scales (group size 32)",
    "resnet18": "timm resnet18, 32x32 inputs, 10 classes",
    "vit": "tiny ViT of hf_oscq.scripts.models (hidden 192, 6 layers, 3 heads, 4-pixel patches), 32x32 inputs, "
    "10 classes",
}


LM_SEQUENCE_LENGTH = 128
LM_VOCABULARY = 257  # the LM recipe's byte-level tokenizer: 256 bytes and <|endoftext|>


def build(model_name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.nn.Module]:
    """The model and the function that maps its inputs (images, or token ids for "lm") to logits."""
    if model_name == "lm":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=LM_VOCABULARY,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=LM_SEQUENCE_LENGTH,
        )
        lm = LlamaForCausalLM(config)
        return (lambda ids: lm(input_ids=ids).logits.flatten(0, 1)), lm
    if model_name == "resnet18":
        model = timm.create_model("resnet18", num_classes=10)
        return model, model
    vit = build_vit(DATASETS["cifar10"], [str(i) for i in range(10)])
    return (lambda images: vit(pixel_values=images).logits), vit


def make_step(mode: str, device: str, bits: int, osc_lambda: float, model_name: str = "resnet18"):
    torch.manual_seed(0)
    forward, model = build(model_name)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # the language model quantizes its decoder projections group-wise, as LM quantizers do
    spec = QuantSpec(bits, "group", group_size=32) if model_name == "lm" else QuantSpec(bits)
    weights = select_weights(model, spec=spec)
    out_dims = output_dims(model, weights)  # each layer's output-channel dimension, which the scales follow
    workspace = PenaltyWorkspace()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        # Computed before the forward pass, as OscillationTrainer does, so that autograd adds its gradient into the
        # task gradient in place.
        penalty = (
            fused_oscillation_penalty(weights, spec=spec, workspace=workspace, out_dims=out_dims)
            if mode == "oscillation"
            else 0.0
        )
        if mode == "qat":
            with fake_quantized_forward(model, weights, spec=spec):
                loss = F.cross_entropy(forward(images), labels)
        else:
            loss = F.cross_entropy(forward(images), labels)
        if mode == "oscillation":
            loss = loss + osc_lambda * penalty
        elif mode == "reference":
            loss = loss + osc_lambda * oscillation_penalty(model, spec=spec)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(
    batch_size: int, device: str, rounds: int, warmup: int, bits: int, osc_lambda: float, model_name: str
) -> dict:
    steps = {mode: make_step(mode, device, bits, osc_lambda, model_name) for mode in MODES}
    if model_name == "lm":  # random bytes; the labels are the next tokens, flattened as the logits are
        tokens = torch.randint(0, LM_VOCABULARY, (batch_size, LM_SEQUENCE_LENGTH + 1), device=device)
        images, labels = tokens[:, :-1], tokens[:, 1:].flatten()
    else:
        images = torch.randn(batch_size, 3, 32, 32, device=device)
        labels = torch.randint(0, 10, (batch_size,), device=device)
    times = {mode: [] for mode in MODES}
    for round_index in range(warmup + rounds):
        order = MODES[round_index % len(MODES) :] + MODES[: round_index % len(MODES)]
        for mode in order:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[mode](images, labels)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_index >= warmup:
                times[mode].append(time.perf_counter() - start)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    return {
        "batch_size": batch_size,
        "median_step_seconds": medians,
        "ratio_to_fp": {mode: medians[mode] / medians["fp"] for mode in MODES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="resnet18")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--osc-lambda", type=float, default=1.0)
    parser.add_argument("--output", default=None, help="default: bench/results/overhead[_<device>].json")
    args = parser.parse_args()

    results = []
    for batch_size in args.batch_sizes:
        result = measure(batch_size, args.device, args.rounds, args.warmup, args.bits, args.osc_lambda, args.model)
        results.append(result)
        ratios = "  ".join(f"{mode} {ratio:.3f}x" for mode, ratio in result["ratio_to_fp"].items())
        print(f"batch {batch_size:4d}: fp step {1000 * result['median_step_seconds']['fp']:.1f} ms | {ratios}")
    suffix = ("" if args.model == "resnet18" else f"_{args.model}") + (
        "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    )
    output = Path(args.output or Path(__file__).parent / "results" / f"overhead{suffix}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "workload": f"{WORKLOADS[args.model]}, Adam, forward+backward+step",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "bits": args.bits,
        "rounds": args.rounds,
        "results": results,
    }
    output.write_text(json.dumps(record, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("overhead.py", main))
