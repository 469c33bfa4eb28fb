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

from ..errors import OscqValueError
from ..quantization.primitives import sharded_codes
from ..quantization.selection import output_dim, weight_owners
from ..quantization.sharding import all_reduce, current_weights, gather, local_shard
from ..quantization.spec import Patterns, QuantSpec, resolve_spec

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

    def totals(self) -> torch.Tensor:
        """`[weights that oscillated at least once, sum of frequencies, weights]` (float64, on the state's device),
        summable across shards."""
        entries = list(self.state.values())
        oscillated = torch.stack([(entry["counts"] > 0).sum() for entry in entries]).sum().double()
        frequency = torch.stack([entry["frequency"].double().sum() for entry in entries]).sum()
        weights = sum(entry["counts"].numel() for entry in entries)
        return torch.stack([oscillated, frequency, torch.full_like(frequency, weights)])

    def summary(self, totals: torch.Tensor | None = None) -> dict[str, float]:
        """`osc_fraction` (weights that oscillated at least once) and `osc_frequency` (mean EMA frequency), from
        `totals()` (or those of several shards, summed)."""
        if not self.state:
            return {}
        oscillated, frequency, weights = (self.totals() if totals is None else totals).tolist()
        return {"osc_fraction": oscillated / max(weights, 1), "osc_frequency": frequency / max(weights, 1)}

    def save(self, folder: str | Path, state_file: str = STATE_FILE, meta_file: str = STATE_META) -> None:
        """Writes the state as safetensors (tensors) and JSON (settings), no pickle."""
        tensors = {
            f"{name}::{key}": value.contiguous().cpu()
            for name, entry in self.state.items()
            for key, value in entry.items()
        }
        save_file(tensors, str(Path(folder) / state_file))
        meta = {"momentum": self.momentum, "updates": self.updates, "weights": list(self.state)}
        (Path(folder) / meta_file).write_text(json.dumps(meta, indent=2))

    def load(
        self,
        folder: str | Path,
        device: torch.device | None = None,
        state_file: str = STATE_FILE,
        meta_file: str = STATE_META,
    ) -> None:
        """Restores a state written by `save`."""
        meta = json.loads((Path(folder) / meta_file).read_text())
        tensors = load_file(str(Path(folder) / state_file))
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
        bits: bit-width whose codes are tracked (shorthand for `spec`; 3 when neither is given).
        target_modules: which weights, as in `select_weights` (shorthand for `spec`).
        exclude_modules: as in `select_weights` (shorthand for `spec`).
        per_channel: one scale per output channel (shorthand for `spec`).
        every_n_steps: record the codes every this many optimizer steps.
        histogram_layer: the weight drawn in the histogram (default: the first selected weight, e.g. the first conv).
        momentum: EMA momentum of the frequency.
        spec: the `QuantSpec` whose codes are tracked (usually the run's `OscillationConfig.quant_spec`).
    """

    def __init__(
        self,
        bits: int | None = None,
        target_modules: Patterns = None,
        exclude_modules: Patterns = None,
        per_channel: bool | None = None,
        every_n_steps: int = 1,
        histogram_layer: str | None = None,
        momentum: float = 0.01,
        *,
        spec: QuantSpec | None = None,
    ):
        if spec is None and bits is None:
            bits = 3
        self.spec = resolve_spec("OscillationTracker", spec, bits, per_channel, target_modules, exclude_modules)
        self.every_n_steps = every_n_steps
        self.histogram_layer = histogram_layer
        self.counter = OscillationCounter(momentum)
        self._owners: dict[str, nn.Module] = {}
        self._model: nn.Module | None = None
        self._shard_groups: tuple = ()  # with FSDP2 each process tracks the rows it holds

    def _weights(self) -> dict[str, torch.Tensor]:
        return current_weights(self._model, self._owners)

    def _codes(self) -> dict[str, torch.Tensor]:
        weights = self._weights()
        out_dims = [output_dim(module) for module in self._owners.values()]
        coded = sharded_codes(list(weights.values()), self.spec, out_dims)
        return {name: codes for name, (_, codes, _) in zip(weights, coded)}

    def _state_name(self, args) -> tuple[str, str]:
        """Checkpoint file names: one state for the whole model, or one per process when FSDP2 shards the weights."""
        if not self._shard_groups:
            return STATE_FILE, STATE_META
        stem = f"oscillation_tracker-rank{args.process_index}"
        return f"{stem}.safetensors", f"{stem}.json"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        self._owners = weight_owners(model, spec=self.spec)
        if self.histogram_layer is not None and self.histogram_layer not in self._owners:
            raise OscqValueError(
                f"histogram_layer {self.histogram_layer!r} is not a quantized weight; choose one of "
                f"{list(self._owners)}."
            )
        first = next(iter(self._weights().values()))
        self._shard_groups = local_shard(first).groups
        checkpoint = self._resume_folder(args, state)
        if checkpoint is not None:
            self.counter.load(checkpoint, first.device, *self._state_name(args))
            logger.info("Oscillation tracker restored from %s (%d updates)", checkpoint, self.counter.updates)
        elif not self.counter.state:
            self.counter.update(self._codes())

    def _resume_folder(self, args, state) -> Path | None:
        if state.global_step == 0:
            return None
        candidates = [Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        for folder in candidates:
            if (folder / self._state_name(args)[0]).is_file():
                return folder
        logger.warning("Resumed at step %d without a saved oscillation tracker: counting restarts.", state.global_step)
        return None

    def on_step_end(self, args, state, control, **kwargs):
        if self._owners and state.global_step % self.every_n_steps == 0:
            self.counter.update(self._codes())

    def _summary(self) -> dict[str, float]:
        # Training logs happen on every process at once, so the reduction across shards is safe here.
        return self.counter.summary(all_reduce([self.counter.totals()], [self._shard_groups], "sum")[0])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.counter.state:
            summary = {key: round(value, 6) for key, value in self._summary().items()}
            logs.update(summary)  # seen by the reporting callbacks that follow this one
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(summary)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if (state.is_world_process_zero or self._shard_groups) and folder.is_dir():
            self.counter.save(folder, *self._state_name(args))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._owners:
            return
        from ..plots import plot_weight_histogram
        from .figures import plot_oscillation_counts

        # Collectives first, on every process: the whole tensors of sharded weights, and the summed totals.
        weights = self._weights()
        layer = self.histogram_layer or next(iter(weights))
        histogram_weight = gather(local_shard(weights[layer]).local.detach(), weights[layer])
        counts = torch.cat(
            [gather(self.counter.state[name]["counts"], weight).flatten().cpu() for name, weight in weights.items()]
        )
        summary = {**self._summary(), "updates": self.counter.updates, "histogram_layer": layer}
        if not state.is_world_process_zero:
            return
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        bits = self.spec.bits
        plot_weight_histogram(
            histogram_weight,
            path=output / "weight_histogram.png",
            spec=self.spec,
            out_dim=output_dim(self._owners[layer]),
            title=f"{layer}: weights and {bits}-bit thresholds",
        )
        plot_oscillation_counts(counts.numpy(), output / "oscillation_counts.png", bits)
        (output / "oscillations.json").write_text(json.dumps(summary, indent=2))


def add_oscillation_tracker(trainer, tracker: OscillationTracker) -> OscillationTracker:
    """Adds `tracker` to `trainer` right after the flow callback, so that TensorBoard & co. receive its metrics."""
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(1 if callbacks else 0, tracker)
    return tracker
