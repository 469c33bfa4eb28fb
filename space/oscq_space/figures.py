"""The Accuracy and Weights tabs: accuracy tables per family, and one layer's weights against the quantization grid."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import torch

from hf_oscq import QuantSpec, max_code, quantize_codes
from hf_oscq.export.folder import export_spec, table_provenance
from hf_oscq.plots import plot_weight_histogram
from hf_oscq.provenance import Provenance, group_by_provenance
from hf_oscq.quantization.selection import output_dim
from hf_oscq.quantization.variants import is_variant, sort_variants, variant_title
from hf_oscq.training.methods import run_label

from .families import Family


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


def family_curves(family: Family, qualify: bool = True) -> list[tuple[str, dict, Provenance | None]]:
    """Every accuracy table of a family with what it was measured on: `[(curve name, cross-bit table,
    provenance), ...]`, its own first, then the baselines it was exported with.

    The family's own table comes from the `metrics` of `oscq_export.json` (its provenance from the manifest), or
    else from its model cards' eval results (provenance not recorded).

    Args:
        family: a loaded family.
        qualify: name the curves after the family (`"QAT (Oscillation · run)"`), not just the method (`"QAT"`);
            needed when several families are plotted together.
    """
    curves = []
    own, measured = family.record.get("metrics"), table_provenance(family.record, "metrics")
    if not own:
        own, measured = {}, None
        for variant in family.variants.values():
            accuracy = _card_accuracy(variant.path)
            if accuracy is not None:
                own[variant.name] = {"accuracy": accuracy}
    if own:
        curves.append((family.name if qualify else family.method, own, measured))
    baselines = table_provenance(family.record, "comparisons")
    for key, table in (family.record.get("comparisons") or {}).items():
        if table:
            label = run_label(key, short=True)
            curves.append((f"{label} ({family.name})" if qualify else label, table, baselines))
    return curves


def family_tables(family: Family, qualify: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """The family's accuracy tables that may be plotted together (`family_curves` measured as its own table was):
    `{curve_name: {"fp": {"accuracy": ...}, "w2": {...}, ...}}`; empty when the export carries no accuracy."""
    groups = group_by_provenance(family_curves(family, qualify))
    return groups[0][1] if groups else {}


def accuracy_table(tables: dict[str, dict[str, dict[str, float]]]) -> tuple[list[str], list[list]]:
    """The accuracy tables pivoted: one row per curve, one column per checkpoint (full precision, then 8 ... 2 bits).

    Returns:
        `(headers, rows)`: headers `["run", "full precision", "8 bits", ...]`, rows `[curve, accuracy in % or None,
        ...]` rounded to 0.1; a checkpoint a curve was not measured at is None.
    """
    variants = sort_variants({v for table in tables.values() for v in table if is_variant(v)}, descending=True)
    headers = ["run"] + [variant_title(variant) for variant in variants]
    rows = []
    for curve, table in tables.items():
        values = [table.get(variant, {}).get("accuracy") for variant in variants]
        rows.append([curve] + [None if value is None else round(100 * value, 1) for value in values])
    return headers, rows


def layer_weight(family: Family, layer: str) -> torch.Tensor:
    """The full-precision weight `layer` of the family (from the parent model when it loaded)."""
    parameters = dict(family.reference_model.named_parameters())
    if layer not in parameters:
        raise KeyError(f"{family.name} has no weight named {layer!r}; pick one from the list.")
    return parameters[layer].detach().float()


def layer_output_dim(family: Family, layer: str) -> int:
    """The output-channel dimension of the weight `layer` (1 for GPT-2's `Conv1D`), which its scales follow."""
    return output_dim(family.reference_model.get_submodule(layer.rpartition(".")[0]))


def code_counts(codes: torch.Tensor, bits: int) -> dict[int, int]:
    """How many of `codes` fall on each integer code of the `bits`-bit grid; codes nothing falls on count 0."""
    values, counts = torch.unique(codes.to(torch.int64), return_counts=True)
    occupancy = dict.fromkeys(range(-max_code(bits), max_code(bits) + 1), 0)
    occupancy.update({int(v): int(c) for v, c in zip(values, counts, strict=True)})
    return occupancy


def family_spec(family: Family, bits: int) -> QuantSpec:
    """The spec the family's `w{bits}` checkpoint was quantized with."""
    return export_spec(family.record, bits)


def level_counts(family: Family, layer: str, bits: int) -> dict[int, int]:
    """How many weights of `layer` fall on each integer code when rounded at `bits` bits (the export's quantizer)."""
    out_dim = layer_output_dim(family, layer)
    codes, _ = quantize_codes(layer_weight(family, layer), spec=family_spec(family, bits), out_dim=out_dim)
    return code_counts(codes, bits)


def write_weight_plot(
    weight: torch.Tensor, spec: QuantSpec, layer: str, path: Path | BinaryIO, out_dim: int = 0
) -> None:
    """Histogram of the full-precision `weight` (named `layer`) with the grid of `spec` (levels and rounding
    thresholds), written as a PNG to `path`: `hf_oscq.plots`' weight histogram, as on the model cards.

    With per-channel (group-wise) scales the weights are drawn in units of their channel's (group's) scale, so one
    grid fits all; `out_dim` is the weight's output-channel dimension.
    """
    plot_weight_histogram(
        weight,
        path=path,
        spec=spec,
        out_dim=out_dim,
        show_levels=True,
        bins=min(200, max(30, weight.numel() // 20)),
        dpi=100,
        title=f"{layer.removesuffix('.weight')}: {spec.bits}-bit grid, {2 * spec.max_code + 1} levels",
    )
