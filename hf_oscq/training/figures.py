"""Oscillation figures: the distribution of oscillation counts (paper figure 3) and the toy model's trajectories
(figures 1 and 4). Bare matplotlib `Figure`s on an Agg canvas, like `hf_oscq.plots`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..plots import save_png


def plot_oscillation_counts(counts: np.ndarray, path: str | Path, bits: int | None = None) -> None:
    """Histogram of per-weight oscillation counts (log scale), with the fraction that oscillated at least once."""
    counts = np.asarray(counts).ravel()
    figure = Figure(figsize=(6.0, 3.8))
    axes = figure.subplots()
    edges = np.arange(0, max(int(counts.max(initial=0)), 1) + 2) - 0.5
    axes.hist(counts, bins=edges if len(edges) <= 200 else 100, color="C1", log=True)
    fraction = float((counts > 0).mean()) if counts.size else 0.0
    axes.set_xlabel("oscillations per weight")
    axes.set_ylabel("number of weights")
    suffix = f" ({bits}-bit codes)" if bits else ""
    axes.set_title(f"{100 * fraction:.1f}% of {counts.size} weights oscillated{suffix}")
    figure.tight_layout()
    save_png(figure, path)


def plot_toy_one_weight(trajectories: dict[str, np.ndarray], path: str | Path, optimum: float) -> None:
    """Figure 1: the latent weight and its rounded value over the steps, per training method."""
    figure = Figure(figsize=(7.0, 3.8))
    axes = figure.subplots()
    for index, (method, weights) in enumerate(trajectories.items()):
        weights = np.asarray(weights)[:, 0]
        axes.plot(weights, color=f"C{index}", label=f"w ({method})")
        axes.plot(np.round(weights), color=f"C{index}", alpha=0.35, drawstyle="steps-post", label=f"q(w) ({method})")
    axes.axhline(0.5, color="0.5", linestyle=":", label="rounding threshold")
    axes.axhline(optimum, color="k", linestyle="--", linewidth=1, label=f"optimum w* = {optimum}")
    axes.set_xlabel("step")
    axes.set_ylabel("weight")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    save_png(figure, path)


def plot_toy_two_weights(trajectories: dict[str, np.ndarray], path: str | Path, optimum: tuple[float, float]) -> None:
    """Figure 4: the two latent weights' path in the plane, with the rounding grid and the optimum."""
    figure = Figure(figsize=(5.0, 5.0))
    axes = figure.subplots()
    for index, (method, weights) in enumerate(trajectories.items()):
        weights = np.asarray(weights)
        axes.plot(
            weights[:, 0], weights[:, 1], color=f"C{index}", marker=".", markersize=2, linewidth=0.6, label=method
        )
    for threshold in (-0.5, 0.5, 1.5):
        axes.axvline(threshold, color="0.6", linestyle=":")
        axes.axhline(threshold, color="0.6", linestyle=":")
    axes.plot(*optimum, marker="*", color="k", markersize=12, linestyle="none", label="optimum w*")
    axes.set_xlabel("w1")
    axes.set_ylabel("w2")
    axes.legend(fontsize="small")
    figure.tight_layout()
    save_png(figure, path)
