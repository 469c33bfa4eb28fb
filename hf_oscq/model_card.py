"""Model cards for an export folder: one per variant (`fp`, `w2`, ...), rendered from `templates/model_card.md`.

Everything on a card comes from the export folder: `oscq_export.json` (cross-bit accuracy, training recipe,
QAT / plain PTQ comparisons, sizes), the variants' `config.json` and the full-precision weights (histogram).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from .checkpoint_format import read_config
from .export_manifest import folder_size, read_export_manifest, variants, weight_files
from .plots import plot_accuracy_vs_bits, plot_weight_histogram
from .ptq import format_cross_bit_table
from .quantizer import max_code

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
DEFAULT_LICENSE = "apache-2.0"
ACCURACY_PLOT = "oscq_accuracy_vs_bits.png"
HISTOGRAM_PLOT = "oscq_weight_histogram.png"
CITATION = """@article{wenshoj2025oscillations,
  title   = {Oscillations Make Neural Networks Robust to Quantization},
  author  = {Wensh{\\o}j, Jonathan and Pepin, Bob and Selvan, Raghavendra},
  journal = {Transactions on Machine Learning Research},
  year    = {2025},
  url     = {https://arxiv.org/abs/2502.00490}
}"""
PAPER = (
    "[*Oscillations Make Neural Networks Robust to Quantization*](https://arxiv.org/abs/2502.00490) "
    "(Wenshøj, Pepin, Selvan; TMLR 2025)"
)
# Row labels of the comparison table, by training method / comparison key.
RUN_LABELS = {"oscillation": "oscillation regularizer", "qat": "QAT", "none": "FP + PTQ", "fp_ptq": "FP + PTQ"}
_TASKS = {  # architecture suffix -> (pipeline tag, Auto class)
    "ForImageClassification": ("image-classification", "AutoModelForImageClassification"),
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "ForCausalLM": ("text-generation", "AutoModelForCausalLM"),
}
_RECIPE_KEYS = {
    "osc_method": "method", "osc_bits": "target bit-width", "osc_lambda": "osc_lambda", "dataset": "dataset",
    "model": "model",
}


def variant_repo_id(repo_id: str, variant: str) -> str:
    """Hub repository of a variant: the parent `ORG/NAME` for `"fp"`, `ORG/NAME-w3` for `"w3"`."""
    return repo_id if variant == "fp" else f"{repo_id}-{variant}"


def format_size(num_bytes: int) -> str:
    """`12345678` -> `"12.3 MB"` (decimal units, as the Hub shows them)."""
    size = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def variant_accuracy(manifest: dict, variant: str) -> float | None:
    """The test accuracy of `variant` recorded in the manifest's `metrics`, or `None` when none was measured."""
    return ((manifest["metrics"] or {}).get(variant) or {}).get("accuracy")


def _percent(manifest: dict, variant: str) -> str:
    value = variant_accuracy(manifest, variant)
    return "not measured" if value is None else f"{100 * value:.1f} %"


def _variant_size(export_dir: Path, manifest: dict, variant: str) -> int:
    return int((manifest.get("sizes_bytes") or {}).get(variant) or folder_size(export_dir / variant))


def _task(export_dir: Path) -> tuple[str | None, str]:
    architectures = read_config(export_dir / "fp").get("architectures") or []
    for suffix, task in _TASKS.items():
        if any(name.endswith(suffix) for name in architectures):
            return task
    return None, "AutoModel"


def _quantized_modules(export_dir: Path, manifest: dict) -> list[str]:
    config = read_config(export_dir / f"w{manifest['bits'][0]}")
    return list(config["quantization_config"].get("modules") or [])


def comparison_tables(manifest: dict) -> dict[str, dict]:
    """`{row label: cross-bit table}`: this export's model first, then its QAT / plain PTQ comparisons."""
    method = (manifest["training"] or {}).get("osc_method", "oscillation")
    tables = {f"{RUN_LABELS.get(method, method)} (this model)": manifest["metrics"]} if manifest["metrics"] else {}
    for key, table in (manifest["comparisons"] or {}).items():
        if table:
            tables[RUN_LABELS.get(key, key)] = table
    return tables


def histogram_layer(export_dir: str | Path, manifest: dict) -> tuple[str, Any]:
    """The first quantized layer's full-precision weight: `(parameter name, tensor)`, read from `fp/` safetensors."""
    export_dir = Path(export_dir)
    return _histogram_layer(export_dir, _quantized_modules(export_dir, manifest))


def _histogram_layer(export_dir: Path, modules: list[str]) -> tuple[str, Any]:
    names = [m if m.endswith(".weight") else f"{m}.weight" for m in modules]
    for path in weight_files(export_dir / "fp"):
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
            for name in [n for n in names if n in keys] or [k for k in keys if k.endswith(".weight")]:
                tensor = weights.get_tensor(name)
                if tensor.dim() >= 2:
                    return name, tensor
    raise ValueError(f"No 2-D weight found in {export_dir / 'fp'} to draw the weight histogram from.")


class _ExportFacts(NamedTuple):
    """What every card of one export shares, read from its folder once."""

    manifest: dict
    task: str | None
    auto_class: str
    modules: list[str]
    histogram: tuple[str, Any]  # (parameter name, full-precision weight), see `histogram_layer`


def _export_facts(export_dir: Path, manifest: dict | None) -> _ExportFacts:
    manifest = manifest or read_export_manifest(export_dir)
    modules = _quantized_modules(export_dir, manifest)
    return _ExportFacts(manifest, *_task(export_dir), modules, _histogram_layer(export_dir, modules))


def _histogram_bits(manifest: dict, variant: str) -> int:
    if variant != "fp":
        return int(variant[1:])
    target = (manifest["training"] or {}).get("osc_bits")
    return target if target in manifest["bits"] else manifest["bits"][0]


def _link(repo_id: str | None, label: str) -> str:
    return f"[{repo_id}](https://huggingface.co/{repo_id})" if repo_id else f"`{label}`"


def _cell(value: Any) -> str:
    return f"`{value}`".replace("|", "\\|")


def _recipe(manifest: dict) -> tuple[str, str, str | None]:
    training = manifest["training"]
    if not training:
        return "No training record was stored with this export.", "", None
    rows = [(label, training[key]) for key, label in _RECIPE_KEYS.items() if key in training]
    rows += [(key, value) for key, value in (training.get("hyperparameters") or {}).items()]
    skip = set(_RECIPE_KEYS) | {"hyperparameters", "command"}
    rows += [(key, value) for key, value in training.items() if key not in skip]
    table = "\n".join(["| setting | value |", "|---|---|"] + [f"| {key} | {_cell(value)} |" for key, value in rows])
    method = training.get("osc_method", "oscillation")
    intro = {
        "oscillation": f"Trained with the oscillation regularizer of {PAPER} at {training.get('osc_bits')} bits "
        f"(`osc_lambda = {training.get('osc_lambda')}`), full-precision forward pass, then rounded after training.",
        "qat": f"Trained with quantization-aware training at {training.get('osc_bits')} bits (baseline of {PAPER}).",
        "none": "Trained in full precision without any quantization term (the FP + PTQ baseline).",
    }.get(method, f"Trained with osc_method={method!r}.")
    return intro, table, training.get("command")


def _summary(manifest: dict, variant: str, parent: str) -> str:
    training = manifest["training"] or {}
    dataset = f" on {training['dataset']}" if training.get("dataset") else ""
    how = {
        "oscillation": f"with the oscillation regularizer of {PAPER}",
        "qat": f"with quantization-aware training (the baseline of {PAPER})",
        "none": f"in full precision without any quantization term (the FP baseline of {PAPER})",
    }.get(training.get("osc_method", "oscillation"), "with hf_oscq")
    trained = f"{training.get('model', 'model')} trained{dataset} {how}"
    if variant == "fp":
        return (
            f"Full-precision weights of a {trained}. The quantized versions below are these weights rounded after "
            "training: weight-only post-training quantization, activations in float."
        )
    return (
        f"A {trained}, with its weights rounded to {variant[1:]} bits after training: the {variant[1:]}-bit "
        f"weight-only post-training quantization of {parent}. Activations stay in float."
    )


def _eval_results(manifest: dict, variant: str, task: str | None, model_name: str) -> list[EvalResult]:
    accuracy = variant_accuracy(manifest, variant)
    if accuracy is None:
        return []
    dataset = (manifest["training"] or {}).get("dataset") or "held-out test set"
    name = "full precision" if variant == "fp" else f"{variant[1:]}-bit PTQ"
    return [
        EvalResult(
            task_type=task or "other", dataset_type=dataset, dataset_name=dataset, dataset_split="test",
            metric_type="accuracy", metric_value=float(accuracy), metric_name=f"Test accuracy ({name})",
        )
    ]


def _variants_table(export_dir: Path, manifest: dict, variant: str, repo_id: str | None) -> str:
    lines = ["| model | weights | test accuracy | size on disk |", "|---|---|---|---|"]
    for other in variants(manifest):
        name = _link(repo_id and variant_repo_id(repo_id, other), other) + (" (this page)" if other == variant else "")
        bits = "full precision" if other == "fp" else f"{other[1:]} bits"
        size = format_size(_variant_size(export_dir, manifest, other))
        lines.append(f"| {name} | {bits} | {_percent(manifest, other)} | {size} |")
    return "\n".join(lines)


def _size_text(export_dir: Path, manifest: dict, variant: str) -> str:
    size = _variant_size(export_dir, manifest, variant)
    if variant == "fp":
        return format_size(size)
    full = _variant_size(export_dir, manifest, "fp")
    if full / size < 1.05:
        return f"{format_size(size)} (full precision: {format_size(full)})"
    return f"{format_size(size)}, {full / size:.1f}x smaller than the full-precision {format_size(full)}"


def render_model_card(
    export_dir: str | Path,
    variant: str = "fp",
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    manifest: dict | None = None,
) -> ModelCard:
    """The model card of one variant of an export folder.

    Args:
        export_dir: the folder `export_quantized` wrote.
        variant: `"fp"` (the parent) or `"w{b}"`.
        repo_id: the parent's Hub id `ORG/NAME`; variants live at `ORG/NAME-w{b}` and declare
            `base_model: ORG/NAME`, `base_model_relation: quantized`. Without it, cards name local folders.
        license: the license identifier for the metadata.
        manifest: the already-read `oscq_export.json` (read and checked from `export_dir` when `None`).

    Returns:
        A `huggingface_hub.ModelCard`; its images are `oscq_accuracy_vs_bits.png` and `oscq_weight_histogram.png`
        next to it (see `render_card_files`).
    """
    export_dir = Path(export_dir)
    return _render_model_card(export_dir, variant, repo_id, license, _export_facts(export_dir, manifest))


def _render_model_card(
    export_dir: Path, variant: str, repo_id: str | None, license: str, facts: _ExportFacts
) -> ModelCard:
    manifest, task = facts.manifest, facts.task
    if variant not in variants(manifest):
        raise ValueError(f"Unknown variant {variant!r}: this export has {variants(manifest)}.")
    training = manifest["training"] or {}
    quantized = variant != "fp"
    own_id = repo_id and variant_repo_id(repo_id, variant)
    model_name = own_id.split("/")[-1] if own_id else f"{export_dir.name}-{variant}" if quantized else export_dir.name
    tags = ["hf_oscq", "oscq", "quantization", f"{variant[1:]}-bit" if quantized else "full-precision"]
    dataset = training.get("dataset")
    data = ModelCardData(
        library_name="transformers", pipeline_tag=task, license=license, model_name=model_name, tags=tags,
        datasets=[dataset] if dataset else None,
        eval_results=_eval_results(manifest, variant, task, model_name) or None,
    )
    if quantized and repo_id:
        data.base_model, data.base_model_relation = repo_id, "quantized"
    elif not quantized and training.get("base_model"):
        data.base_model, data.base_model_relation = training["base_model"], "finetune"
    modules = facts.modules
    shown = ", ".join(f"`{m}`" for m in modules[:4]) + (f", ... ({len(modules)} layers)" if len(modules) > 4 else "")
    tables = comparison_tables(manifest)
    intro, recipe_table, command = _recipe(manifest)
    bits = int(variant[1:]) if quantized else None
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        title=model_name,
        summary=_summary(manifest, variant, _link(repo_id, "fp")),
        is_quantized=quantized,
        parent=_link(repo_id, "fp"),
        bits=bits,
        levels=2 * max_code(bits) + 1 if bits else None,
        per_channel=bool(manifest.get("per_channel")),
        bn_recalibrated=bool(manifest.get("bn_recalibrated")),
        modules=shown or "(none recorded)",
        own_accuracy=_percent(manifest, variant),
        own_size=_size_text(export_dir, manifest, variant),
        variants_table=_variants_table(export_dir, manifest, variant, repo_id),
        cross_bit_table=format_cross_bit_table({"this model": manifest["metrics"]}) if manifest["metrics"] else
        "No evaluation was recorded with this export.",
        comparison_table=format_cross_bit_table(tables) if len(tables) > 1 else None,
        osc_bits=training.get("osc_bits", "the target"),
        accuracy_plot=ACCURACY_PLOT if manifest["metrics"] else None,
        histogram_plot=HISTOGRAM_PLOT,
        histogram_layer=facts.histogram[0],
        histogram_bits=_histogram_bits(manifest, variant),
        auto_class=facts.auto_class,
        load_id=own_id or f"path/to/{export_dir.name}/{variant}",
        recipe_intro=intro,
        recipe_table=recipe_table,
        command=command,
        citation=CITATION,
    )


def render_card_files(
    export_dir: str | Path, variant: str, repo_id: str | None = None, license: str = DEFAULT_LICENSE,
    manifest: dict | None = None,
) -> dict[str, bytes]:
    """The files of a variant's card, in memory: `{"README.md": ..., "oscq_weight_histogram.png": ..., ...}`.

    Same arguments as `render_model_card`. Nothing is written to disk; the bytes are deterministic, so rendering
    twice gives identical files.
    """
    export_dir = Path(export_dir)
    return _render_card_files(export_dir, variant, repo_id, license, _export_facts(export_dir, manifest))


def render_all_card_files(
    export_dir: str | Path, repo_id: str | None = None, license: str = DEFAULT_LICENSE, manifest: dict | None = None
) -> dict[str, dict[str, bytes]]:
    """`{variant: render_card_files(...)}` for every variant, parent first, reading the export folder only once.

    Same arguments as `render_model_card`, without `variant`.
    """
    export_dir = Path(export_dir)
    facts = _export_facts(export_dir, manifest)
    return {v: _render_card_files(export_dir, v, repo_id, license, facts) for v in variants(facts.manifest)}


def _render_card_files(
    export_dir: Path, variant: str, repo_id: str | None, license: str, facts: _ExportFacts
) -> dict[str, bytes]:
    manifest = facts.manifest
    card = _render_model_card(export_dir, variant, repo_id, license, facts)
    files = {"README.md": str(card).encode()}
    if manifest["metrics"]:
        buffer = io.BytesIO()
        bits = None if variant == "fp" else int(variant[1:])
        plot_accuracy_vs_bits(comparison_tables(manifest), buffer, highlight_bits=bits, title=card.data.model_name)
        files[ACCURACY_PLOT] = buffer.getvalue()
    buffer = io.BytesIO()
    layer, weight = facts.histogram
    plot_weight_histogram(weight, _histogram_bits(manifest, variant), buffer, bool(manifest.get("per_channel")), layer)
    files[HISTOGRAM_PLOT] = buffer.getvalue()
    return files


def write_model_cards(
    export_dir: str | Path, repo_id: str | None = None, output_dir: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
) -> list[Path]:
    """Writes every variant's card (README.md and its PNG plots).

    Args:
        export_dir: the folder `export_quantized` wrote.
        repo_id: the parent's Hub id `ORG/NAME` (see `render_model_card`).
        output_dir: `None` writes into `export_dir/fp/`, `export_dir/w2/`, ...; a folder writes to
            `output_dir/<repo name>/` instead (how `model_cards/` in this repository is produced).
        license: the license identifier for the metadata.

    Returns:
        The paths of the README.md files written, parent first.
    """
    export_dir = Path(export_dir)
    rendered = render_all_card_files(export_dir, repo_id, license)
    written = []
    for variant, files in rendered.items():
        if output_dir is None:
            folder = export_dir / variant
        else:
            name = variant_repo_id(repo_id, variant).split("/")[-1] if repo_id else f"{export_dir.name}-{variant}"
            folder = Path(output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (folder / name).write_bytes(content)
        written.append(folder / "README.md")
        logger.info("Model card for %s written to %s", variant, folder / "README.md")
    return written
