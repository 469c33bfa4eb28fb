"""Quality grid on real Fashion-MNIST: FP (+PTQ), QAT at b and the oscillation regularizer at b, every model evaluated
at every bit-width 2..8, with plain rounding and with BatchNorm re-estimation.

Each cell trains one run through the recipes' `hf_oscq.scripts.recipe.train_one` (the same Trainer, data and model
builders as `recipes/train_*.py`; no second training loop), evaluates it on the test subset with plain rounding,
then again with BatchNorm re-estimation (models with BatchNorm only; for the others both are the same numbers), and
writes `bench/results/quality/<cell>.json` at once. Cells whose JSON exists are skipped, so the grid resumes; several
workers may run side by side (each claims a cell with a lock file).

    python bench/quality.py --list                        # the grid, in priority order, with what is done
    python bench/quality.py --threads 1                   # run every missing cell (start one or two workers)
    python bench/quality.py --only resnet18_osc3_lam10_s0 # one cell
    python bench/quality.py --only resnet18_osc3_lam10_s0 --reestimate  # its BatchNorm table again, saved model
    python bench/aggregate.py                             # tables and plots into docs/RESULTS.md

Profiles (`--profile`): `cpu` is the 2,000-image grid above; `full` the whole Fashion-MNIST training split (60,000
images, 3 epochs) and test split (10,000 images) with both penalty normalizations and both ResNet-18 stems
(`resnet18`: the CIFAR 3x3 stem, `resnet18in`: the ImageNet 7x7 stem with max-pool); `pilot` a tenth of that, scored on
2,000 images held out of the training split (never the test split), to choose the default lambda; `gpu` and `smoke`
serve bench/gpu.sh.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# "cpu": the smallest honest settings that fit the 2-core budget (docs/RESULTS.md, "Budget"); every cell uses them.
CPU_SETTINGS = {
    "dataset": "fashion_mnist",
    "max_train_samples": 2000,
    "max_eval_samples": 500,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 250,  # one batch = the BatchNorm re-estimation set
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "optim": "adamw_torch",
    "weight_decay": 0.0,
    "bn_recalibration_samples": 250,
    "dataloader_num_workers": 0,
    # The tiny ViT (hidden 192, 6 layers) learns far slower per step than ResNet-18: with 4-pixel patches and 2000
    # images it stays near 35 %. 7-pixel patches (16 tokens, a third of the compute) buy it 3x the images.
    "per_model": {"vit": {"patch_size": 7, "max_train_samples": 6000}},
}
PROFILES = {
    "cpu": CPU_SETTINGS,
    # One H200 (bench/gpu.sh): ten times the data, same schedule otherwise.
    "gpu": CPU_SETTINGS
    | {
        "max_train_samples": 20000,
        "max_eval_samples": 5000,
        "num_train_epochs": 3,
        "per_device_eval_batch_size": 500,
        "bn_recalibration_samples": 500,
        "dataloader_num_workers": 4,
        "per_model": {},
    },
    # The whole Fashion-MNIST training and test splits, 3 epochs (docs/RESULTS.md, first table).
    "full": CPU_SETTINGS
    | {
        "max_train_samples": None,
        "max_eval_samples": None,
        "num_train_epochs": 3,
        "per_device_train_batch_size": 128,
        "per_device_eval_batch_size": 500,
        "bn_recalibration_samples": 500,
        "per_model": {"vit": {"patch_size": 7}},
    },
    # Choosing lambda: 10,000 training images, 3 epochs, scored on 2,000 other training images (validation).
    "pilot": CPU_SETTINGS
    | {
        "max_train_samples": 12000,
        "validation_samples": 2000,
        "max_eval_samples": None,
        "num_train_epochs": 3,
        "per_device_train_batch_size": 128,
        "per_device_eval_batch_size": 500,
        "bn_recalibration_samples": 500,
        "per_model": {"vit": {"patch_size": 7}},
    },
    # Seconds on a CPU: checks that the whole path runs (bench/gpu.sh --dry-run); its numbers mean nothing.
    "smoke": CPU_SETTINGS
    | {
        "max_train_samples": 64,
        "max_eval_samples": 50,
        "num_train_epochs": 1,
        "per_device_eval_batch_size": 25,
        "bn_recalibration_samples": 50,
        "per_model": {},
    },
}
# The methods that make the same promise, side by side (docs/RESULTS.md, "Peers"): the pilot's data and schedule.
PROFILES["peers"] = PROFILES["pilot"]
# Investigations (docs/RESULTS.md, "Why"): the same cells with one setting changed.
VARIANTS = {"e6": {"num_train_epochs": 6}}
MAIN_LAMBDA = 10.0  # the reference measurement's best ResNet-18 value at 3 bits (issue 7), fixed before this grid
SWEEP_LAMBDAS = (1.0, 100.0, 1000.0)
MODELS = ("resnet18", "vit")
FULL_MODELS = ("vit", "resnet18in", "resnet18")  # cheapest first; resnet18 (CIFAR stem) costs 5x resnet18in per image
RECIPE_MODEL = {"resnet18in": "resnet18"}  # grid model -> recipe --model; resnet18in differs by its stem only
# Chosen on the pilot profile (validation split), see docs/RESULTS.md; the sweeps bracket them.
FULL_LAMBDA = {"layer_mean": 10.0, "global_mean": 100.0}
FULL_SWEEP = {"layer_mean": (1.0, 10.0, 100.0), "global_mean": (10.0, 100.0, 1000.0)}
PILOT_SWEEP = {"layer_mean": (1.0, 10.0, 100.0), "global_mean": (10.0, 30.0, 100.0, 300.0, 1000.0)}
# The peers' settings compared (PEERS.md): KURE's lambda on two values around its paper's 1.0; multi-bit QAT on
# {2, 4, 8} (MatQuant's nesting), evaluated at the unseen 3, 5, 6, 7 too; dampening at its default.
KURE_LAMBDAS = (0.1, 1.0)
MULTIBIT_BITS = (2, 4, 8)
DAMPENING_LAMBDA = 10.0
PEER_MODELS = ("vit", "resnet18in")
# Full-data cells of the peer closest to the regularizer at the same cost (same training step, rounding after it).
FULL_PEERS = (("kure", 1.0),)


@dataclass(frozen=True)
class Cell:
    """One training run of the grid: `method` is an osc_method ("none" = FP), `bits` its target bit-width (for
    "multibit_qat" the largest of `MULTIBIT_BITS`, which it trains together)."""

    model: str
    method: str
    bits: int | None
    osc_lambda: float | None
    seed: int
    variant: str = ""  # a key of VARIANTS: settings changed for an investigation, kept out of the main tables
    normalization: str = "layer_mean"  # osc_penalty_normalization of the regularizer's cells

    @property
    def name(self) -> str:
        suffix = f"_{self.variant}" if self.variant else ""
        if self.method == "none":
            return f"{self.model}_fp_s{self.seed}{suffix}"
        if self.method == "qat":
            return f"{self.model}_qat{self.bits}_s{self.seed}{suffix}"
        if self.method == "kure":
            return f"{self.model}_kure_lam{self.osc_lambda:g}_s{self.seed}{suffix}"
        if self.method == "multibit_qat":
            return f"{self.model}_mbqat{''.join(map(str, MULTIBIT_BITS))}_s{self.seed}{suffix}"
        if self.method == "dampening":
            return f"{self.model}_damp{self.bits}_lam{self.osc_lambda:g}_s{self.seed}{suffix}"
        tag = "gm" if self.normalization == "global_mean" else ""
        return f"{self.model}_osc{self.bits}{tag}_lam{self.osc_lambda:g}_s{self.seed}{suffix}"


def grid() -> list[Cell]:
    """Every cell, most important first: 3-bit, then 2 and 4 bits, then the second seed, then the lambda sweep,
    then the investigations (VARIANTS)."""
    cells: list[Cell] = []

    def add(
        model: str, method: str, bits: int | None, seed: int, osc_lambda: float | None = None, variant: str = ""
    ) -> None:
        if method == "oscillation" and osc_lambda is None:
            osc_lambda = MAIN_LAMBDA
        cell = Cell(model, method, bits, osc_lambda, seed, variant)
        if cell not in cells:
            cells.append(cell)

    for seed in (0, 1):
        for model in MODELS:
            add(model, "none", None, seed)
            add(model, "oscillation", 3, seed)
            add(model, "qat", 3, seed)
        for bits in (2, 4):
            for model in MODELS:
                add(model, "oscillation", bits, seed)
                add(model, "qat", bits, seed)
    for osc_lambda in SWEEP_LAMBDAS:
        for model in MODELS:
            add(model, "oscillation", 3, 0, osc_lambda)
    for model in reversed(MODELS):  # the ViT first: a third of ResNet-18's cost per cell
        for method, bits in (("none", None), ("oscillation", 3), ("qat", 3)):
            add(model, method, bits, 0, variant="e6")
    return cells


def full_grid(models: tuple[str, ...] = FULL_MODELS) -> list[Cell]:
    """The `full` profile, most important first: FP, QAT @3 and the regularizer @3 with each normalization at its
    chosen lambda for seeds 0 and 1 (the ViT and the ImageNet-stem ResNet-18, then the CIFAR-stem one), then the 3-bit
    lambda sweeps (seed 0, then seed 1), then the peer that comes closest to the regularizer on the peers profile at
    its cost (KURE, lambda 1; docs/RESULTS.md "Peers") on the ImageNet-stem ResNet-18, seeds 0 and 1."""
    cells: list[Cell] = []
    cheap = [model for model in models if model != "resnet18"]
    for group in (cheap, [model for model in models if model == "resnet18"]):
        for seed in (0, 1):
            for model in group:
                cells += [Cell(model, "none", None, None, seed), Cell(model, "qat", 3, None, seed)]
                cells += [
                    Cell(model, "oscillation", 3, FULL_LAMBDA[norm], seed, normalization=norm)
                    for norm in ("global_mean", "layer_mean")
                ]
    for seed in (0, 1):
        for model in cheap:
            for norm, lambdas in FULL_SWEEP.items():
                cells += [
                    Cell(model, "oscillation", 3, osc_lambda, seed, normalization=norm)
                    for osc_lambda in lambdas
                    if osc_lambda != FULL_LAMBDA[norm]
                ]
    if "resnet18in" in models:
        cells += [
            Cell("resnet18in", method, None, osc_lambda, seed) for method, osc_lambda in FULL_PEERS for seed in (0, 1)
        ]
    return cells


def pilot_grid(models: tuple[str, ...] = ("vit", "resnet18in")) -> list[Cell]:
    """The `pilot` profile: FP, QAT @3 and 3-bit lambda sweeps of both normalizations, seed 0."""
    cells = []
    for model in models:
        cells += [Cell(model, "none", None, None, 0), Cell(model, "qat", 3, None, 0)]
        for norm, lambdas in PILOT_SWEEP.items():
            cells += [Cell(model, "oscillation", 3, osc_lambda, 0, normalization=norm) for osc_lambda in lambdas]
    return cells


def peers_grid(models: tuple[str, ...] = PEER_MODELS) -> list[Cell]:
    """The `peers` profile: FP + PTQ, QAT @3, the regularizer @3 (the package's defaults), KURE at each of
    `KURE_LAMBDAS`, dampening @3 and multi-bit QAT, for seeds 0 then 1; the tiny ViT first (a third of ResNet-18's
    cost), multi-bit QAT last within each (it costs about three QAT runs)."""
    cells = []
    for seed in (0, 1):
        for model in models:
            cells += [
                Cell(model, "none", None, None, seed),
                Cell(model, "oscillation", 3, MAIN_LAMBDA, seed),
                Cell(model, "qat", 3, None, seed),
                *[Cell(model, "kure", None, osc_lambda, seed) for osc_lambda in KURE_LAMBDAS],
                Cell(model, "dampening", 3, DAMPENING_LAMBDA, seed),
                Cell(model, "multibit_qat", max(MULTIBIT_BITS), None, seed),
            ]
    return cells


def profile_grid(profile: str) -> list[Cell]:
    return {"full": full_grid, "pilot": pilot_grid, "peers": peers_grid}.get(profile, grid)()


def results_folder(profile: str) -> Path:
    if profile == "peers":
        return RESULTS_DIR / "peers"
    return RESULTS_DIR / ("quality" if profile == "cpu" else f"quality_{profile}")


def command_for(cell: Cell, profile: str) -> str:
    return f"python bench/quality.py --profile {profile} --only {cell.name}"


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _settings(cell: Cell, profile: str) -> dict:
    settings = {key: value for key, value in PROFILES[profile].items() if key != "per_model"}
    settings |= PROFILES[profile].get("per_model", {}).get(cell.model, {})
    return settings | VARIANTS.get(cell.variant, {})


def _prepare(cell: Cell, data_dir: str | None, work_dir: Path, settings: dict):
    """The recipe arguments, Trainer arguments and data of a cell, as `recipes/train_<model>.py` would build them."""
    from hf_oscq.scripts.data import load_image_dataset
    from hf_oscq.scripts.recipe import RecipeArguments
    from hf_oscq.training.config import OscillationConfig

    recipe = RecipeArguments(
        dataset=settings["dataset"],
        data_dir=data_dir,
        model=RECIPE_MODEL.get(cell.model, cell.model),
        cifar_stem=cell.model != "resnet18in",
        max_train_samples=settings["max_train_samples"],
        max_eval_samples=settings["max_eval_samples"],
        patch_size=settings.get("patch_size"),
        track_oscillations=False,
        export=False,
    )
    method_settings = {"osc_multibit_bits": list(MULTIBIT_BITS)} if cell.method == "multibit_qat" else {}
    if cell.method in ("oscillation", "kure", "dampening"):
        method_settings["osc_lambda"] = cell.osc_lambda
    if cell.method == "oscillation":
        method_settings["osc_penalty_normalization"] = cell.normalization
    training = OscillationConfig(
        output_dir=str(work_dir / cell.name),
        osc_method=cell.method,
        osc_bits=cell.bits or 3,
        **method_settings,
        num_train_epochs=settings["num_train_epochs"],
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        per_device_eval_batch_size=settings["per_device_eval_batch_size"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler_type"],
        optim=settings["optim"],
        weight_decay=settings["weight_decay"],
        eval_strategy="no",
        save_strategy="no",
        logging_steps=8,
        report_to=[],
        seed=cell.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        osc_bn_recalibration_samples=0,
        dataloader_num_workers=settings.get("dataloader_num_workers", 0),
    )
    held_out = settings.get("validation_samples")
    data = load_image_dataset(
        recipe.dataset,
        recipe.data_dir,
        seed=cell.seed,
        max_train_samples=recipe.max_train_samples,
        max_eval_samples=recipe.max_eval_samples,
        validation_fraction=held_out / recipe.max_train_samples if held_out else 0.0,
    )
    if held_out:  # score on images held out of the training split: lambda is chosen on these, never on the test split
        data.eval = data.validation
    return recipe, training, data


def _evaluated_on(recipe, settings: dict, data) -> dict:
    """What a cell's tables were measured on: the dataset's Hub id, the split, the number of images, the metric."""
    from hf_oscq.scripts.data import DATASETS

    held_out = bool(settings.get("validation_samples"))
    return {
        "dataset": DATASETS[recipe.dataset].hub_id or recipe.dataset,
        "split": "train (held out of training)" if held_out else "test",
        "examples": len(data.eval),
        "metric": "top-1 accuracy",
        "tables": {"plain": "plain rounding", "bn": "BatchNorm statistics re-estimated after rounding"},
    }


def _versions() -> dict:
    """The versions of the libraries a cell ran on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("hf_oscq", "torch", "transformers", "accelerate", "timm", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def batchnorm_cross_bit(trainer, data, samples: int) -> dict:
    """The cross-bit test table with BatchNorm statistics re-estimated at every bit-width, full precision included.

    Full precision too: after a short run the running statistics lag behind the weights, and comparing re-estimated
    quantized models against a stale full-precision one would credit rounding with what re-estimation did.
    """
    from hf_oscq import recalibrate_batchnorm
    from hf_oscq.training.metrics import cross_bit_table

    model = trainer.model
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        trainer.args.osc_bn_recalibration_samples = samples
        recalibrate_batchnorm(model, trainer.calibration_batches())  # the images every bit-width re-estimates with
        return cross_bit_table(trainer.evaluate(data.eval, metric_key_prefix="test"))
    finally:
        trainer.args.osc_bn_recalibration_samples = 0
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])


def run_cell(cell: Cell, data_dir: str | None, work_dir: Path, profile: str = "cpu") -> dict:
    """Trains and evaluates one cell with the recipes' pipeline; returns the record written to its JSON."""
    from hf_oscq.quantization.batchnorm import has_batchnorm as model_has_batchnorm
    from hf_oscq.scripts.recipe import train_one

    settings = _settings(cell, profile)
    recipe, training, data = _prepare(cell, data_dir, work_dir, settings)
    start = time.perf_counter()
    trainer, plain = train_one(cell.method, recipe, training, data, Path(training.output_dir))
    train_and_plain_seconds = time.perf_counter() - start
    has_batchnorm = model_has_batchnorm(trainer.model)
    bn, bn_seconds = None, 0.0
    if has_batchnorm:
        start = time.perf_counter()
        bn = batchnorm_cross_bit(trainer, data, settings["bn_recalibration_samples"])
        bn_seconds = time.perf_counter() - start
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    runtime = next((entry["train_runtime"] for entry in trainer.state.log_history if "train_runtime" in entry), None)
    return {
        "cell": asdict(cell) | {"name": cell.name},
        "profile": profile,
        "settings": settings,
        "method_settings": trainer.args.method_settings(),
        "evaluated_on": _evaluated_on(recipe, settings, data),
        "plain": plain,
        "bn": bn,
        "has_batchnorm": has_batchnorm,
        "train_log": losses,
        "seconds": {"train_and_plain_eval": train_and_plain_seconds, "bn_eval": bn_seconds},
        "train_seconds": runtime,
        "train_steps": trainer.state.global_step,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": _versions(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "commit": _git_commit(),
        "command": command_for(cell, profile),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def reestimate_cell(cell: Cell, data_dir: str | None, work_dir: Path, profile: str, record: dict) -> dict:
    """`record` with its BatchNorm table measured again, with the package's current re-estimation, on the trained
    model the cell saved (`<work_dir>/<cell>/training/<method>`): for cells that finished before a change to the
    re-estimation. The previous table stays in `bn_reestimated["previous"]`.

    Raises:
        SystemExit: when the saved model is missing, or when its full-precision plain accuracy differs from the
            record's (it would not be the model the record measured).
    """
    from hf_oscq.export.folder import auto_class_for
    from hf_oscq.scripts.models import build_image_processor
    from hf_oscq.scripts.recipe import run_arguments
    from hf_oscq.training.metrics import compute_accuracy
    from hf_oscq.training.trainer import OscillationTrainer

    settings = _settings(cell, profile)
    if settings != record["settings"] or not record["has_batchnorm"]:
        raise SystemExit(
            f"{cell.name}: its record has other settings or no BatchNorm table; run the cell again instead."
        )
    recipe, training, data = _prepare(cell, data_dir, work_dir, settings)
    args = run_arguments(training, Path(training.output_dir), cell.method)
    folder = Path(args.output_dir)
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"{cell.name}: no trained model in {folder}; run the cell again instead.")
    model = auto_class_for(folder).from_pretrained(folder)
    eval_bits = sorted(set(args.osc_eval_bits) | set(recipe.export_bits))  # as train_one evaluates
    args.osc_eval_bits = []  # first the full-precision plain accuracy alone
    trainer = OscillationTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        compute_metrics=compute_accuracy,
        processing_class=build_image_processor(data.info),
    )
    start = time.perf_counter()
    plain_fp, recorded = trainer.evaluate(data.eval, metric_key_prefix="test")["test_accuracy"], record["plain"]["fp"]
    if abs(plain_fp - recorded["accuracy"]) > 1.5 / len(data.eval):  # one image may flip with other arithmetic
        raise SystemExit(
            f"{cell.name}: the saved model scores {plain_fp} at full precision, the record {recorded['accuracy']}: "
            "it is not the model the record measured; run the cell again instead."
        )
    trainer.args.osc_eval_bits = eval_bits
    bn = batchnorm_cross_bit(trainer, data, settings["bn_recalibration_samples"])
    return record | {
        "bn": bn,
        "bn_reestimated": {
            "previous": record.get("bn_reestimated", {}).get("previous", record["bn"]),  # the table it ran with
            "seconds": time.perf_counter() - start,
            "commit": _git_commit(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch_threads": torch.get_num_threads(),
        },
    }


def _write_record(path: Path, record: dict) -> None:
    """Writes a cell's JSON in one step (a reader never sees half of it)."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, path)


def _claim(lock: Path) -> bool:
    """Creates `lock` atomically; a lock whose process has died is taken over."""
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return _claim(lock)
        except PermissionError:
            return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="Run these cells (names from --list) only.")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=sorted({*MODELS, *FULL_MODELS}),
        help="Models to run, in this order (a second worker can start with the other model).",
    )
    parser.add_argument("--list", action="store_true", help="Print the grid in priority order and exit.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--data_dir", default=None, help="Folder of the Fashion-MNIST IDX files (default: Debian's).")
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="Data size and schedule.")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="Where the per-cell JSON files go (default: bench/results/quality[_<profile>]).",
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=Path("outputs/bench_quality"),
        help="Training folders (model weights, Trainer state); not committed.",
    )
    parser.add_argument("--max_cells", type=int, default=None, help="Stop after this many cells.")
    parser.add_argument(
        "--reestimate",
        action="store_true",
        help="For finished cells (with --only): measure the BatchNorm table again on the saved trained model with "
        "the current re-estimation, keeping the previous one in the JSON.",
    )
    args = parser.parse_args(argv)
    args.models = args.models or list(
        PEER_MODELS if args.profile == "peers" else FULL_MODELS if args.profile in ("full", "pilot") else MODELS
    )
    from hf_oscq.errors import configure_logging

    configure_logging(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.profile in ("full", "pilot", "peers"):
        cells = [cell for cell in profile_grid(args.profile) if cell.model in args.models]
    else:
        cells = sorted(
            (cell for cell in grid() if cell.model in args.models), key=lambda c: args.models.index(c.model)
        )
    if args.only:
        known = {cell.name: cell for cell in profile_grid(args.profile)}
        unknown = sorted(set(args.only) - set(known))
        if unknown:
            raise SystemExit(f"Unknown cells {unknown}; see `python bench/quality.py --list`.")
        cells = [known[name] for name in args.only]
    args.results = args.results or results_folder(args.profile)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.list:
        for index, cell in enumerate(cells):
            done = "done" if (args.results / f"{cell.name}.json").exists() else "-"
            sys.stdout.write(f"{index:3d} {done:5s} {cell.name}\n")
        return 0
    if args.reestimate:
        if not args.only:
            raise SystemExit("--reestimate needs --only CELL...: the finished cells to measure again.")
        for cell in cells:
            result_path = args.results / f"{cell.name}.json"
            if not result_path.exists():
                raise SystemExit(f"{cell.name} has not finished: run it instead of re-estimating it.")
            record = reestimate_cell(
                cell, args.data_dir, args.work_dir / args.profile, args.profile, json.loads(result_path.read_text())
            )
            _write_record(result_path, record)
            sys.stdout.write(f"== {cell.name} re-estimated in {record['bn_reestimated']['seconds']:.0f} s\n")
        return 0
    ran = 0
    for cell in cells:
        result_path = args.results / f"{cell.name}.json"
        lock = args.results / f"{cell.name}.lock"
        if result_path.exists() or not _claim(lock):
            continue
        try:
            if result_path.exists():  # finished by another worker between the check and the claim
                continue
            sys.stdout.write(f"== {cell.name}: {shlex.join(sys.argv)}\n")
            sys.stdout.flush()
            record = run_cell(cell, args.data_dir, args.work_dir / args.profile, args.profile)
            _write_record(result_path, record)
            sys.stdout.write(f"== {cell.name} done in {sum(record['seconds'].values()):.0f} s\n")
            sys.stdout.flush()
        finally:
            lock.unlink(missing_ok=True)
        ran += 1
        if args.max_cells is not None and ran >= args.max_cells:
            break
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("quality.py", main))
