"""The Accuracy and Weights tabs: accuracy tables per family, and one layer's weights against the quantization grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_oscq import max_code, quantize_codes
from hf_oscq.plots import quantization_thresholds

from .families import Family

COMPARISON_NAMES = {"qat": "QAT", "fp_ptq": "FP + PTQ"}


def _card_accuracy(folder: Path) -> float | None:
    """The accuracy in a model card's `model-index` eval results, if the card has one."""
    card_path = folder / "README.md"
    if not card_path.is_file():
        return None
    from huggingface_hub import ModelCard

    for result in ModelCard.load(card_path).data.eval_results or []:
        if result.metric_type == "accuracy":
            value = float(result.metric_value)
            return value / 100 if value > 1 else value
    return None


def family_tables(family: Family, qualify: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """Cross-bit accuracy tables of a family: its own, then the baselines it was exported with.

    The family's own table comes from the `metrics` of `oscq_export.json`, or else from its model cards' eval results.

    Args:
        family: a loaded family.
        qualify: name the curves after the family (`"QAT (Oscillation · run)"`), not just the method (`"QAT"`);
            needed when several families are plotted together.

    Returns:
        `{curve_name: {"fp": {"accuracy": ...}, "w2": {...}, ...}}`; empty when the export carries no accuracy.
    """
    tables = {}
    own = family.record.get("metrics")
    if not own:
        own = {}
        for variant in family.variants.values():
            accuracy = _card_accuracy(variant.path)
            if accuracy is not None:
                own[variant.name] = {"accuracy": accuracy}
    if own:
        tables[family.name if qualify else family.method] = own
    for key, table in (family.record.get("comparisons") or {}).items():
        if table:
            label = COMPARISON_NAMES.get(key, key)
            tables[f"{label} ({family.name})" if qualify else label] = table
    return tables


def accuracy_rows(tables: dict[str, dict[str, dict[str, float]]]) -> list[list]:
    """One row per curve and checkpoint: `[curve, variant, bits or None, accuracy in %]`."""
    rows = []
    for curve, table in tables.items():
        for variant in sorted(table, key=lambda name: (name != "fp", -int(name[1:]) if name != "fp" else 0)):
            accuracy = table[variant].get("accuracy")
            if accuracy is not None:
                rows.append([curve, variant, None if variant == "fp" else int(variant[1:]), round(100 * accuracy, 2)])
    return rows


def layer_weight(family: Family, layer: str) -> torch.Tensor:
    """The full-precision weight `layer` of the family (from the parent model when it loaded)."""
    parameters = dict(family.reference_model.named_parameters())
    if layer not in parameters:
        raise KeyError(f"{family.name} has no weight named {layer!r}; pick one from the list.")
    return parameters[layer].detach().float()


def code_counts(codes: torch.Tensor, bits: int) -> dict[int, int]:
    """How many of `codes` fall on each integer code of the `bits`-bit grid; codes nothing falls on count 0."""
    values, counts = torch.unique(codes.to(torch.int64), return_counts=True)
    occupancy = dict.fromkeys(range(-max_code(bits), max_code(bits) + 1), 0)
    occupancy.update({int(v): int(c) for v, c in zip(values, counts, strict=True)})
    return occupancy


def level_counts(family: Family, layer: str, bits: int) -> dict[int, int]:
    """How many weights of `layer` fall on each integer code when rounded at `bits` bits (the export's quantizer)."""
    codes, _ = quantize_codes(layer_weight(family, layer), bits, bool(family.record.get("per_channel", False)))
    return code_counts(codes, bits)


def write_weight_plot(
    weight: torch.Tensor, scale: torch.Tensor, per_channel: bool, layer: str, bits: int, path: Path
) -> None:
    """Histogram of the full-precision `weight` (named `layer`) with the `bits`-bit grid (levels) and rounding
    thresholds, written as a PNG to `path`.

    With per-channel scales the weights are drawn in units of their channel's scale, so one grid fits all.

    Args:
        weight: the full-precision weight (`layer_weight`).
        scale: its scale(s) at `bits` bits, as `quantize_codes` returns them.
        per_channel: whether `scale` holds one scale per output channel.
    """
    top = max_code(bits)
    if per_channel:
        values = (weight / scale.clamp_min(torch.finfo(torch.float32).tiny)).flatten().numpy()
        unit, xlabel = 1.0, "weight / per-channel scale"
    else:
        values, unit = weight.flatten().numpy(), float(scale)
        xlabel = f"weight value (scale s = {unit:.3g})"
    figure = Figure(figsize=(7.0, 3.8))
    axes = figure.subplots()
    axes.hist(values, bins=min(200, max(30, values.size // 20)), color="C0", alpha=0.8, label="full-precision weights")
    for index, level in enumerate(np.arange(-top, top + 1) * unit):
        axes.axvline(level, color="C2", linewidth=1.2, label="quantization levels" if index == 0 else None)
    for index, threshold in enumerate(quantization_thresholds(bits) * unit):
        label = "rounding thresholds" if index == 0 else None
        axes.axvline(threshold, color="C3", linestyle="--", linewidth=0.9, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("number of weights")
    axes.set_title(f"{layer.removesuffix('.weight')}: {bits}-bit grid, {2 * top + 1} levels", fontsize="medium")
    axes.legend(fontsize="small", loc="upper right")
    figure.tight_layout()
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)
