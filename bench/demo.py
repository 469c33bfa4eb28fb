"""Runs the Fashion-MNIST demo (`recipes/configs/resnet18_fashion_mnist_demo.yaml`, what `make demo` runs) once
per seed and checks what its table must show, writing one JSON per seed to `bench/results/demo/`.

    python bench/demo.py --seeds 0 1 2
    python bench/demo.py --config recipes/configs/digits_demo.yaml --results bench/results/demo_digits

The checks, on the demo's test images (every number from the run's own `cross_bit.json`, whose tables the record
keeps with what they were measured on):
(a) the regularizer at its target bit-width is within 2 points of QAT there;
(b) at the bit-width below the target it beats both FP + PTQ and QAT by at least 20 points;
(c) at 5-8 bits it stays within 1 point of its own full-precision accuracy (rounding costs at most 1 point);
(d) at 5-8 bits it is at most 1 point below the FP run's full precision (the regularizer plus rounding cost at most
    1 point against plain training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "recipes" / "configs" / "resnet18_fashion_mnist_demo.yaml"
RESULTS = Path(__file__).resolve().parent / "results" / "demo"
NEAR_QAT_POINTS = 2.0
BELOW_TARGET_POINTS = 20.0
HIGH_BITS = (5, 6, 7, 8)
NEAR_FP_POINTS = 1.0


def checks(tables: dict, target: int) -> list[dict]:
    """The demo's three claims on one run's tables (`{"oscillation"|"qat"|"none": {"fp"|"w{b}": {"accuracy"}}}`)."""

    def accuracy(run: str, column: str) -> float:
        return 100 * tables[run][column]["accuracy"]

    reg, qat, fp = "oscillation", "qat", "none"
    below = f"w{target - 1}"
    rows = [
        {
            "check": f"(a) w{target}: regularizer within {NEAR_QAT_POINTS:g} points of QAT",
            "values": f"{accuracy(reg, f'w{target}'):.1f} vs {accuracy(qat, f'w{target}'):.1f}",
            "holds": accuracy(reg, f"w{target}") >= accuracy(qat, f"w{target}") - NEAR_QAT_POINTS,
        },
        {
            "check": f"(b) {below}: regularizer >= {BELOW_TARGET_POINTS:g} points above FP + PTQ and QAT",
            "values": f"{accuracy(reg, below):.1f} vs {accuracy(fp, below):.1f} / {accuracy(qat, below):.1f}",
            "holds": accuracy(reg, below) >= max(accuracy(fp, below), accuracy(qat, below)) + BELOW_TARGET_POINTS,
        },
    ]
    own = accuracy(reg, "fp")
    high = [accuracy(reg, f"w{b}") for b in HIGH_BITS]
    rows.append(
        {
            "check": f"(c) w5-w8: regularizer within {NEAR_FP_POINTS:g} point of its full precision",
            "values": f"{min(high):.1f}..{max(high):.1f} vs {own:.1f}",
            "holds": max(abs(value - own) for value in high) <= NEAR_FP_POINTS,
        }
    )
    full = accuracy(fp, "fp")
    rows.append(
        {
            "check": f"(d) w5-w8: regularizer at most {NEAR_FP_POINTS:g} point below the FP run's full precision",
            "values": f"{min(high):.1f}..{max(high):.1f} vs {full:.1f}",
            "holds": min(high) >= full - NEAR_FP_POINTS,
        }
    )
    return rows


def dependency_versions(python: str) -> dict[str, str]:
    """The versions of the libraries the recipe ran on (asked of `python`, the interpreter that ran it)."""
    names = ("hf_oscq", "torch", "transformers", "accelerate", "datasets", "timm", "numpy")
    script = (
        "import importlib.metadata as m, json, platform\n"
        "def version(name):\n"
        "    try:\n        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n        return None\n"
        f"print(json.dumps({{'python': platform.python_version(), **{{n: version(n) for n in {names!r}}}}}))"
    )
    output = subprocess.run([python, "-c", script], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def run_seed(seed: int, output_root: Path, python: str, config_path: Path = CONFIG) -> dict:
    """Runs the demo's recipe (`recipes/train_<model>.py`, the config's `model`, ViT by default) for one seed."""
    output_dir = output_root / f"seed{seed}"
    config = yaml.safe_load(config_path.read_text())
    command = [
        python,
        f"recipes/train_{config.get('model', 'vit')}.py",
        "--config",
        str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT) else str(config_path),
        "--seed",
        str(seed),
        "--output_dir",
        str(output_dir),
    ]
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    measured = json.loads((output_dir / "cross_bit.json").read_text())
    tables = measured["runs"]
    shown = ["python", *command[1:]]  # as a user types it: no interpreter path, folders relative to the clone
    shown[-1] = str(output_dir.relative_to(ROOT)) if output_dir.is_relative_to(ROOT) else str(output_dir)
    return {
        "seed": seed,
        "command": shlex.join(shown),
        "config": config,
        "tables": tables,
        # what every table was measured on (dataset, split, number of images, BatchNorm handling)
        "provenance": measured["provenance"],
        "checks": checks(tables, config.get("osc_bits", 3)),
        "seconds": seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": dependency_versions(python),
        # the arithmetic (and so the last digits) depends on the number of threads: make demo leaves torch's default
        "torch_threads": os.environ.get("OMP_NUM_THREADS") or f"torch's default ({os.cpu_count()} CPUs)",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_root", type=Path, default=ROOT / "outputs" / "demo_seeds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the demo's recipe config (default: %(default)s)")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    failed = 0
    for seed in args.seeds:
        record = run_seed(seed, args.output_root, args.python, args.config.resolve())
        (args.results / f"seed{seed}.json").write_text(json.dumps(record, indent=2) + "\n")
        sys.stdout.write(f"seed {seed}: {record['seconds']:.0f} s (load {record['load_average_before'][0]:.1f})\n")
        for row in record["checks"]:
            sys.stdout.write(f"  {row['check']}: {row['values']} -> {'holds' if row['holds'] else 'FAILS'}\n")
            failed += not row["holds"]
    return 1 if failed else 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("demo.py", main))
