"""hf_oscq: oscillation-regularized training for robust low-bit post-training quantization, on Hugging Face."""

from .config import OSC_METHODS, OscillationConfig
from .export import export_quantized
from .export_manifest import ExportFolderError, read_export_manifest
from .hf_quantizer import OscqHfQuantizer, OscqQuantizationConfig
from .hub import HubPushError, PushPlan, plan_push, push_to_hub
from .model_card import render_card_files, render_model_card, write_model_cards
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
from .quantizer import compute_scale, dequantize, fake_quantize, max_code, quantize_codes, validate_bits
from .selection import ALL_WEIGHTS, select_weights
from .trainer import OscillationTrainer

__version__ = "0.1.0"

__all__ = [
    "OscqHfQuantizer",
    "OscqQuantizationConfig",
    "export_quantized",
    "pack_codes",
    "packed_size",
    "unpack_codes",
    "ALL_WEIGHTS",
    "DEFAULT_EVAL_BITS",
    "OSC_METHODS",
    "OscillationConfig",
    "OscillationTrainer",
    "PenaltyWorkspace",
    "compute_scale",
    "cross_bit_evaluate",
    "dequantize",
    "fake_quantize",
    "fake_quantized_forward",
    "format_cross_bit_table",
    "fused_oscillation_penalty",
    "max_code",
    "oscillation_penalty",
    "quantize_codes",
    "quantize_model",
    "quantized_weights",
    "recalibrate_batchnorm",
    "select_weights",
    "ExportFolderError",
    "HubPushError",
    "PushPlan",
    "plan_push",
    "plot_accuracy_vs_bits",
    "plot_weight_histogram",
    "push_to_hub",
    "read_export_manifest",
    "render_card_files",
    "render_model_card",
    "write_model_cards",
    "validate_bits",
]
