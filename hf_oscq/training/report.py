"""The accuracy-vs-bit-width figure of each evaluation, sent to the `report_to` integrations that take images
(TensorBoard, Weights & Biases, MLflow), next to the Trainer's scalar metrics."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

from .. import _compat
from ..quantization.variants import FULL_PRECISION
from .metrics import cross_bit_table

logger = logging.getLogger(__name__)

FIGURE_TAG = "{prefix}/accuracy_vs_bits"
# The report_to callbacks of transformers that take images, by class name (their modules import the services).
IMAGE_INTEGRATIONS = ("TensorBoardCallback", "WandbCallback", "MLflowCallback")


def cross_bit_figure(metrics: Mapping[str, float], prefix: str = "eval", title: str | None = None):
    """The accuracy-vs-bit-width figure of one evaluation's metrics (`eval_accuracy`, `eval_w3_accuracy`, ...), or
    `None` when they hold no quantized accuracy."""
    table = cross_bit_table(metrics, prefix=prefix)
    if not any(name != FULL_PRECISION and "accuracy" in row for name, row in table.items()):
        return None
    from ..plots import plot_accuracy_vs_bits

    return plot_accuracy_vs_bits({"this run": table}, io.BytesIO(), title=title)


def report_cross_bit_figure(trainer, metrics: Mapping[str, float], prefix: str = "eval") -> list[str]:
    """Logs the figure of an evaluation to every image-taking `report_to` integration of `trainer`, at the current
    step under the tag `{prefix}/accuracy_vs_bits`.

    Returns:
        The names of the integrations it was sent to.
    """
    callbacks = [c for c in trainer.callback_handler.callbacks if type(c).__name__ in IMAGE_INTEGRATIONS]
    if not callbacks:  # nothing to draw for: no figure, no matplotlib import
        return []
    step = trainer.state.global_step
    figure = cross_bit_figure(metrics, prefix, title=f"{prefix}, step {step}")
    if figure is None:
        return []
    tag = FIGURE_TAG.format(prefix=prefix)
    sent = []
    for callback in callbacks:
        name = type(callback).__name__
        try:
            if name == "TensorBoardCallback":
                writer = _compat.tensorboard_writer(callback, trainer.args)
                if writer is not None:
                    writer.add_figure(tag, figure, global_step=step)
                    writer.flush()
                    sent.append(name)
            elif name == "WandbCallback" and getattr(callback, "_initialized", False):
                wandb = callback._wandb
                wandb.log({tag: wandb.Image(figure), "train/global_step": step})
                sent.append(name)
            elif name == "MLflowCallback" and getattr(callback, "_initialized", False):
                callback._ml_flow.log_figure(figure, f"{tag}_step_{step:06d}.png")
                sent.append(name)
        except Exception as error:  # a failing logger must not stop training
            logger.warning("Could not log the cross-bit figure to %s: %s", name, error)
    return sent
