"""The runs of a recipe, shared by the image and language-model recipes and bench/quality.py: each method's Trainer
arguments (its own folder, its own defaults) and its row label in the recipe's table."""

from __future__ import annotations

import re
from pathlib import Path

from ..training.config import OscillationConfig
from ..training.methods import get_method, method_names


def check_baselines(baselines: list[str]) -> None:
    """Checks that every `--baselines` entry names a registered method.

    Raises:
        OscqValueError: naming the unknown entries and the methods there are.
    """
    from ..errors import OscqValueError

    unknown = [method for method in baselines if method not in method_names()]
    if unknown:
        raise OscqValueError(f"--baselines takes osc_methods {method_names()}, got {unknown}.")


def run_arguments(training: OscillationConfig, output_dir: Path, method: str) -> OscillationConfig:
    """The Trainer arguments of one run of a recipe: its own folder `output_dir/training/<method>`, no push (the
    recipe pushes the export). A baseline (a method other than `training.osc_method`) keeps the main run's settings
    but the method's own: its `osc_lambda` default, and the other methods' settings back to theirs. A method selected
    on full-precision accuracy (FP + PTQ, PAPER.md section 4) selects on the full-precision metric where the main run
    selects on a quantized one (`eval_w3_accuracy` -> `accuracy`)."""
    changes = {"output_dir": str(output_dir / "training" / method), "push_to_hub": False}
    metric = training.metric_for_best_model
    quantized_metric = re.fullmatch(r"(?:eval_)?w\d+_(\w+)", metric or "")
    if get_method(method).selects_on_full_precision and quantized_metric:
        changes["metric_for_best_model"] = quantized_metric.group(1)
    if method == training.osc_method:
        import dataclasses

        return dataclasses.replace(training, **changes)
    return training.for_method(method, **changes)


def run_tag(args: OscillationConfig) -> str:
    """The row label of a run in the recipes' tables (`"oscillation regularizer @3"`, `"QAT @3"`, `"FP + PTQ"`,
    `"KURE (lambda 1.0)"`, ...), from its Trainer arguments."""
    return get_method(args.osc_method).tag(args.method_settings())
