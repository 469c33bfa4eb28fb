"""What `import hf_oscq` costs a user who loads a checkpoint, and how fast `hf-oscq --help` answers.

Three commands, each in a fresh interpreter, interleaved in a rotating order over several rounds so that machine
noise hits them alike; the median wall time (process start to exit) and the median peak resident memory (the
child's own `ru_maxrss`, from `os.wait4`) are reported:

* baseline: `import torch, transformers; from transformers import AutoModelForImageClassification`, what a user
  loading a `w{b}` checkpoint imports anyway;
* hf_oscq: the same plus `import hf_oscq` (the child also times that import alone, in-process: the difference of two
  whole-process medians is at the mercy of machine noise when it is small);
* help: `hf-oscq --help` (the console script next to this interpreter, else `python -m hf_oscq.cli --help`).

It also lists the heavy modules (datasets, timm, ...) found in `sys.modules` after `import hf_oscq`, and writes
everything to bench/results/import_cost.json (or `--output`). Targets: hf_oscq at most 0.5 s and 30 MB over the
baseline, `--help` under 2 s.

    python bench/import_cost.py                 # 5 rounds
    python bench/import_cost.py --rounds 9 --output /tmp/import_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = "import torch, transformers; from transformers import AutoModelForImageClassification"
HEAVY_MODULES = (
    "datasets",
    "timm",
    "torchvision",
    "matplotlib",
    "jinja2",
    "pandas",
    "gradio",
    "sklearn",
    "tensorboard",
    "accelerate",
    "scipy",
    "PIL",
)
TARGET_SECONDS = 0.5
TARGET_MEGABYTES = 30.0
TARGET_HELP_SECONDS = 2.0
RESULTS = Path(__file__).resolve().parent / "results" / "import_cost.json"


def commands() -> dict[str, list[str]]:
    script = Path(sys.executable).with_name("hf-oscq")
    help_command = [str(script), "--help"] if script.is_file() else [sys.executable, "-m", "hf_oscq.cli", "--help"]
    if not script.is_file() and shutil.which("hf-oscq"):
        help_command = [shutil.which("hf-oscq"), "--help"]
    return {
        "baseline": [sys.executable, "-c", BASELINE],
        "hf_oscq": [
            sys.executable,
            "-c",
            f"{BASELINE}; import time; t = time.perf_counter(); import hf_oscq; print(time.perf_counter() - t)",
        ],
        "help": help_command,
    }


def run_once(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and the standard output of one fresh process running `command`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            error = err.read().decode(errors="replace")
            raise RuntimeError(f"{command} failed with exit code {process.returncode}:\n{error[-2000:]}")
        # ru_maxrss is in kilobytes on Linux (bytes on macOS).
        megabytes = usage.ru_maxrss / (1024**2 if sys.platform == "darwin" else 1024)
        return seconds, megabytes, out.read().decode(errors="replace")


def heavy_modules_after_import() -> list[str]:
    """The heavy modules present in `sys.modules` after `import hf_oscq` alone, in a fresh interpreter."""
    probe = (
        "import json, sys; import hf_oscq; "
        f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))"
    )
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure(rounds: int, warmup: int) -> dict:
    runs = commands()
    names = list(runs)
    samples: dict[str, dict[str, list[float]]] = {name: {"seconds": [], "megabytes": []} for name in names}
    in_process: list[float] = []
    for round_index in range(warmup + rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            seconds, megabytes, output = run_once(runs[name])
            if round_index >= warmup:
                samples[name]["seconds"].append(seconds)
                samples[name]["megabytes"].append(megabytes)
                if name == "hf_oscq":
                    in_process.append(float(output.strip().splitlines()[-1]))
    medians = {
        name: {key: statistics.median(values) for key, values in sample.items()} for name, sample in samples.items()
    }
    base, ours, help_ = medians["baseline"], medians["hf_oscq"], medians["help"]
    return {
        "commands": {name: " ".join(command) for name, command in runs.items()},
        "rounds": rounds,
        "samples": samples,
        "median": medians,
        "import_overhead_seconds": ours["seconds"] - base["seconds"],
        "import_hf_oscq_in_process_seconds": statistics.median(in_process),
        "import_overhead_megabytes": ours["megabytes"] - base["megabytes"],
        "import_time_ratio": ours["seconds"] / base["seconds"],
        "import_memory_ratio": ours["megabytes"] / base["megabytes"],
        "help_seconds": help_["seconds"],
        "heavy_modules_after_import": heavy_modules_after_import(),
        "targets": {
            "import_overhead_seconds": TARGET_SECONDS,
            "import_overhead_megabytes": TARGET_MEGABYTES,
            "help_seconds": TARGET_HELP_SECONDS,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (disk cache)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.warmup)
    import torch
    import transformers

    import hf_oscq

    result["versions"] = {
        "hf_oscq": hf_oscq.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    medians = result["median"]
    for name in ("baseline", "hf_oscq", "help"):
        sys.stdout.write(
            f"{name:8s}: {medians[name]['seconds']:.2f} s, peak RSS {medians[name]['megabytes']:.0f} MB"
            f"   ({result['commands'][name]})\n"
        )
    met = lambda value, target: "meets" if value <= target else "MISSES"  # noqa: E731
    sys.stdout.write(
        f"import hf_oscq over the baseline: {result['import_overhead_seconds']:+.2f} s "
        f"({result['import_time_ratio']:.2f}x), {result['import_overhead_megabytes']:+.0f} MB "
        f"({result['import_memory_ratio']:.2f}x); the import alone, in-process: "
        f"{1000 * result['import_hf_oscq_in_process_seconds']:.1f} ms; "
        f"target +{TARGET_SECONDS} s / +{TARGET_MEGABYTES:.0f} MB: "
        f"{met(result['import_overhead_seconds'], TARGET_SECONDS)} / "
        f"{met(result['import_overhead_megabytes'], TARGET_MEGABYTES)}\n"
        f"hf-oscq --help: {result['help_seconds']:.2f} s; target {TARGET_HELP_SECONDS} s: "
        f"{met(result['help_seconds'], TARGET_HELP_SECONDS)}\n"
        f"heavy modules after import hf_oscq: {result['heavy_modules_after_import'] or 'none'}\n"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(f"wrote {args.output}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("import_cost.py", main))
