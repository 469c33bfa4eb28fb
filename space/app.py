"""Gradio Space: one model at full precision and at 8 ... 2 bits, side by side, on your own image.

Run locally with `python space/app.py`. The models come from `OSCQ_MODELS` (comma-separated export folders or Hub
repo ids); without it, the export folders found under the repository's `outputs/` are used.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import gradio as gr

from hf_oscq.errors import configure_logging
from hf_oscq.export.folder import table_provenance
from hf_oscq.quantization.variants import sort_variants

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oscq_space.examples import EXAMPLES_DIR, load_examples  # noqa: E402
from oscq_space.families import MODELS_ENV, Family, configured_entries, load_families  # noqa: E402
from oscq_space.text import TEXT_HEADERS, generate_view, is_language_model  # noqa: E402
from oscq_space.views import (  # noqa: E402
    ACCURACY_HEADERS,
    CLASSIFY_HEADERS,
    LEVEL_HEADERS,
    accuracy_view,
    classify_view,
    weight_choices,
    weights_view,
)

logger = logging.getLogger(__name__)

MAX_UPLOAD = "50mb"  # gradio refuses larger uploads; images over 25 megapixels are refused by the app
CSS = """
.oscq-grid {display: flex; flex-wrap: wrap; gap: 10px;}
.oscq-variant {flex: 1 1 170px; border: 1px solid #ddd; border-radius: 8px; padding: 8px; max-width: 240px;}
.oscq-variant h4 {margin: 0 0 2px 0;}
.oscq-meta {margin: 0 0 6px 0; font-size: 0.8em; color: #777;}
.oscq-row {display: flex; align-items: center; gap: 4px; font-size: 0.85em; margin: 2px 0;}
.oscq-label {flex: 0 0 70px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;}
.oscq-bar {height: 10px; background: #f97316; border-radius: 3px; min-width: 1px;}
.oscq-prob {flex: 0 0 48px; text-align: right; margin-left: auto;}
.oscq-right {color: #16a34a;}
.oscq-wrong {color: #dc2626;}
#input-image img, .gallery img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;}
"""


def upload_box(**kwargs) -> gr.Image:
    """An image input that hands unreadable uploads to the app (as a path) instead of failing before it runs.

    (Wrapping the instance's `preprocess` rather than subclassing: gradio writes a stub file for every subclass.)
    """
    box = gr.Image(type="filepath", image_mode=None, **kwargs)
    preprocess = box.preprocess

    def tolerant_preprocess(payload):
        try:
            return preprocess(payload)
        except Exception:  # the app turns this into a friendly message on the page
            return None if payload is None else payload.path

    box.preprocess = tolerant_preprocess
    return box


def _intro(families: list[Family], problems: list[str]) -> str:
    """The page's header. Its numbers come from the loaded exports' own records (the ones the Accuracy tab plots),
    each with what it was measured on; measurements of other runs live in docs/RESULTS.md."""
    lines = [
        "# Oscillations make neural networks robust to quantization",
        "The same network at full precision and rounded to 8 ... 2 bits after training, side by side, with the "
        "accuracy each export measured. Where the regularizer helps, it is at the bit-width below the one it was "
        "trained for; hf_oscq's measurements of where that holds, and where it does not, are in its docs/RESULTS.md.",
    ]
    if families:
        lines.append("Loaded: " + "; ".join(_family_line(family) for family in families) + ".")
    else:
        lines.append(
            f"**⚠️ No model family could be loaded.** Set `{MODELS_ENV}` to export folders or Hub repo ids "
            "(comma-separated), or run `make demo` to create local exports under `outputs/`."
        )
    lines += [f"* ⚠️ {problem}" for problem in problems]
    return "\n\n".join(lines)


def _family_line(family: Family) -> str:
    """`**name** (8 checkpoints)`, with the family's full-precision and lowest-bit numbers from its own record and
    what they were measured on, where it records them."""
    line = f"**{family.name}** ({len(family.loaded)} checkpoints"
    metrics = family.record.get("metrics") or {}
    measured = table_provenance(family.record, "metrics")
    quantized = sort_variants(name for name in metrics if name != "fp")
    if measured is None or "fp" not in metrics or not quantized:
        return line + ")"
    lowest = quantized[0]
    metric = measured.metric

    def shown(name: str) -> str:
        value = metrics[name].get(metric)
        return "-" if value is None else f"{100 * value:.1f} %" if metric == "accuracy" else f"{value:.2f}"

    return f"{line}: {shown('fp')} at full precision, {shown(lowest)} at {lowest[1:]} bits; {measured.describe()})"


def build_demo(families: list[Family], problems: list[str]) -> gr.Blocks:
    """The page: Classify, Accuracy and Weights tabs over the loaded families, and a Text tab for language-model
    families (each button has an `api_name`)."""
    by_name = {family.name: family for family in families}
    names = list(by_name)
    first = families[0] if families else None
    layers, widths, shown_bits = weight_choices(first)
    examples = load_examples()
    # The families never change after startup, so neither does the Accuracy tab: its plot (a temporary PNG that
    # nothing deletes) and table are made on first use and then served from memory. Made lazily so that a model
    # card that cannot be read fails the tab, as an error on the page, and not the whole Space at startup.
    accuracy = functools.cache(functools.partial(accuracy_view, families))

    def dataset_of(family_name) -> str | None:
        family = by_name.get(family_name)
        return family.dataset if family is not None else None

    def show_examples(family_name):
        dataset = dataset_of(family_name)
        return [gr.Column(visible=name == dataset) for name in examples] + [
            gr.Markdown(visible=dataset not in examples)
        ]

    def update_choices(family_name):
        layer_list, bit_list, bits = weight_choices(by_name.get(family_name))
        return (
            gr.Dropdown(choices=layer_list, value=layer_list[0] if layer_list else None),
            gr.Dropdown(choices=bit_list, value=bits),
        )

    # Gradio keeps one file per distinct output image in its cache: delete those older than a day, every hour.
    with gr.Blocks(title="Oscillation-regularized quantization", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(_intro(families, problems))
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column(scale=1):
                    family_box = gr.Dropdown(names, value=names[0] if names else None, label="Model family")
                    image_box = upload_box(label="Image", height=240, elem_id="input-image")
                    classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    # One example set per dataset; the family's own is shown, with each image's true label.
                    shown = dataset_of(names[0]) if names else None
                    example_columns = []
                    for dataset, listed in examples.items():
                        with gr.Column(visible=dataset == shown) as column:
                            gr.Examples(
                                [str(example.path) for example in listed],
                                inputs=image_box,
                                example_labels=[f"true label: {example.label}" for example in listed],
                                label=f"Test images of {dataset} (the family's dataset)",
                                examples_per_page=12,
                            )
                        example_columns.append(column)
                    no_examples = gr.Markdown(
                        "No example images are bundled for this family's dataset: upload one of its test images.",
                        visible=shown not in examples,
                    )
                with gr.Column(scale=3):
                    classify_message = gr.Markdown(elem_id="classify-message")
                    cards = gr.HTML(elem_id="classify-cards")
                    classify_table = gr.Dataframe(headers=CLASSIFY_HEADERS, label="Predictions", interactive=False)
            family_box.change(show_examples, family_box, example_columns + [no_examples], api_visibility="private")
            classify_button.click(
                functools.partial(classify_view, by_name, examples=examples),
                [family_box, image_box],
                [classify_message, cards, classify_table],
                api_name="classify",
            )
        with gr.Tab("Accuracy"):
            accuracy_button = gr.Button("Show accuracy vs bit-width", elem_id="accuracy-button")
            accuracy_message = gr.Markdown()
            accuracy_plot = gr.Image(
                type="filepath", label="Accuracy vs bit-width", format="png", elem_id="accuracy-plot"
            )
            accuracy_table = gr.Dataframe(headers=ACCURACY_HEADERS, label="Accuracy", interactive=False)
            accuracy_outputs = [accuracy_plot, accuracy_table, accuracy_message]
            accuracy_button.click(accuracy, None, accuracy_outputs, api_name="accuracy")
        demo.load(accuracy, None, accuracy_outputs, api_visibility="private")
        with gr.Tab("Weights"):
            with gr.Row():
                weights_family = gr.Dropdown(names, value=names[0] if names else None, label="Model family")
                layer_box = gr.Dropdown(layers, value=layers[0] if layers else None, label="Layer")
                bits_box = gr.Dropdown(widths, value=shown_bits, label="Bit-width")
            weights_button = gr.Button("Show weights", elem_id="weights-button")
            weights_message = gr.Markdown()
            weights_plot = gr.Image(type="filepath", label="Weights and quantization grid", format="png")
            levels_table = gr.Dataframe(headers=LEVEL_HEADERS, label="Weights per level", interactive=False)
            weights_family.change(update_choices, weights_family, [layer_box, bits_box], api_name="weight_choices")
            weights_button.click(
                functools.partial(weights_view, by_name),
                [weights_family, layer_box, bits_box],
                [weights_plot, levels_table, weights_message],
                api_name="weights",
            )
        text_names = [family.name for family in families if is_language_model(family)]
        if text_names:
            with gr.Tab("Text"):
                with gr.Row():
                    text_family = gr.Dropdown(text_names, value=text_names[0], label="Language-model family")
                    new_tokens = gr.Slider(1, 200, value=40, step=1, label="New tokens")
                prompt_box = gr.Textbox(value="And God said", label="Prompt", lines=2, elem_id="prompt")
                generate_button = gr.Button(
                    "Generate at every bit-width", variant="primary", elem_id="generate-button"
                )
                text_message = gr.Markdown()
                text_table = gr.Dataframe(headers=TEXT_HEADERS, label="Continuations", interactive=False, wrap=True)
                generate_button.click(
                    functools.partial(generate_view, by_name),
                    [text_family, prompt_box, new_tokens],
                    [text_message, text_table],
                    api_name="generate",
                )
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """Starts the server with the page's style; `kwargs` go to `gr.Blocks.launch` (port, thread lock, ...)."""
    kwargs.setdefault("max_file_size", MAX_UPLOAD)
    return demo.launch(css=CSS, allowed_paths=[str(EXAMPLES_DIR)], **kwargs)


def main() -> None:
    configure_logging()
    families, problems = load_families(configured_entries())
    for problem in problems:
        logger.warning(problem)
    launch(build_demo(families, problems))  # host and port from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("app.py", main))
