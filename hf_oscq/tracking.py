"""Counting weight oscillations during training (PAPER.md section 7, after Nagel et al. 2022).

Each quantized weight's integer code `c_t = round(w_t / s_t)` is recorded every `every_n_steps` optimizer steps.
An oscillation happens when the code changes in the direction opposite to its previous non-zero change; the
frequency is an exponential moving average (momentum 0.01) of that indicator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from .quantizer import quantize_codes, validate_bits
from .selection import Patterns, select_weights
from .tracking_plots import plot_oscillation_counts

logger = logging.getLogger(__name__)

STATE_FILE = "oscillation_tracker.safetensors"
STATE_META = "oscillation_tracker.json"
_FIELDS = ("codes", "direction", "counts", "frequency")


class OscillationCounter:
    """Oscillation counts and frequencies of a set of integer-code tensors, updated one observation at a time.

    Args:
        momentum: EMA momentum of the frequency (0.01 in the paper).
    """

    def __init__(self, momentum: float = 0.01):
        self.momentum = momentum
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.updates = 0

    def update(self, codes: dict[str, torch.Tensor]) -> None:
        """Records the current codes; the first call only sets the reference."""
        for name, code in codes.items():
            code = code.to(torch.int16)
            entry = self.state.get(name)
            if entry is None:
                self.state[name] = {
                    "codes": code.clone(),
                    "direction": torch.zeros_like(code, dtype=torch.int8),
                    "counts": torch.zeros_like(code, dtype=torch.int32),
                    "frequency": torch.zeros_like(code, dtype=torch.float32),
                }
                continue
            step = torch.sign(code - entry["codes"]).to(torch.int8)
            oscillated = (step != 0) & (step == -entry["direction"])
            entry["counts"] += oscillated
            entry["frequency"].mul_(1 - self.momentum).add_(oscillated.float(), alpha=self.momentum)
            entry["direction"] = torch.where(step != 0, step, entry["direction"])
            entry["codes"] = code.clone()
        self.updates += 1

    def counts(self) -> torch.Tensor:
        """Every weight's oscillation count, flattened and concatenated."""
        return torch.cat([entry["counts"].flatten().cpu() for entry in self.state.values()])

    def summary(self) -> dict[str, float]:
        """`osc_fraction` (weights that oscillated at least once) and `osc_frequency` (mean EMA frequency)."""
        if not self.state:
            return {}
        counts = self.counts()
        frequency = torch.cat([entry["frequency"].flatten().cpu() for entry in self.state.values()])
        return {"osc_fraction": float((counts > 0).float().mean()), "osc_frequency": float(frequency.mean())}

    def save(self, folder: str | Path) -> None:
        """Writes the state as safetensors (tensors) and JSON (settings), no pickle."""
        tensors = {f"{name}::{key}": value.contiguous().cpu() for name, entry in self.state.items()
                   for key, value in entry.items()}
        save_file(tensors, str(Path(folder) / STATE_FILE))
        meta = {"momentum": self.momentum, "updates": self.updates, "weights": list(self.state)}
        (Path(folder) / STATE_META).write_text(json.dumps(meta, indent=2))

    def load(self, folder: str | Path, device: torch.device | None = None) -> None:
        """Restores a state written by `save`."""
        meta = json.loads((Path(folder) / STATE_META).read_text())
        tensors = load_file(str(Path(folder) / STATE_FILE))
        self.momentum, self.updates = meta["momentum"], meta["updates"]
        self.state = {
            name: {key: tensors[f"{name}::{key}"].to(device or "cpu") for key in _FIELDS} for name in meta["weights"]
        }


class OscillationTracker(TrainerCallback):
    """A `TrainerCallback` that counts oscillations of the quantized weights and logs them with the training loss.

    Adds `osc_fraction` and `osc_frequency` to every training log; at the end of training writes, into
    `output_dir`, `weight_histogram.png` (one layer's weights with the rounding thresholds, the paper's figure 2)
    and `oscillation_counts.png` (the distribution of oscillation counts, figure 3). Its state is saved in every
    checkpoint folder and restored by `resume_from_checkpoint`.

    Args:
        bits: bit-width whose codes are tracked (usually `osc_bits`).
        target_modules: which weights, as in `select_weights` (usually `osc_target_modules`).
        exclude_modules: as in `select_weights`.
        per_channel: one scale per output channel.
        every_n_steps: record the codes every this many optimizer steps.
        histogram_layer: the weight drawn in the histogram (default: the first selected weight, e.g. the first conv).
        momentum: EMA momentum of the frequency.
    """

    def __init__(
        self, bits: int = 3, target_modules: Patterns = None, exclude_modules: Patterns = None,
        per_channel: bool = False, every_n_steps: int = 1, histogram_layer: str | None = None, momentum: float = 0.01,
    ):
        self.bits = validate_bits(bits)
        self.target_modules, self.exclude_modules = target_modules, exclude_modules
        self.per_channel = per_channel
        self.every_n_steps = every_n_steps
        self.histogram_layer = histogram_layer
        self.counter = OscillationCounter(momentum)
        self._weights: dict[str, nn.Parameter] = {}

    def _codes(self) -> dict[str, torch.Tensor]:
        return {name: quantize_codes(weight, self.bits, self.per_channel)[0] for name, weight in self._weights.items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._weights = select_weights(model, self.target_modules, self.exclude_modules)
        if self.histogram_layer is not None and self.histogram_layer not in self._weights:
            raise ValueError(
                f"histogram_layer {self.histogram_layer!r} is not a quantized weight; choose one of "
                f"{list(self._weights)}."
            )
        checkpoint = self._resume_folder(args, state)
        if checkpoint is not None:
            self.counter.load(checkpoint, next(iter(self._weights.values())).device)
            logger.info("Oscillation tracker restored from %s (%d updates)", checkpoint, self.counter.updates)
        elif not self.counter.state:
            self.counter.update(self._codes())

    @staticmethod
    def _resume_folder(args, state) -> Path | None:
        if state.global_step == 0:
            return None
        candidates = [Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        for folder in candidates:
            if (folder / STATE_FILE).is_file():
                return folder
        logger.warning("Resumed at step %d without a saved oscillation tracker: counting restarts.", state.global_step)
        return None

    def on_step_end(self, args, state, control, **kwargs):
        if self._weights and state.global_step % self.every_n_steps == 0:
            self.counter.update(self._codes())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.counter.state:
            summary = {key: round(value, 6) for key, value in self.counter.summary().items()}
            logs.update(summary)  # seen by the reporting callbacks that follow this one
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(summary)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.counter.save(folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not self._weights:
            return
        from .plots import plot_weight_histogram

        layer = self.histogram_layer or next(iter(self._weights))
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        plot_weight_histogram(
            self._weights[layer], self.bits, output / "weight_histogram.png", self.per_channel,
            title=f"{layer}: weights and {self.bits}-bit thresholds",
        )
        plot_oscillation_counts(self.counter.counts().numpy(), output / "oscillation_counts.png", self.bits)
        summary = {**self.counter.summary(), "updates": self.counter.updates, "histogram_layer": layer}
        (output / "oscillations.json").write_text(json.dumps(summary, indent=2))


def add_oscillation_tracker(trainer, tracker: OscillationTracker) -> OscillationTracker:
    """Adds `tracker` to `trainer` right after the flow callback, so that TensorBoard & co. receive its metrics."""
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(1 if callbacks else 0, tracker)
    return tracker
