"""Figures for model cards, training runs and the Space: accuracy versus bit-width, and a weight histogram with the
quantization grid.

Plain functions of numbers and tensors that write a PNG. They draw on a bare `matplotlib.figure.Figure` (Agg
canvas, no pyplot), so they never open a window, never change the global backend and are safe in threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import OscqValueError
from .quantization.layout import expand_scale, resolve_out_dim
from .quantization.primitives import compute_scale, nonzero_scale
from .quantization.spec import QuantSpec, max_code, resolve_spec
from .quantization.variants import FULL_PRECISION, is_variant, variant_bits, variant_name

# PNG metadata without the matplotlib version: the same numbers always give the same bytes, so a re-upload of an
# unchanged card is recognised as a no-op by the Hub.
_PNG_METADATA = {"Software": None}


_MARKERS = ("o", "s", "^", "D", "v", "P")


def _bit_columns(table: Mapping[str, Mapping[str, float]]) -> list[int]:
    return sorted(variant_bits(key) for key in table if key != FULL_PRECISION and is_variant(key))


def accuracy_limits(values: list[float], margin: float = 0.08, min_span: float = 2.0) -> tuple[float, float]:
    """y-axis limits (in %) zoomed to the plotted values: their range plus `margin` of it on each side, at least
    `min_span` points wide, clipped to [0, 100]. A 0-100 % axis flattens the curves near the top into one line."""
    low, high = min(values), max(values)
    pad = max((high - low) * margin, (min_span - (high - low)) / 2, 0.25)
    low, high = max(0.0, low - pad), min(100.0, high + pad)
    return low, high


def save_png(figure: Figure, path: str | Path | BinaryIO, dpi: int = 110) -> None:
    """Writes `figure` as a PNG whose bytes depend on its content only."""
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=dpi, metadata=_PNG_METADATA)


ZOOM_FROM_BITS = 3  # the zoomed panel shows these bit-widths and more, where accuracies sit close together


def _draw_accuracy(axes, tables, metric: str, min_bits: int) -> list[float]:
    """Draws every run's values at `min_bits` bits and more, and its full-precision line, on `axes`, with the y-axis
    zoomed to them (`accuracy_limits`; perplexity keeps its own log axis); returns the values drawn (accuracy in %)."""
    factor = 100 if metric == "accuracy" else 1
    shown: list[float] = []
    all_bits: set[int] = set()
    for index, (run, table) in enumerate(tables.items()):
        color = f"C{index}"
        bits = [b for b in _bit_columns(table) if metric in table[variant_name(b)] and b >= min_bits]
        if bits:
            values = [factor * table[variant_name(b)][metric] for b in bits]
            # Later runs are drawn thinner on top with other markers, so equal curves stay visible.
            axes.plot(
                bits,
                values,
                marker=_MARKERS[index % len(_MARKERS)],
                markersize=max(4.0, 8.0 - 1.5 * index),
                linewidth=max(1.0, 2.6 - 0.5 * index),
                color=color,
                label=run,
            )
            all_bits.update(bits)
            shown += values
        if metric in table.get(FULL_PRECISION, {}):
            full = factor * table[FULL_PRECISION][metric]
            axes.axhline(full, color=color, linestyle="--", linewidth=1, label=f"{run}, full precision")
            shown.append(full)
    if shown and metric != "perplexity":  # a perplexity axis is logarithmic and scales itself
        axes.set_ylim(*accuracy_limits(shown))
    axes.set_xticks(sorted(all_bits))
    axes.grid(alpha=0.3)
    return shown


def plot_accuracy_vs_bits(
    tables: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | Path | BinaryIO,
    metric: str = "accuracy",
    highlight_bits: int | None = None,
    title: str | None = None,
) -> Figure:
    """Plots `metric` against the bit-width, one line per run; the full-precision value as a dashed line. Accuracy
    is drawn in %, perplexity on a log scale (lower is better; it grows by orders of magnitude at 2 bits).

    The y-axis of each panel is zoomed to the values it shows (`accuracy_limits`). When some run was measured below
    `ZOOM_FROM_BITS` bits (where accuracy usually collapses and a shared axis would flatten the rest), a second panel
    shows `ZOOM_FROM_BITS` bits and more on their own axis.

    Args:
        tables: `{run_name: {"fp": {"accuracy": 0.97}, "w2": {...}, ...}}`, as returned by `cross_bit_evaluate`.
        path: where to write the PNG (a path or a binary file object).
        metric: the metric key to plot: `"accuracy"` (fractions, drawn as percentages), `"perplexity"`, or another
            value drawn as it is.
        highlight_bits: a bit-width to mark with a vertical line (the model the figure belongs to).
        title: figure title.

    Returns:
        The matplotlib `Figure` (already saved): `axes[0]` shows every bit-width, `axes[1]` (when present) the zoom.

    Raises:
        ValueError: when no run has the metric at any bit-width.
    """
    percent = metric == "accuracy"
    measured = {b for table in tables.values() for b in _bit_columns(table) if metric in table[variant_name(b)]}
    # A perplexity axis is logarithmic and shows every bit-width on one panel; accuracy gets a zoomed second panel.
    zoom = percent and any(b < ZOOM_FROM_BITS for b in measured) and any(b >= ZOOM_FROM_BITS for b in measured)
    figure = Figure(figsize=(10.5, 4.6) if zoom else (6.4, 4.4))
    panels = figure.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    if not _draw_accuracy(panels[0], tables, metric, min_bits=0):
        raise OscqValueError(f"No run in {list(tables)} has a {metric!r} value to plot.")
    if zoom:
        _draw_accuracy(panels[1], tables, metric, min_bits=ZOOM_FROM_BITS)
        panels[0].set_title("every bit-width", fontsize="medium")
        panels[1].set_title(f"zoom: {ZOOM_FROM_BITS} bits and more", fontsize="medium")
    for axes in panels:
        if highlight_bits is not None and (axes is panels[0] or highlight_bits >= ZOOM_FROM_BITS):
            axes.axvline(
                highlight_bits, color="0.6", linewidth=6, alpha=0.3, label=f"this model ({highlight_bits} bits)"
            )
        axes.set_xlabel("weight bit-width (post-training quantization)")
        if metric == "perplexity":
            axes.set_yscale("log")
            axes.set_ylabel("test perplexity (log scale, lower is better)")
        else:
            axes.set_ylabel(f"test {metric} (%)" if percent else f"test {metric}")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize="small", loc="lower center", ncol=min(len(labels), 3), frameon=False)
    if title:
        figure.suptitle(title)
    rows = -(-len(labels) // 3)
    figure.tight_layout(rect=(0, 0.05 * rows + 0.01, 1, 1))
    save_png(figure, path)
    return figure


def quantization_thresholds(bits: int) -> np.ndarray:
    """Rounding thresholds in units of the scale `s`: a weight crosses one when `w / s` passes +-0.5, +-1.5, ...

    Returns:
        The `2 * max_code(bits)` thresholds, sorted: `[-(max_code - 0.5), ..., -0.5, 0.5, ..., max_code - 0.5]`.
    """
    half = np.arange(max_code(bits)) + 0.5
    return np.concatenate([-half[::-1], half])


def plot_weight_histogram(
    weight: torch.Tensor | np.ndarray,
    bits: int | None = None,
    path: str | Path | BinaryIO | None = None,
    per_channel: bool | None = None,
    title: str | None = None,
    bins: int = 120,
    *,
    spec: QuantSpec | None = None,
    show_levels: bool = False,
    dpi: int = 110,
    out_dim: int | None = None,
) -> Figure:
    """Histogram of one layer's full-precision weights with the `bits`-bit rounding thresholds drawn on it.

    Oscillation training pushes weights towards the thresholds (the paper's figure 2); this figure shows it. Model
    cards, training runs (`OscillationTracker`) and the Space's Weights tab all draw it here.

    Args:
        weight: the layer's weight tensor.
        bits: bit-width of the quantizer whose thresholds are drawn (shorthand for `spec`).
        path: where to write the PNG (a path or a binary file object).
        per_channel: one scale per output channel (shorthand for `spec`): the weights are then drawn divided by their
            channel's scale, so that every channel shares the thresholds at +-0.5, +-1.5, ... (group-wise scales
            likewise, each weight divided by its group's scale).
        title: figure title.
        bins: number of histogram bins.
        spec: the `QuantSpec` whose grid is drawn.
        show_levels: also draw the quantization levels (the values the weights are rounded to).
        dpi: resolution of the PNG.
        out_dim: the weight's output-channel dimension (1 for GPT-2's `Conv1D`), as in `compute_scale` (needed for
            per-channel and group-wise scales of a weight of 2 or more dimensions).

    Returns:
        The matplotlib `Figure` (already saved).
    """
    spec = resolve_spec("plot_weight_histogram", spec, bits, per_channel)
    if path is None:
        raise TypeError("plot_weight_histogram needs path=... (a file path or a binary file object).")
    weight = torch.as_tensor(weight).detach().float().cpu()
    out_dim = resolve_out_dim("plot_weight_histogram", weight.shape, spec, out_dim)
    scale = compute_scale(weight, spec=spec, out_dim=out_dim)
    if not spec.per_tensor:
        values, unit = (weight / nonzero_scale(expand_scale(scale, weight.shape, out_dim))).flatten().numpy(), 1.0
        xlabel = "weight / per-channel scale" if spec.per_channel else "weight / group scale"
    else:
        values, unit = weight.flatten().numpy(), float(scale)
        xlabel = f"weight (scale s = {unit:.3g})"
    figure = Figure(figsize=(7.0 if show_levels else 6.0, 3.8))
    axes = figure.subplots()
    axes.hist(values, bins=bins, histtype="stepfilled", color="C0", alpha=0.8, label="full-precision weights")
    if show_levels:
        levels = np.arange(-spec.max_code, spec.max_code + 1) * unit
        axes.vlines(
            levels,
            0,
            1,
            transform=axes.get_xaxis_transform(),
            colors="C2",
            linewidths=1.2,
            label="quantization levels",
        )
    axes.vlines(
        quantization_thresholds(spec.bits) * unit,
        0,
        1,
        transform=axes.get_xaxis_transform(),
        colors="C3",
        linestyles="--",
        linewidths=0.8,
        label="rounding thresholds",
    )
    axes.set_xlabel(xlabel)
    axes.set_ylabel("number of weights")
    axes.legend(fontsize="small", loc="upper right")
    axes.set_title(title or f"{values.size} weights, {spec.bits}-bit thresholds", fontsize="medium")
    figure.tight_layout()
    save_png(figure, path, dpi)
    return figure
