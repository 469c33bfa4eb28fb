"""Every use hf_oscq makes of a private or undocumented Trainer, transformers or accelerate API, in one place.

Each is written against the versions in `WRITTEN_FOR`. When an upgrade breaks one, the fix belongs here;
`check_private_apis()` (run by the test suite) names what the installed versions lack. Heavy modules are imported
inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

WRITTEN_FOR = {"transformers": "5.24", "accelerate": "1.15", "torch": "2.14"}

# Private Trainer methods OscillationTrainer overrides (training/trainer.py): it reloads checkpoints through
# from_pretrained, which applies transformers' legacy key renaming, where the Trainer would load the raw file.
# It also wraps `_remove_unused_columns` to explain a dataset transform that reads a removed column.
TRAINER_OVERRIDES = ("_load_from_checkpoint", "_load_best_model", "_remove_unused_columns")
# Private Trainer members called or read.
TRAINER_MEMBERS = ("_remove_unused_columns", "_prepare_inputs")
# HfQuantizer hooks OscqHfQuantizer implements (export/hf_quantizer.py). `update_attn_implementation` is the only one
# that sees the model config before the weights file is resolved: it restores the guarded config fields there.
HF_QUANTIZER_HOOKS = (
    "update_attn_implementation",
    "_process_model_before_weight_loading",
    "_process_model_after_weight_loading",
    "get_load_operations",
    "get_quantize_ops",
    "param_needs_quantization",
    "get_state_dict_and_metadata",
    "_dequantize",
)
# Private transformers names the packed-weight loader and the save path use (export/hf_quantizer.py, export/writer.py,
# export/checkpoint.py): the config types whose loading attributes `from_pretrained` merges, and the removal of tied
# weights before saving.
LOADING_APIS = {
    "transformers.quantizers.auto": ("LOADING_ATTRIBUTES_CONFIG_TYPES",),
    "transformers.modeling_utils": ("remove_tied_weights_from_state_dict",),
}
# transformers.core_model_loading / conversion_mapping: the renaming of legacy checkpoint names (ViT's
# `vit.encoder.layer.0...` on disk, `vit.layers.0...` in the model) that export and loading must apply too.
CONVERSION_APIS = {
    "transformers.conversion_mapping": ("get_model_conversion_mapping",),
    "transformers.core_model_loading": (
        "ConversionOps",
        "WeightRenaming",
        "rename_source_key",
        "revert_weight_conversion",
    ),
}
ACCELERATE_APIS = {
    "accelerate.commands.launch": ("launch_command_parser",),
    "accelerate.commands.config.config_args": ("load_config_from_file",),
}


def check_private_apis() -> list[str]:
    """The private APIs listed here that the installed libraries no longer provide (empty when all are there)."""
    from transformers import Trainer
    from transformers.quantizers import HfQuantizer

    missing = [f"Trainer.{name}" for name in TRAINER_OVERRIDES + TRAINER_MEMBERS if not hasattr(Trainer, name)]
    missing += [f"HfQuantizer.{name}" for name in HF_QUANTIZER_HOOKS if not hasattr(HfQuantizer, name)]
    for module_name, names in {**CONVERSION_APIS, **LOADING_APIS, **ACCELERATE_APIS}.items():
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{name}" for name in names if not hasattr(module, name)]
    return missing


# ----------------------------------------------------------------------------------------------------- Trainer


def loss_is_scaled_for_gradient_accumulation(trainer, num_items_in_batch) -> bool:
    """Whether the Trainer leaves the loss `compute_loss` returns undivided by the accumulation steps.

    Mirrors the condition in `Trainer.training_step` (transformers 5.24).
    """
    if trainer.loss_is_scaled_for_ga is not None:
        return trainer.loss_is_scaled_for_ga
    return (
        trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
    ) or trainer.compute_loss_func is not None


def count_shifted_labels(trainer) -> None:
    """Makes the Trainer count a causal language model's loss tokens as its loss does, `labels[..., 1:]`.

    transformers 5.24 decides that from `model.loss_type`, which is `None` for causal LMs whose class name does not
    end in "ForCausalLM" (`GPT2LMHeadModel`); the loss, a sum divided by the Trainer's token count, then comes out
    `(length - 1) / length` too small in training and evaluation, and so does every perplexity.
    """
    if getattr(trainer, "_loss_shifts_labels", True) is False:
        trainer._loss_shifts_labels = True


def remove_unused_columns(trainer, dataset, description: str):
    """A `datasets.Dataset` without the columns the model's forward does not take, as the Trainer's loaders do."""
    return trainer._remove_unused_columns(dataset, description=description)


def start_prediction_progress(trainer, dataloader, passes: int) -> None:
    """Opens the evaluation progress bar of the Trainer's `ProgressCallback` for `passes` loops over `dataloader`.

    `ProgressCallback.on_prediction_step` opens a bar of `len(dataloader)` steps at the first step and closes it in
    `on_evaluate` (transformers 5.24); the cross-bit evaluation runs the loop once per bit-width in between, so the
    bar is opened here with the total of all of them, and the callback then only advances it.
    """
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import has_length

    if not trainer.state.is_world_process_zero or not has_length(dataloader):
        return
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.prediction_bar is None:
            from tqdm.auto import tqdm

            total = passes * len(dataloader)
            callback.prediction_bar = tqdm(total=total, leave=callback.training_bar is None, dynamic_ncols=True)


def tensorboard_writer(callback, args):
    """The `SummaryWriter` of transformers' `TensorBoardCallback`, created as its `on_train_begin` would when an
    evaluation comes before training (`_init_summary_writer`, transformers 5.24); `None` without tensorboard."""
    if callback.tb_writer is None:
        callback._init_summary_writer(args)
    return callback.tb_writer


def prepare_inputs(trainer, batch: dict) -> dict:
    """A batch moved to the Trainer's device, as its training and evaluation loops do."""
    return trainer._prepare_inputs(batch)


# ------------------------------------------------------------------------------------------ checkpoint key names


def conversion_ops_class() -> type:
    """`transformers.core_model_loading.ConversionOps`, the base of the loader's per-tensor operations."""
    from transformers.core_model_loading import ConversionOps

    return ConversionOps


def allow_loading_attributes(config_class: type) -> None:
    """Lets `from_pretrained(..., quantization_config=config_class(...))` set the loading attributes
    (`get_loading_attributes`) on a checkpoint's own config, as transformers does for its listed config types
    (`merge_quantization_configs`, transformers 5.24)."""
    from transformers.quantizers import auto

    if config_class not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, config_class)


def remove_tied_weights(model, state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` without the tied copies `save_pretrained` leaves out (transformers'
    `remove_tied_weights_from_state_dict`); a model without a transformers config keeps every entry."""
    if not hasattr(model, "config"):
        return dict(state_dict)
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(dict(state_dict), model)


def keys_loading_may_skip(model) -> tuple[set[str], set[str]]:
    """`(tied weight names, name patterns)` of the state-dict entries `from_pretrained` fills without reading them
    from the checkpoint: the tied copies (`all_tied_weights_keys`, transformers 5.24) and the model class's
    `_keys_to_ignore_on_load_missing`."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return tied, set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())


def tied_weight_sources(model) -> dict[str, str]:
    """`{tied copy: the parameter it is tied to}` (`all_tied_weights_keys`, transformers 5.24), known as soon as the
    model is built, before `from_pretrained` ties the weights."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


@contextlib.contextmanager
def checkpoint_naming(model) -> Iterator[None]:
    """While active, `save_pretrained` (and `revert_checkpoint_names`) write the checkpoint names of every transform
    of the model's class (transformers' reverse weight conversion), prefix changes included, as for a model loaded
    from its native checkpoint: TimmWrapper weights then carry timm's own names, and timm tools reading the file meet
    the packed tensors (and fail on their shapes) instead of skipping unknown prefixed names. The conversions a
    loaded model remembers (`_weight_conversions`, which depend on the checkpoint it came from) are set aside, so that
    a model built from scratch and the same model reloaded with `from_pretrained` write the same names. Without a
    transformers config, nothing changes."""
    if not hasattr(model, "config"):
        yield
        return
    from transformers.conversion_mapping import get_model_conversion_mapping

    missing = object()
    remembered = model.__dict__.get("_weight_conversions", missing)
    model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False) or None
    try:
        yield
    finally:
        if remembered is missing:
            del model._weight_conversions
        else:
            model._weight_conversions = remembered


def revert_checkpoint_names(model, tensors: dict[str, Any]) -> dict[str, Any]:
    """Model-side tensor names -> the names `save_pretrained` writes under `checkpoint_naming` (transformers'
    reverse weight conversion); a model without a transformers config keeps its names."""
    if not hasattr(model, "config"):
        return dict(tensors)
    from transformers.core_model_loading import revert_weight_conversion

    with checkpoint_naming(model):
        return revert_weight_conversion(model, dict(tensors))


def checkpoint_to_model_names(entries: dict[str, Any], model, suffix: str) -> dict[str, Any]:
    """Checkpoint names -> parameter names, with the renamings transformers applies while loading (legacy names).

    A key ending in `suffix` (the scale tensors) is renamed as the weight it belongs to, then given `suffix` back.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [
        transform for transform in get_model_conversion_mapping(model) if isinstance(transform, WeightRenaming)
    ]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    renamed = {}
    for key, entry in entries.items():
        stem, tail = (key.removesuffix(suffix), suffix) if key.endswith(suffix) else (key, "")
        renamed[rename_source_key(stem, renamings, [], prefix, meta_state)[0] + tail] = entry
    return renamed


# ---------------------------------------------------------------------------------------------------- accelerate


def accelerate_launch_parser():
    """The argument parser of `accelerate launch` (to read `--num_processes` of a parent launch command)."""
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


def accelerate_config_processes(config_file: str) -> int:
    """`num_processes` of an accelerate config file."""
    from accelerate.commands.config.config_args import load_config_from_file

    return int(load_config_from_file(config_file).num_processes)
