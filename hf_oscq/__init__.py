"""hf_oscq: oscillation-regularized training for robust low-bit post-training quantization, on Hugging Face.

`import hf_oscq` is light: it imports no third-party library. It registers the "oscq" quantization method with
transformers as soon as transformers' quantizer registry is imported, `OscqImageProcessor` as soon as its image
processor registry is, hf_oscq's timm architectures as soon as timm is, and its packed weights as a type `torch.load`
may rebuild as soon as torch is (`_import_hooks.py`), so bit-packed checkpoints, their image processors and saved
state dicts load with `from_pretrained`, `pipeline` and `torch.load` afterwards. Every public name
below is imported on first use, with the modules it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._import_hooks import when_imported
from .versions import __version__

# Public name -> the module defining it (relative to this package).
_PUBLIC = {
    # quantization: the numeric core
    "ALL_LAYERS": ".quantization.spec",
    "ALL_WEIGHTS": ".quantization.spec",
    "DEFAULT_EVAL_BITS": ".quantization.spec",
    "QuantSpec": ".quantization.spec",
    "max_code": ".quantization.spec",
    "validate_bits": ".quantization.spec",
    "compute_scale": ".quantization.primitives",
    "dequantize": ".quantization.primitives",
    "fake_quantize": ".quantization.primitives",
    "quantize_codes": ".quantization.primitives",
    "PenaltyWorkspace": ".quantization.fused",
    "fused_fake_quantize": ".quantization.fused",
    "fused_oscillation_penalty": ".quantization.fused",
    "oscillation_penalty": ".quantization.penalty",
    "kurtosis_penalty": ".quantization.kurtosis",
    "dampening_penalty": ".quantization.dampening",
    "pack_codes": ".quantization.packing",
    "packed_size": ".quantization.packing",
    "unpack_codes": ".quantization.packing",
    "output_dim": ".quantization.selection",
    "select_weights": ".quantization.selection",
    "recalibrate_batchnorm": ".quantization.batchnorm",
    "cross_bit_evaluate": ".quantization.ptq",
    "format_cross_bit_table": ".quantization.ptq",
    "quantize_model": ".quantization.ptq",
    "quantized_weights": ".quantization.ptq",
    "fake_quantized_forward": ".quantization.qat",
    # training
    "OSC_METHODS": ".training.methods",
    "TrainingMethod": ".training.methods",
    "get_method": ".training.methods",
    "register_method": ".training.methods",
    "OscillationConfig": ".training.config",
    "OscillationTrainer": ".training.trainer",
    "OscillationCounter": ".training.tracking",
    "OscillationTracker": ".training.tracking",
    "add_oscillation_tracker": ".training.tracking",
    "ACCURACY_METRIC": ".training.metrics",
    "classification_metrics": ".training.metrics",
    "compute_accuracy": ".training.metrics",
    "load_metric": ".training.metrics",
    # export and loading
    "export_quantized": ".export.writer",
    "EXPORT_FORMATS": ".export.formats",
    "CheckpointFormatError": ".export.checkpoint",
    "ExportFolderError": ".export.folder",
    "auto_class_for": ".export.folder",
    "read_export_manifest": ".export.folder",
    "OscqHfQuantizer": ".export.hf_quantizer",
    "OscqQuantizationConfig": ".export.hf_quantizer",
    "OscqImageProcessor": ".image_processing",
    "to_model_image": ".image_processing",
    # hub
    "HubPushError": ".hub.push",
    "PushPlan": ".hub.push",
    "plan_push": ".hub.push",
    "push_to_hub": ".hub.push",
    "render_card_files": ".hub.model_card",
    "render_model_card": ".hub.model_card",
    "write_model_cards": ".hub.model_card",
    "plot_accuracy_vs_bits": ".plots",
    "plot_weight_histogram": ".plots",
    # what a recorded number was measured on
    "Provenance": ".provenance",
    # errors
    "OscqError": ".errors",
    "OscqValueError": ".errors",
    # recipe support: data sets, the paper's models, the toy model
    "DATASETS": ".scripts.data",
    "HubUnreachableError": ".scripts.data",
    "ImageDataset": ".scripts.data",
    "load_image_dataset": ".scripts.data",
    "build_image_processor": ".scripts.models",
    "build_model": ".scripts.models",
    "build_pretrained_vit": ".scripts.models",
    "build_resnet18": ".scripts.models",
    "build_vit": ".scripts.models",
    "tiny_vit_config": ".scripts.models",
    "toy_trajectory": ".scripts.toy",
}

__all__ = sorted(_PUBLIC, key=str.lower)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_oscq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _register_packed_weight(torch) -> None:
    # torch.load (weights_only=True, torch's default) may then rebuild the packed weights of a saved state dict
    importlib.import_module(".quantization.packed_tensor", __name__)


def _register_loader(module) -> None:
    importlib.import_module(".export.hf_quantizer", __name__)


def _register_image_processor(image_processing_auto) -> None:
    from .image_processing import register_image_processor

    register_image_processor(image_processing_auto)


def _register_timm_models(timm) -> None:
    from .timm_models import register_timm_models

    register_timm_models(timm)


when_imported("torch", _register_packed_weight)
when_imported("transformers.quantizers.auto", _register_loader)
when_imported("transformers.models.auto.image_processing_auto", _register_image_processor)
when_imported("timm", _register_timm_models)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time every name comes from __getattr__
    from .errors import OscqError, OscqValueError
    from .export.checkpoint import CheckpointFormatError
    from .export.folder import ExportFolderError, auto_class_for, read_export_manifest
    from .export.formats import EXPORT_FORMATS
    from .export.hf_quantizer import OscqHfQuantizer, OscqQuantizationConfig
    from .export.writer import export_quantized
    from .hub.model_card import render_card_files, render_model_card, write_model_cards
    from .hub.push import HubPushError, PushPlan, plan_push, push_to_hub
    from .image_processing import OscqImageProcessor, to_model_image
    from .plots import plot_accuracy_vs_bits, plot_weight_histogram
    from .provenance import Provenance
    from .quantization.batchnorm import recalibrate_batchnorm
    from .quantization.dampening import dampening_penalty
    from .quantization.fused import PenaltyWorkspace, fused_fake_quantize, fused_oscillation_penalty
    from .quantization.kurtosis import kurtosis_penalty
    from .quantization.packing import pack_codes, packed_size, unpack_codes
    from .quantization.penalty import oscillation_penalty
    from .quantization.primitives import compute_scale, dequantize, fake_quantize, quantize_codes
    from .quantization.ptq import cross_bit_evaluate, format_cross_bit_table, quantize_model, quantized_weights
    from .quantization.qat import fake_quantized_forward
    from .quantization.selection import output_dim, select_weights
    from .quantization.spec import ALL_LAYERS, ALL_WEIGHTS, DEFAULT_EVAL_BITS, QuantSpec, max_code, validate_bits
    from .scripts.data import DATASETS, HubUnreachableError, ImageDataset, load_image_dataset
    from .scripts.models import (
        build_image_processor,
        build_model,
        build_pretrained_vit,
        build_resnet18,
        build_vit,
        tiny_vit_config,
    )
    from .scripts.toy import toy_trajectory
    from .training.config import OscillationConfig
    from .training.methods import OSC_METHODS, TrainingMethod, get_method, register_method
    from .training.metrics import ACCURACY_METRIC, classification_metrics, compute_accuracy, load_metric
    from .training.tracking import OscillationCounter, OscillationTracker, add_oscillation_tracker
    from .training.trainer import OscillationTrainer
