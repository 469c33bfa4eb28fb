"""hf_oscq: oscillation-regularized training for robust low-bit post-training quantization, on Hugging Face."""

from .config import OSC_METHODS, OscillationConfig
from .data import DATASETS, HubUnreachableError, ImageDataset, load_image_dataset
from .export import export_quantized
from .export_manifest import ExportFolderError, read_export_manifest
from .hf_quantizer import OscqHfQuantizer, OscqQuantizationConfig
from .hub import HubPushError, PushPlan, plan_push, push_to_hub
from .model_card import render_card_files, render_model_card, write_model_cards
from .models import (
    build_image_processor,
    build_model,
    build_pretrained_vit,
    build_resnet18,
    build_vit,
    tiny_vit_config,
)
from .packing import pack_codes, packed_size, unpack_codes
from .penalty import PenaltyWorkspace, fused_oscillation_penalty, oscillation_penalty
from .plots import plot_accuracy_vs_bits, plot_weight_histogram
from .ptq import (
    DEFAULT_EVAL_BITS,
    cross_bit_evaluate,
    format_cross_bit_table,
    quantize_model,
    quantized_weights,
    recalibrate_batchnorm,
)
from .qat import fake_quantized_forward
from .quantizer import (
    compute_scale,
    dequantize,
    fake_quantize,
    fused_fake_quantize,
    max_code,
    quantize_codes,
    validate_bits,
)
from .selection import ALL_WEIGHTS, select_weights
from .toy import toy_trajectory
from .tracking import OscillationCounter, OscillationTracker, add_oscillation_tracker
from .trainer import OscillationTrainer

__version__ = "0.1.0"

__all__ = [
    "add_oscillation_tracker",
    "ALL_WEIGHTS",
    "build_image_processor",
    "build_model",
    "build_pretrained_vit",
    "build_resnet18",
    "build_vit",
    "compute_scale",
    "cross_bit_evaluate",
    "DATASETS",
    "DEFAULT_EVAL_BITS",
    "dequantize",
    "export_quantized",
    "ExportFolderError",
    "fake_quantize",
    "fake_quantized_forward",
    "format_cross_bit_table",
    "fused_fake_quantize",
    "fused_oscillation_penalty",
    "HubPushError",
    "HubUnreachableError",
    "ImageDataset",
    "load_image_dataset",
    "max_code",
    "OSC_METHODS",
    "oscillation_penalty",
    "OscillationConfig",
    "OscillationCounter",
    "OscillationTracker",
    "OscillationTrainer",
    "OscqHfQuantizer",
    "OscqQuantizationConfig",
    "pack_codes",
    "packed_size",
    "PenaltyWorkspace",
    "plan_push",
    "plot_accuracy_vs_bits",
    "plot_weight_histogram",
    "push_to_hub",
    "PushPlan",
    "quantize_codes",
    "quantize_model",
    "quantized_weights",
    "read_export_manifest",
    "recalibrate_batchnorm",
    "render_card_files",
    "render_model_card",
    "select_weights",
    "tiny_vit_config",
    "toy_trajectory",
    "unpack_codes",
    "validate_bits",
    "write_model_cards",
]
