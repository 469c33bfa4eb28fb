"""Training-step cost of every training method against plain training, measured side by side through
`OscillationTrainer.compute_loss`, the path the recipes train with.

Each method gets its own copy of the same model (the peers comparison's: ResNet-18 with the ImageNet stem, or the
tiny ViT with 7-pixel patches, on 28x28 Fashion-MNIST-shaped inputs) and its own Adam optimizer; a step is
`compute_loss`, backward and the optimizer update on one batch. Methods are interleaved in a rotating order and the
median step time of each is reported, so machine noise hits every method alike; the ratio to plain training
(`none`) is the cost a user pays per step.

    python bench/method_cost.py                              # both models, batch 128, 1 thread
    python bench/method_cost.py --models vit --rounds 9

Writes bench/results/method_cost.json (override with --output).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from hf_oscq import OscillationConfig, OscillationTrainer
from hf_oscq.errors import configure_logging
from hf_oscq.paths import check_output_path
from hf_oscq.scripts.data import DATASETS
from hf_oscq.scripts.models import build_model
from hf_oscq.training.methods import method_names

RESULTS = Path(__file__).resolve().parent / "results"
# The peers comparison's settings of each method (bench/quality.py, profile "peers").
SETTINGS = {
    "oscillation": {"osc_lambda": 10.0},
    "kure": {"osc_lambda": 1.0},
    "dampening": {"osc_lambda": 10.0},
    "multibit_qat": {"osc_multibit_bits": [2, 4, 8]},
}
MODELS = {
    "resnet18in": ("resnet18", {"cifar_stem": False}, "timm resnet18, ImageNet stem (7x7 conv, max-pool)"),
    "vit": ("vit", {"patch_size": 7}, "tiny ViT of hf_oscq.scripts.models (hidden 192, 6 layers), 7-pixel patches"),
}


def trainers(model_name: str, methods: list[str], batch_size: int, workdir: Path) -> dict:
    info = DATASETS["fashion_mnist"]
    recipe_model, options, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = build_model(recipe_model, info, [str(i) for i in range(10)], **options)
    found = {}
    for method in methods:
        args = OscillationConfig(
            output_dir=str(workdir / method),
            osc_method=method,
            osc_bits=3,
            max_steps=1000,
            per_device_train_batch_size=batch_size,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            **SETTINGS.get(method, {}),
        )
        trainer = OscillationTrainer(model=copy.deepcopy(model), args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
        trainer.state.max_steps, trainer.state.global_step = args.max_steps, args.max_steps // 2
        trainer.current_gradient_accumulation_steps = 1
        found[method] = trainer
    return found


def step(trainer: OscillationTrainer, batch: dict) -> float:
    model = trainer.model.train()
    start = time.perf_counter()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(model_name: str, methods: list[str], batch_size: int, rounds: int, warmup: int, workdir: Path) -> dict:
    runs = trainers(model_name, methods, batch_size, workdir)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(batch_size, 1, 28, 28, generator=generator),
        "labels": torch.randint(0, 10, (batch_size,), generator=generator),
    }
    times = {method: [] for method in methods}
    for index in range(warmup + rounds):
        order = methods[index % len(methods) :] + methods[: index % len(methods)]
        for method in order:
            seconds = step(runs[method], batch)
            if index >= warmup:
                times[method].append(seconds)
    medians = {method: statistics.median(values) for method, values in times.items()}
    return {
        "model": MODELS[model_name][2],
        "batch_size": batch_size,
        "median_step_seconds": medians,
        "ratio_to_plain": {method: medians[method] / medians["none"] for method in methods},
        "step_seconds": times,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(method_names()), choices=list(method_names()))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/hf_oscq_method_cost")
    parser.add_argument("--output", default=str(RESULTS / "method_cost.json"))
    args = parser.parse_args()
    check_output_path(args.output, "--output", "file")  # before the first step is timed
    check_output_path(args.workdir, "--workdir", "folder")
    configure_logging(logging.WARNING)
    torch.set_num_threads(args.threads)
    methods = ["none", *[method for method in args.methods if method != "none"]]
    results = {}
    for model_name in args.models:
        results[model_name] = measure(
            model_name, methods, args.batch_size, args.rounds, args.warmup, Path(args.workdir)
        )
        ratios = results[model_name]["ratio_to_plain"]
        print(f"{model_name}: " + ", ".join(f"{method} {ratio:.2f}x" for method, ratio in ratios.items()), flush=True)
    from importlib.metadata import version

    record = {
        "setup": {
            "threads": args.threads,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "settings": SETTINGS,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": list(os.getloadavg()),
            "versions": {name: version(name) for name in ("hf_oscq", "torch", "transformers", "timm")},
        },
        "results": results,
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("method_cost.py", main))
