"""Loading bit-packed hf_oscq checkpoints with `from_pretrained`: the quantization config and `HfQuantizer`.

This module registers `quant_method="oscq"` with transformers. `import hf_oscq` arranges for it to be imported as
soon as transformers' quantizer registry is (see `hf_oscq/_import_hooks.py`), so the registration is in place before
any `from_pretrained` without `import hf_oscq` costing transformers' quantizer imports. A checkpoint is validated as a
whole before any weight is read (format version, bit-width, tensor names, shapes, checksum); then every packed weight
is unpacked and dequantized while it loads, so the model transformers returns is a plain float model holding exactly
the PTQ'd weights. The on-disk format is documented in docs/EXPORT.md.
"""

from __future__ import annotations

import logging
from typing import Any

# Submodules, not `transformers.quantizers`: this module may be imported while that package is still initializing.
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._compat import conversion_ops_class
from ..quantization.packing import unpack_codes
from ..quantization.primitives import dequantize
from ..quantization.spec import PER_CHANNEL, PER_TENSOR, QuantSpec
from .checkpoint import (
    FORMAT_VERSION,
    QUANT_METHOD,
    SCALE_SUFFIX,
    CheckpointFormatError,
    validate_checkpoint_files,
)

logger = logging.getLogger(__name__)


class OscqQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of a checkpoint written by `hf_oscq.export_quantized`: the checkpoint's
    `QuantSpec` (`spec`), the modules stored packed, and how the export was made.

    Args:
        bits: bit-width of the packed codes, in [2, 8].
        modules: names of the modules whose `.weight` is stored packed (the `select_weights` result).
        per_channel: one scale per output channel instead of one per tensor.
        format_version: version of the on-disk format; this hf_oscq reads version 1.
        bn_recalibrated: whether BatchNorm statistics were re-estimated with the quantized weights.
        target_modules: the `target_modules` the modules were selected with (informational).
        exclude_modules: the `exclude_modules` the modules were selected with (informational).
        guarded_fields: the real values of the top-level config fields that the export overwrote so that loaders
            without hf_oscq fail (see docs/EXPORT.md); restored before the model is built.
        granularity: `"per_tensor"` or `"per_channel"`; written since `QuantSpec`, read together with
            `per_channel` (which older checkpoints carry alone).
        versions: the hf_oscq, torch and transformers versions that wrote the checkpoint (informational).

    Raises:
        CheckpointFormatError: for another format version or invalid fields.
    """

    def __init__(
        self,
        bits: int,
        modules: list[str],
        per_channel: bool = False,
        format_version: int = FORMAT_VERSION,
        bn_recalibrated: bool = False,
        target_modules: Any = None,
        exclude_modules: Any = None,
        guarded_fields: dict[str, Any] | None = None,
        granularity: str | None = None,
        versions: dict[str, str] | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.modules = list(modules)
        self.granularity = granularity or (PER_CHANNEL if per_channel else PER_TENSOR)
        self.per_channel = per_channel
        self.format_version = format_version
        self.bn_recalibrated = bn_recalibrated
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.guarded_fields = dict(guarded_fields or {})
        self.versions = dict(versions or {})
        # The weights are always dequantized at load: the returned model is a plain float model.
        self.dequantize = True
        self.post_init()

    @classmethod
    def from_spec(cls, spec: QuantSpec, modules: list[str], **fields) -> OscqQuantizationConfig:
        """The config of a checkpoint quantized with `spec`, storing `modules` packed; `fields` are the other
        arguments (`bn_recalibrated`, `guarded_fields`, `versions`)."""
        return cls(modules=modules, **spec.to_dict(), **fields)

    @property
    def spec(self) -> QuantSpec:
        """The checkpoint's `QuantSpec`."""
        return QuantSpec.from_dict(
            {
                "bits": self.bits,
                "granularity": self.granularity,
                "per_channel": self.per_channel,
                "target_modules": self.target_modules,
                "exclude_modules": self.exclude_modules,
            }
        )

    def post_init(self) -> None:
        if self.format_version != FORMAT_VERSION:
            writer = self.versions.get("hf_oscq")
            raise CheckpointFormatError(
                f"This checkpoint uses hf_oscq format version {self.format_version!r}, but this hf_oscq reads version "
                f"{FORMAT_VERSION}. Install the hf_oscq version that wrote it{f' ({writer})' if writer else ''} (or a "
                "newer one), or export it again."
            )
        try:
            self.per_channel = self.spec.per_channel
        except ValueError as error:
            raise CheckpointFormatError(f"Invalid quantization_config in config.json: {error}") from None
        if not self.modules or not all(isinstance(name, str) for name in self.modules):
            raise CheckpointFormatError(
                "Invalid quantization_config in config.json: `modules` must be a non-empty list of names."
            )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("dequantize", None)
        return output


class OscqDequantize(conversion_ops_class()):
    """Turns the serialized tensors of one module (`weight` codes + `weight_scale`) into its float weight."""

    def __init__(self, hf_quantizer: OscqHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo: dict) -> OscqDequantize:
        # transformers copies the converter for every layer; all copies report to the same quantizer
        return self

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None, **kwargs):
        tensors = {name: value[0] if isinstance(value, list) else value for name, value in input_dict.items()}
        weight = tensors["weight"]
        quantized = full_layer_name.removesuffix(".weight") in self.hf_quantizer.modules
        if not quantized and "weight" + SCALE_SUFFIX not in tensors and weight.is_floating_point():
            return {full_layer_name: weight}  # a float weight that was not quantized (norms, ...)
        if not quantized or "weight" + SCALE_SUFFIX not in tensors:
            raise CheckpointFormatError(
                f"{full_layer_name!r} is stored {'packed' if quantized else 'as ' + str(weight.dtype)} but "
                f"quantization_config {'lists' if quantized else 'does not list'} it"
                f"{' and its scale is missing' if quantized else ''}: export the model again."
            )
        target = model.get_parameter(full_layer_name)
        codes = unpack_codes(weight.reshape(-1), self.hf_quantizer.quantization_config.bits, target.shape)
        self.hf_quantizer.loaded.add(full_layer_name.removesuffix(".weight"))
        return {full_layer_name: dequantize(codes, tensors["weight" + SCALE_SUFFIX]).to(target.dtype)}


class OscqHfQuantizer(HfQuantizer):
    """Loads hf_oscq bit-packed checkpoints; the weights are unpacked and dequantized while they load."""

    requires_calibration = True  # only pre-quantized checkpoints: quantizing on the fly is `quantize_model`'s job
    serialized_names = {"weight": ["weight", "weight" + SCALE_SUFFIX]}

    def __init__(self, quantization_config: OscqQuantizationConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise CheckpointFormatError(
                "OscqQuantizationConfig loads checkpoints written by hf_oscq.export_quantized; it cannot quantize a "
                "float model while loading. Use hf_oscq.quantize_model(model, bits) for that."
            )
        super().__init__(quantization_config, **kwargs)
        self.modules = set(quantization_config.modules)
        self.loaded: set[str] = set()

    def update_attn_implementation(self, config):
        # The only hook that sees the model config before the weights file is resolved and the model is built:
        # put back the fields the export overwrote to make loads without hf_oscq fail (docs/EXPORT.md).
        for field, value in self.quantization_config.guarded_fields.items():
            if value is None:
                if hasattr(config, field):
                    delattr(config, field)
            else:
                setattr(config, field, value)
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise CheckpointFormatError("hf_oscq checkpoints load from their model.safetensors file; none was found.")
        validate_checkpoint_files(checkpoint_files, self.quantization_config, model)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = sorted(self.modules - self.loaded)
        if missing:
            raise CheckpointFormatError(
                f"The checkpoint holds no packed weights for {missing[:5]} although quantization_config lists them: "
                "the file is incomplete. Export the model again."
            )
        return model

    def get_load_operations(self) -> dict:
        return {"dequantize": OscqDequantize}

    def is_serializable(self) -> bool:
        # After loading, the model is a plain float model; saving it writes float weights.
        return True

    @property
    def is_trainable(self) -> bool:
        return True


register_quantization_config(QUANT_METHOD)(OscqQuantizationConfig)
register_quantizer(QUANT_METHOD)(OscqHfQuantizer)
