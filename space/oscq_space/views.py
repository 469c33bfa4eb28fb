"""What each button of the page returns: plain functions of the loaded families, with friendly messages, not errors."""

from __future__ import annotations

import html
import io
import logging
from collections.abc import Callable

from PIL import Image

from hf_oscq import plot_accuracy_vs_bits, quantize_codes
from hf_oscq.hub.card_facts import format_size
from hf_oscq.provenance import describe, group_by_provenance, sentence

from .boundary import on_page, warning
from .classify import LATENCY_REPEATS, LATENCY_WARMUP, Prediction, classify, image_mode, load_image
from .examples import Example, find_example
from .families import Family
from .figures import (
    accuracy_table,
    code_counts,
    family_curves,
    family_spec,
    layer_output_dim,
    layer_weight,
    write_weight_plot,
)

logger = logging.getLogger(__name__)

CLASSIFY_HEADERS = ["checkpoint", "bits", "size on disk (bytes)", "latency (ms)", "top-1", "top-1 prob", "top-5"]
ACCURACY_HEADERS = ["run", "full precision"] + [f"{bits} bits" for bits in range(8, 1, -1)]
LEVEL_HEADERS = ["code", "level value", "weights"]


_warning = warning


def _size(size_bytes: int | None) -> str:
    """Decimal units, as the model cards and the Hub show sizes."""
    return "size unknown" if size_bytes is None else format_size(size_bytes)


def predictions_html(predictions: list[Prediction], true_label: str | None = None) -> str:
    """Side-by-side cards, one per checkpoint, each with its top-k bars, size on disk and latency; with a known
    `true_label`, each card says whether its top-1 is right."""
    cards = []
    for prediction in predictions:
        title = "full precision" if prediction.bits is None else f"{prediction.bits}-bit"
        verdict = ""
        if true_label is not None:
            right = prediction.top[0][0] == true_label
            verdict = f' <span class="oscq-{"right" if right else "wrong"}">{"✓" if right else "✗"}</span>'
        bars = "".join(
            f'<div class="oscq-row"><span class="oscq-label">{html.escape(label)}</span>'
            f'<span class="oscq-bar" style="width:{100 * probability:.1f}%"></span>'
            f'<span class="oscq-prob">{100 * probability:.1f}%</span></div>'
            for label, probability in prediction.top
        )
        cards.append(
            f'<div class="oscq-variant" data-variant="{prediction.variant}"><h4>{title}{verdict}</h4>'
            f'<p class="oscq-meta">{_size(prediction.size_bytes)} · {prediction.latency_ms:.2f} ms</p>{bars}</div>'
        )
    return f'<div class="oscq-grid">{"".join(cards)}</div>'


@on_page(lambda message: (message, "", []))
def classify_view(
    families: dict[str, Family],
    family_name: str | None,
    image_path: str | None,
    examples: dict[str, list[Example]] | None = None,
) -> tuple[str, str, list]:
    """The Classify tab: `(message, cards HTML, table rows)`; a bad upload gives a message and empty results.

    An image that is one of the bundled `examples` is shown with its true label; an example of another dataset than
    the family's gets a warning, since the model never learned its classes.
    """
    family = families.get(family_name or "")
    if family is None:
        return _warning(f"No model family named {family_name!r} is loaded; pick one from the list."), "", []
    image, notes = load_image(image_path, *image_mode(family.image_processor))
    predictions = classify(family, image)
    rows = [
        [
            p.variant,
            p.bits,
            p.size_bytes,
            f"{p.latency_ms:.3f}",  # fixed decimals: a number column would show 0.52 next to 0.5034
            p.top[0][0],
            f"{p.top[0][1]:.4f}",
            ", ".join(f"{label} ({probability:.3f})" for label, probability in p.top),
        ]
        for p in predictions
    ]
    message = f"{family.name}: {len(predictions)} checkpoints on a {image.size[0]} x {image.size[1]} image"
    message += f" ({'; '.join(notes)})." if notes else "."
    example = find_example(examples or {}, image_path)
    true_label = None
    classes = set(getattr(family.reference_model.config, "label2id", None) or {})
    if example is not None and example.dataset == family.dataset and example.label in classes:
        true_label = example.label
        right = sum(p.top[0][0] == true_label for p in predictions)
        message += f" True label: **{true_label}** ({right} of {len(predictions)} checkpoints right)."
    elif example is not None and example.dataset == family.dataset:
        # a class name the model does not use (a copy of the dataset whose classes are named otherwise): no verdict
        message += "\n\n" + _warning(
            f"This example's label, {example.label!r}, is not one of {family.name}'s class names, so its answers "
            "are not marked right or wrong."
        )
    elif example is not None:
        message += "\n\n" + _warning(
            f"This is a {example.dataset} example ({example.label}); {family.name} was trained on {family.dataset}, "
            "so its answer means nothing."
        )
    message += (
        f"\n\nLatency: median of {LATENCY_REPEATS} timed forward passes per checkpoint (batch 1, after "
        f"{LATENCY_WARMUP} warm-up passes, checkpoints timed in turn), on this machine's CPU."
    )
    if family.problems:
        message += "\n\n" + "\n".join(f"* {problem}" for problem in family.problems)
    return message, predictions_html(predictions, true_label), rows


def _png_image(draw: Callable[[io.BytesIO], None]) -> Image.Image:
    """The PNG `draw` writes, as an image held in memory: a request leaves no file of its own behind (Gradio keeps
    one copy per distinct image in its cache, which `delete_cache` empties)."""
    buffer = io.BytesIO()
    draw(buffer)
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image


@on_page(lambda message: (None, {"headers": ACCURACY_HEADERS, "data": []}, message))
def accuracy_view(families: list[Family]) -> tuple[Image.Image | None, dict, str]:
    """The Accuracy tab: `(plot PNG image or None, table {"headers", "data"}: one row per run, one column per
    bit-width, message)`. Only curves measured alike (`hf_oscq.provenance`) share the plot and the table: those of
    the first family's own evaluation; the message says what they were measured on and names the curves left out."""
    curves = []
    for family in families:
        curves += family_curves(family, qualify=len(families) > 1)
    # language-model families report perplexity (the Text tab), not accuracy
    curves = [curve for curve in curves if any("accuracy" in row for row in curve[1].values())]
    if not curves:
        message = _warning("None of the loaded exports records an accuracy (no metrics, no card eval results).")
        return None, {"headers": ACCURACY_HEADERS, "data": []}, message
    (provenance, tables), *others = group_by_provenance(curves)
    # the hub's card figure, so both always agree
    image = _png_image(
        lambda buffer: plot_accuracy_vs_bits(tables, buffer, title="Accuracy after post-training quantization")
    )
    headers, rows = accuracy_table(tables)
    message = f"{len(tables)} accuracy curves from the exports' records and cards. {sentence(describe(provenance))}."
    if others:
        left_out = "; ".join(f"{', '.join(group)} ({describe(measured)})" for measured, group in others)
        message += f"\n\nNot shown, since measured otherwise: {left_out}."
    # shown with one decimal throughout (76.0, not 76), so the columns line up; the data stay numbers for sorting
    shown = [[row[0]] + ["" if value is None else f"{value:.1f}" for value in row[1:]] for row in rows]
    metadata = {"display_value": shown, "styling": [[""] * len(row) for row in rows]}
    return image, {"headers": headers, "data": rows, "metadata": metadata}, message


def weight_choices(family: Family | None) -> tuple[list[str], list[int], int | None]:
    """The layers and bit-widths the Weights tab offers for a family, and the bit-width shown first: the one the
    family was trained for when it was exported at it, else the lowest."""
    if family is None:
        return [], [], None
    widths = [v.bits for v in family.variants.values() if v.bits is not None]
    target = (family.record.get("training") or {}).get("osc_bits")
    return list(family.quantizable_layers), widths, target if target in widths else min(widths, default=None)


@on_page(lambda message: (None, [], message))
def weights_view(
    families: dict[str, Family], family_name: str | None, layer: str | None, bits: int | str | None
) -> tuple[str | None, list, str]:
    """The Weights tab: `(histogram PNG image or None, rows [code, level value, weights], message)`."""
    family = families.get(family_name or "")
    if family is None:
        return None, [], _warning(f"No model family named {family_name!r} is loaded; pick one from the list.")
    layers, widths, _ = weight_choices(family)
    if layer not in layers:
        return None, [], _warning(f"Pick a layer of {family.name} (got {layer!r}).")
    try:
        bits = int(bits)
    except (TypeError, ValueError):
        bits = None
    if bits not in widths:
        return None, [], _warning(f"Pick one of the exported bit-widths {widths} (got {bits!r}).")
    weight = layer_weight(family, layer)
    spec = family_spec(family, bits)
    out_dim = layer_output_dim(family, layer)
    codes, scales = quantize_codes(weight, spec=spec, out_dim=out_dim)
    counts = code_counts(codes, bits)
    image = _png_image(lambda buffer: write_weight_plot(weight, spec, layer, buffer, out_dim))
    scale = float(scales) if spec.per_tensor else 1.0
    rows = [[code, round(code * scale, 6), count] for code, count in counts.items()]
    unit = f"scale {scale:.4g}" if spec.per_tensor else f"in {spec.granularity.replace('_', '-')} scale units"
    return image, rows, f"{layer} at {bits} bits: {sum(counts.values())} weights on {len(counts)} levels ({unit})."
