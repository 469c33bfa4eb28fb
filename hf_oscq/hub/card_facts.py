"""What the model cards of an export say, read from its folder: accuracies and sizes per variant, the comparison
tables, the task, the quantized layers and the weight shown in the histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from safetensors import safe_open

from ..errors import OscqValueError
from ..export.checkpoint import read_config
from ..export.folder import export_format, folder_size, read_export_manifest, table_provenance, task_for, weight_files
from ..export.formats import COMPRESSED_TENSORS_FORMAT
from ..provenance import Provenance, group_by_provenance, metric_of
from ..quantization.variants import FULL_PRECISION, variant_bits, variant_name
from ..training.methods import DEFAULT_METHOD, run_label


def format_size(num_bytes: int) -> str:
    """`12345678` -> `"12.3 MB"` (decimal units, as the Hub shows them)."""
    size = float(num_bytes)
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def variant_accuracy(manifest: dict, variant: str) -> float | None:
    """The test accuracy of `variant` recorded in the manifest's `metrics`, or `None` when none was measured."""
    return ((manifest["metrics"] or {}).get(variant) or {}).get("accuracy")


def percent(manifest: dict, variant: str) -> str:
    value = variant_accuracy(manifest, variant)
    return "not measured" if value is None else f"{100 * value:.1f} %"


def headline_metric(manifest: dict) -> str:
    """The metric the cards report: `"perplexity"` for a language model's export, else `"accuracy"`."""
    recorded = table_provenance(manifest, "metrics")
    return recorded.metric if recorded is not None else metric_of(manifest["metrics"] or {})


def metric_text(manifest: dict, variant: str) -> str:
    """The headline metric of `variant` as shown on the cards: `"91.2 %"` accuracy or `"12.34"` perplexity."""
    if headline_metric(manifest) == "accuracy":
        return percent(manifest, variant)
    value = ((manifest["metrics"] or {}).get(variant) or {}).get("perplexity")
    return "not measured" if value is None else f"{value:.2f}"


def variant_size(export_dir: Path, manifest: dict, variant: str) -> int:
    return int((manifest.get("sizes_bytes") or {}).get(variant) or folder_size(export_dir / variant))


def measured_groups(manifest: dict) -> list[tuple[Provenance | None, dict[str, dict]]]:
    """The export's tables grouped by what they were measured on (`provenance.group_by_provenance`): `[(provenance,
    {row label: cross-bit table}), ...]`, this export's model first; a table whose provenance was not recorded, or
    differs, is a group of its own."""
    method = (manifest["training"] or {}).get("osc_method", DEFAULT_METHOD)
    entries = []
    if manifest["metrics"]:
        own = table_provenance(manifest, "metrics")
        entries.append((f"{run_label(method)} (this model)", manifest["metrics"], own))
    measured = table_provenance(manifest, "comparisons")
    entries += [(run_label(key), table, measured) for key, table in (manifest["comparisons"] or {}).items() if table]
    return group_by_provenance(entries)


def comparison_tables(manifest: dict) -> dict[str, dict]:
    """`{row label: cross-bit table}`: this export's model first, then the QAT / plain PTQ comparisons measured as it
    was (the ones a table or plot may set next to it)."""
    groups = measured_groups(manifest)
    return groups[0][1] if groups and manifest["metrics"] else {}


def histogram_bits(manifest: dict, variant: str) -> int:
    """The bit-width whose grid a variant's histogram shows: its own, or for `fp` the training target."""
    if variant != FULL_PRECISION:
        return variant_bits(variant)
    target = (manifest["training"] or {}).get("osc_bits")
    return target if target in manifest["bits"] else manifest["bits"][0]


def quantized_modules(export_dir: Path, manifest: dict) -> list[str]:
    """The quantized modules of an export: its `quantization_config`'s `modules` in hf_oscq's format, the modules
    stored packed in the compressed-tensors format (whose config names module types and ignored modules instead)."""
    folder = export_dir / variant_name(manifest["bits"][0])
    if export_format(manifest) == COMPRESSED_TENSORS_FORMAT:
        from ..export.compressed_tensors_folder import packed_modules

        return packed_modules(folder)
    return list(read_config(folder)["quantization_config"].get("modules") or [])


def histogram_layer(export_dir: str | Path, manifest: dict) -> tuple[str, Any]:
    """The first quantized layer's full-precision weight: `(parameter name, tensor)`, read from `fp/` safetensors."""
    export_dir = Path(export_dir)
    return _histogram_layer(export_dir, quantized_modules(export_dir, manifest))


def _histogram_layer(export_dir: Path, modules: list[str]) -> tuple[str, Any]:
    names = [m if m.endswith(".weight") else f"{m}.weight" for m in modules]
    for path in weight_files(export_dir / FULL_PRECISION):
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
            for name in [n for n in names if n in keys] or [k for k in keys if k.endswith(".weight")]:
                tensor = weights.get_tensor(name)
                if tensor.dim() >= 2:
                    return name, tensor
    raise OscqValueError(f"No 2-D weight found in {export_dir / FULL_PRECISION} to draw the weight histogram from.")


class ExportFacts(NamedTuple):
    """What every card of one export shares, read from its folder once."""

    manifest: dict
    task: str | None
    auto_class: str
    modules: list[str]
    histogram: tuple[str, Any]  # (parameter name, full-precision weight), see `histogram_layer`
    histogram_out_dim: int  # that weight's output-channel dimension (1 for GPT-2's Conv1D)
    image_mode: str = "RGB"  # the PIL mode of the model's input images: "L" for one channel


def image_mode(config: dict) -> str:
    """`"L"` for a model taking one-channel images (`num_channels`, or timm's `in_chans`), else `"RGB"`."""
    channels = config.get("num_channels") or (config.get("model_args") or {}).get("in_chans") or 3
    return "L" if channels == 1 else "RGB"


def export_facts(export_dir: Path, manifest: dict | None = None) -> ExportFacts:
    """The facts of an export folder (its manifest is read and checked when not given)."""
    manifest = manifest or read_export_manifest(export_dir)
    modules = quantized_modules(export_dir, manifest)
    config = read_config(export_dir / FULL_PRECISION)
    task, auto_class = task_for(config)
    histogram = _histogram_layer(export_dir, modules)
    return ExportFacts(
        manifest, task, auto_class, modules, histogram, _output_dim(export_dir, histogram[0]), image_mode(config)
    )


def _output_dim(export_dir: Path, parameter: str) -> int:
    """The output-channel dimension of the full-precision model's `parameter` (`selection.output_dim` of its module),
    from the model built on the meta device (no weights allocated); 0 when the model cannot be built."""
    import torch
    from transformers import AutoConfig

    from ..export.folder import auto_class_for
    from ..quantization.selection import output_dim

    folder = export_dir / FULL_PRECISION
    try:
        with torch.device("meta"):
            model = auto_class_for(folder).from_config(AutoConfig.from_pretrained(folder))
        return output_dim(model.get_submodule(parameter.rpartition(".")[0]))
    except (AttributeError, OSError, ValueError, KeyError):
        return 0
