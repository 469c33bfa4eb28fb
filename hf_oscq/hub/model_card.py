"""Model cards for an export folder: one per variant (`fp`, `w2`, ...), rendered from `templates/model_card.md`.

Everything on a card comes from the export folder (`card_facts.py`): `oscq_export.json` (cross-bit accuracy, training
recipe, QAT / plain PTQ comparisons, sizes, versions), the variants' `config.json` and the full-precision weights
(histogram).
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import OscqValueError
from ..export.folder import export_format, export_spec, read_export_manifest, table_provenance, variants
from ..export.formats import COMPRESSED_TENSORS_FORMAT, OSCQ_FORMAT
from ..paper import CITATION
from ..paths import child_path
from ..provenance import METRIC_NAMES, describe, metric_label, sentence
from ..quantization.ptq import format_cross_bit_table
from ..quantization.variants import FULL_PRECISION, variant_bits, variant_repo_id, variant_title
from ..training.methods import method_sentence, trained_how
from ..versions import BUILD_WHEEL, INSTALL_COMMAND, INSTALL_FROM_CLONE
from . import ACCURACY_PLOT, DEFAULT_LICENSE, HISTOGRAM_PLOT
from .card_facts import (
    ExportFacts,
    comparison_tables,
    export_facts,
    format_size,
    headline_metric,
    histogram_bits,
    measured_groups,
    metric_text,
    variant_size,
)
from .repo_ids import check_repo_id

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "templates" / "model_card.md"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"  # transformers.utils.IMAGE_PROCESSOR_NAME
_RECIPE_KEYS = {
    "osc_method": "method",
    "osc_bits": "target bit-width",
    "osc_lambda": "osc_lambda (penalty weight)",
    "dataset": "dataset",
    "model": "model",
}
_SETTING_LABELS = {
    "num_train_epochs": "epochs",
    "train_batch_size": "batch size (all processes)",
    "per_device_train_batch_size": "batch size per device",
    "pretrained": "started from ImageNet weights",
}
# The card's "Format" row, by the export's format.
FORMAT_TEXTS = {
    OSCQ_FORMAT: "hf_oscq bit-packed codes and scales (loads in transformers after `import hf_oscq`)",
    COMPRESSED_TENSORS_FORMAT: (
        "compressed-tensors `pack-quantized` (loads in transformers with the compressed-tensors package, and in vLLM, "
        "without hf_oscq)"
    ),
}
# A Hub dataset id: ORG/NAME.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _versions(manifest: dict) -> str | None:
    versions = manifest.get("versions") or {}
    return ", ".join(f"{name} {version}" for name, version in versions.items()) or None


def _link(repo_id: str | None, label: str) -> str:
    return f"[{repo_id}](https://huggingface.co/{repo_id})" if repo_id else f"`{label}`"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def readable_setting(value: Any) -> str:
    """A recorded setting as a person reads it: enums by their value (`OptimizerNames.ADAMW_TORCH`, as older
    exports stored it, -> `adamw_torch`), yes / no, numbers without float noise."""
    value = getattr(value, "value", value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and (enum := re.fullmatch(r"[A-Z]\w*Names?\.(\w+)", value)):
        return enum.group(1).lower()
    return str(value)


def _recipe(manifest: dict) -> tuple[str, str, str | None]:
    training = manifest["training"]
    if not training:
        return "No training record was stored with this export.", "", None
    rows = [(label, training[key]) for key, label in _RECIPE_KEYS.items() if key in training]
    settings = training.get("hyperparameters") or {}
    rows += [(_SETTING_LABELS.get(key, key.replace("_", " ")), value) for key, value in settings.items()]
    # the epochs only where they set the length of the run: a positive max_steps overrides them
    steps = settings.get("max_steps")
    by_steps = isinstance(steps, int) and steps > 0
    rows = [
        (label, value)
        for label, value in rows
        if not (label == "max steps" and not by_steps) and not (label == "epochs" and by_steps)
    ]
    # the split's plumbing (for `hf-oscq export`): the card already gives the training image count
    skip = set(_RECIPE_KEYS) | {"hyperparameters", "command", "dataset_id", "max_train_samples", "validation_fraction"}
    skip.add("quant_spec")  # the run's spec, which `hf-oscq export` reads; the card states the export's own
    rows += [(key, value) for key, value in training.items() if key not in skip]
    rows = [(label, readable_setting(value)) for label, value in rows]
    table = "\n".join(["| setting | value |", "|---|---|"] + [f"| {key} | {_cell(value)} |" for key, value in rows])
    intro = method_sentence(training)
    return intro, table, training.get("command")


def hub_dataset_id(manifest: dict) -> str | None:
    """The Hub id (`ORG/NAME`) of the training dataset, or `None` when it has none (scikit-learn's digits, a local
    copy): only Hub ids go into the card's `datasets:` metadata, which the Hub links."""
    training = manifest["training"] or {}
    for candidate in (training.get("dataset_id"), training.get("dataset")):
        if isinstance(candidate, str) and _HUB_ID.fullmatch(candidate):
            return candidate
    return None


def _dataset_text(manifest: dict) -> str | None:
    name, hub_id = (manifest["training"] or {}).get("dataset"), hub_dataset_id(manifest)
    if hub_id:
        return f"[{name if name and name != hub_id else hub_id}](https://huggingface.co/datasets/{hub_id})"
    return name


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _evaluated_on(manifest: dict, text_generation: bool) -> str:
    """What the card's cross-bit table was measured on, as a sentence (its provenance, and how it was measured)."""
    recorded = table_provenance(manifest, "metrics")
    if recorded is None:
        return (
            "What these numbers were measured on (dataset, split, number of examples, BatchNorm handling) was not "
            "recorded with this export."
        )
    how = ""
    if (manifest.get("evaluation") or {}).get("by") == "hf-oscq eval":
        prepared = (
            "tokenizing the text with its own saved tokenizer"
            if text_generation
            else ("preparing the images with its own saved image processor")
        )
        how = f" Measured with `hf-oscq eval`, each checkpoint {prepared}."
    return f"{sentence(recorded.describe())}.{how}"


def _other_tables(manifest: dict) -> list[dict[str, str]]:
    """The tables measured otherwise than this model's (`measured_groups` after the first), each with its caption."""
    groups = measured_groups(manifest)
    others = groups[1:] if manifest["metrics"] else groups
    return [
        {
            "caption": f"{sentence(describe(provenance, headline_metric(manifest)))}. Not the evaluation of the "
            "table above, so not set next to it.",
            "table": format_cross_bit_table(tables, provenance.metric if provenance else headline_metric(manifest)),
        }
        for provenance, tables in others
    ]


def _summary(manifest: dict, variant: str, parent: str) -> str:
    training = manifest["training"] or {}
    dataset = f" on {_dataset_text(manifest)}" if training.get("dataset") else ""
    if training.get("train_samples"):
        dataset += f" ({training['train_samples']:,} training images)"
    how = trained_how(training.get("osc_method"))
    trained = f"{training.get('model', 'model')} trained{dataset} {how}"
    bits = variant_bits(variant)
    if bits is None:
        return (
            f"Full-precision weights of a {trained}. The quantized versions below are these weights rounded after "
            "training: weight-only post-training quantization, activations in float."
        )
    return (
        f"A {trained}, with its weights rounded to {bits} bits after training: the {bits}-bit "
        f"weight-only post-training quantization of {parent}. Activations stay in float."
    )


def _eval_results(manifest: dict, variant: str, task: str | None, model_name: str) -> list[EvalResult]:
    metric = headline_metric(manifest)
    value = ((manifest["metrics"] or {}).get(variant) or {}).get(metric)
    recorded = table_provenance(manifest, "metrics")
    if value is None or recorded is None:  # the model index only carries numbers whose data is recorded
        return []
    dataset = recorded.dataset or "unnamed"
    name = "full precision" if variant == FULL_PRECISION else f"{variant_bits(variant)}-bit PTQ"
    return [
        EvalResult(
            task_type=task or "other",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=recorded.split or "unrecorded",
            metric_type=metric,
            metric_value=float(value),
            metric_name=f"{sentence(METRIC_NAMES.get(metric, metric))} ({name})",
        )
    ]


def _variants_table(export_dir: Path, manifest: dict, variant: str, repo_id: str | None) -> str:
    metric = headline_metric(manifest)
    lines = [f"| model | weights | {METRIC_NAMES.get(metric, metric)} | size on disk |", "|---|---|---|---|"]
    for other in variants(manifest):
        name = _link(repo_id and variant_repo_id(repo_id, other), other) + (" (this page)" if other == variant else "")
        size = format_size(variant_size(export_dir, manifest, other))
        lines.append(f"| {name} | {variant_title(other)} | {metric_text(manifest, other)} | {size} |")
    return "\n".join(lines)


def rounding_sentence(manifest: dict) -> str:
    """How the quantized versions were made from the full-precision weights, BatchNorm included."""
    if manifest.get("bn_recalibrated"):
        samples = (manifest.get("bn_recalibration") or {}).get("samples")
        images = f"{samples:,} training images" if samples else "training images"
        return (
            f"post-training rounding of the same full-precision weights, then BatchNorm re-estimation on {images} "
            "(the running statistics of the rounded network)"
        )
    if manifest.get("has_batchnorm"):
        return (
            "plain post-training rounding of the same full-precision weights (the paper's PTQ); the model's "
            "BatchNorm statistics were not re-estimated after rounding, which costs accuracy at low bit-widths"
        )
    return "plain post-training rounding of the same full-precision weights"


def _processor_needs_hf_oscq(folder: Path) -> bool:
    """Whether the image processor saved in `folder` is hf_oscq's `OscqImageProcessor` (which `import hf_oscq`
    registers with transformers)."""
    try:
        saved = json.loads((folder / IMAGE_PROCESSOR_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("image_processor_type") == "OscqImageProcessor"


def _import_line(stored_as: str, processor_needs_hf_oscq: bool) -> str | None:
    """The `import hf_oscq` line of the card's code, with why it is needed; `None` where nothing needs hf_oscq."""
    if stored_as == OSCQ_FORMAT:
        return 'import hf_oscq  # registers the "oscq" quantization format with transformers'
    if processor_needs_hf_oscq:
        return "import hf_oscq  # registers OscqImageProcessor, the image processor saved with this model"
    return None


def _size_text(export_dir: Path, manifest: dict, variant: str) -> str:
    size = variant_size(export_dir, manifest, variant)
    if variant == FULL_PRECISION:
        return format_size(size)
    full = variant_size(export_dir, manifest, FULL_PRECISION)
    if full / size < 1.05:
        return f"{format_size(size)} (full precision: {format_size(full)})"
    return f"{format_size(size)}, {full / size:.1f}x smaller than the full-precision {format_size(full)}"


def render_model_card(
    export_dir: str | Path,
    variant: str = FULL_PRECISION,
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
    return _render_model_card(export_dir, variant, repo_id, license, export_facts(export_dir, manifest))


def _render_model_card(
    export_dir: Path, variant: str, repo_id: str | None, license: str, facts: ExportFacts
) -> ModelCard:
    manifest, task = facts.manifest, facts.task
    if variant not in variants(manifest):
        raise OscqValueError(f"Unknown variant {variant!r}: this export has {variants(manifest)}.")
    training = manifest["training"] or {}
    quantized = variant != FULL_PRECISION
    bits = variant_bits(variant)
    spec = export_spec(manifest, histogram_bits(manifest, variant))
    own_id = repo_id and variant_repo_id(repo_id, variant)
    model_name = own_id.split("/")[-1] if own_id else f"{export_dir.name}-{variant}" if quantized else export_dir.name
    stored_as = export_format(manifest)
    compressed_tensors = quantized and stored_as == COMPRESSED_TENSORS_FORMAT
    tags = ["hf_oscq", "oscq", "quantization", f"{bits}-bit" if quantized else "full-precision"]
    tags += [COMPRESSED_TENSORS_FORMAT] if compressed_tensors else []
    processor_needs_hf_oscq = _processor_needs_hf_oscq(export_dir / variant)
    hub_id = hub_dataset_id(manifest)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        license=license,
        model_name=model_name,
        tags=tags,
        datasets=[hub_id] if hub_id else None,
        eval_results=_eval_results(manifest, variant, task, model_name) or None,
    )
    if quantized and repo_id:
        data.base_model, data.base_model_relation = repo_id, "quantized"
    elif not quantized and training.get("base_model"):
        data.base_model, data.base_model_relation = training["base_model"], "finetune"
    modules = facts.modules
    shown = ", ".join(f"`{m}`" for m in modules[:4]) + (f", ... ({len(modules)} layers)" if len(modules) > 4 else "")
    tables = comparison_tables(manifest)
    metric = headline_metric(manifest)
    intro, recipe_table, command = _recipe(manifest)
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        title=model_name,
        summary=_summary(manifest, variant, _link(repo_id, FULL_PRECISION)),
        is_quantized=quantized,
        compressed_tensors=compressed_tensors,
        quantized_format=stored_as,
        format_text=FORMAT_TEXTS[stored_as],
        import_line=_import_line(stored_as, processor_needs_hf_oscq),
        processor_needs_hf_oscq=processor_needs_hf_oscq,
        # vLLM's compressed-tensors weight-only kernels take 4 and 8 bits, per channel or group-wise
        vllm=compressed_tensors and task == "text-generation" and bits in (4, 8) and not spec.per_tensor,
        parent=_link(repo_id, FULL_PRECISION),
        bits=bits,
        levels=2 * spec.max_code + 1 if quantized else None,
        granularity=spec.describe_granularity,
        rounding=rounding_sentence(manifest),
        modules=shown or "(none recorded)",
        metric=metric,
        metric_label=metric_label(metric),
        metric_name=METRIC_NAMES.get(metric, metric),
        own_accuracy=metric_text(manifest, variant),
        own_size=_size_text(export_dir, manifest, variant),
        variants_table=_variants_table(export_dir, manifest, variant, repo_id),
        cross_bit_table=format_cross_bit_table({"this model": manifest["metrics"]}, metric)
        if manifest["metrics"]
        else "No evaluation was recorded with this export.",
        comparison_table=format_cross_bit_table(tables, metric) if len(tables) > 1 else None,
        other_tables=_other_tables(manifest),
        text_generation=task == "text-generation",
        osc_bits=training.get("osc_bits", "the target"),
        accuracy_plot=ACCURACY_PLOT if manifest["metrics"] else None,
        histogram_plot=HISTOGRAM_PLOT,
        histogram_layer=facts.histogram[0],
        histogram_bits=spec.bits,
        auto_class=facts.auto_class,
        task=task,
        load_id=own_id or f"path/to/{export_dir.name}/{variant}",
        # `pipeline` needs the saved image processor; without one the card shows `from_pretrained` only.
        pipeline_task=task if (export_dir / variant / IMAGE_PROCESSOR_FILE).is_file() else None,
        recipe_intro=intro,
        recipe_table=recipe_table,
        command=command,
        versions=_versions(manifest),
        install=INSTALL_COMMAND,
        evaluated_on=_evaluated_on(manifest, task == "text-generation"),
        image_mode=facts.image_mode,
        install_from_clone=INSTALL_FROM_CLONE,
        build_wheel=BUILD_WHEEL,
        citation=CITATION,
    )


def render_card_files(
    export_dir: str | Path,
    variant: str,
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    manifest: dict | None = None,
) -> dict[str, bytes]:
    """The files of a variant's card, in memory: `{"README.md": ..., "oscq_weight_histogram.png": ..., ...}`.

    Same arguments as `render_model_card`. Nothing is written to disk; the bytes are deterministic, so rendering
    twice gives identical files.
    """
    export_dir = Path(export_dir)
    return _render_card_files(export_dir, variant, repo_id, license, export_facts(export_dir, manifest))


def render_all_card_files(
    export_dir: str | Path, repo_id: str | None = None, license: str = DEFAULT_LICENSE, manifest: dict | None = None
) -> dict[str, dict[str, bytes]]:
    """`{variant: render_card_files(...)}` for every variant, parent first, reading the export folder only once.

    Same arguments as `render_model_card`, without `variant`.
    """
    export_dir = Path(export_dir)
    facts = export_facts(export_dir, manifest)
    return {v: _render_card_files(export_dir, v, repo_id, license, facts) for v in variants(facts.manifest)}


def _render_card_files(
    export_dir: Path, variant: str, repo_id: str | None, license: str, facts: ExportFacts
) -> dict[str, bytes]:
    manifest = facts.manifest
    from ..plots import plot_accuracy_vs_bits, plot_weight_histogram

    card = _render_model_card(export_dir, variant, repo_id, license, facts)
    files = {"README.md": str(card).encode()}
    if manifest["metrics"]:
        buffer = io.BytesIO()
        highlight = variant_bits(variant)
        plot_accuracy_vs_bits(
            comparison_tables(manifest),
            buffer,
            metric=headline_metric(manifest),
            highlight_bits=highlight,
            title=card.data.model_name,
        )
        files[ACCURACY_PLOT] = buffer.getvalue()
    buffer = io.BytesIO()
    layer, weight = facts.histogram
    plot_weight_histogram(
        weight,
        path=buffer,
        title=layer,
        spec=export_spec(manifest, histogram_bits(manifest, variant)),
        out_dim=facts.histogram_out_dim,
    )
    files[HISTOGRAM_PLOT] = buffer.getvalue()
    return files


def write_model_cards(
    export_dir: str | Path,
    repo_id: str | None = None,
    output_dir: str | Path | None = None,
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

    Raises:
        OscqValueError: for a `repo_id` that is not a valid Hub id `ORG/NAME` (e.g. `me/..`), so no card lands
            outside `output_dir`.
    """
    export_dir = Path(export_dir)
    manifest = read_export_manifest(export_dir)
    if repo_id is not None:
        check_repo_id(repo_id, variants(manifest))
    rendered = render_all_card_files(export_dir, repo_id, license, manifest)
    written = []
    for variant, files in rendered.items():
        if output_dir is None:
            folder = child_path(export_dir, variant)
        else:
            name = variant_repo_id(repo_id, variant).split("/")[-1] if repo_id else f"{export_dir.name}-{variant}"
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            folder = child_path(output_dir, name)
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            child_path(folder, name).write_bytes(content)
        written.append(folder / "README.md")
        logger.info("Model card for %s written to %s", variant, folder / "README.md")
    return written
