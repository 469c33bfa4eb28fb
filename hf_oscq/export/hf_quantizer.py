"""Loading, quantizing on load and saving bit-packed hf_oscq checkpoints with transformers: the quantization config
and the `HfQuantizer`.

This module registers `quant_method="oscq"` with transformers. `import hf_oscq` arranges for it to be imported as
soon as transformers' quantizer registry is (see `hf_oscq/_import_hooks.py`), so the registration is in place before
any `from_pretrained` without `import hf_oscq` costing transformers' quantizer imports. A checkpoint is validated as a
whole before any weight is read (format version, bit-width, tensor names, shapes, checksum). Each packed weight then
loads as a `PackedWeight` (quantization/packed_tensor.py): the model keeps its modules and parameter names, holds the
b-bit codes and scales in memory, and dequantizes on the fly in the forward pass. `OscqQuantizationConfig(
dequantize=True)` loads plain float weights instead, and `model.dequantize()` turns a packed model into one.
`save_pretrained` / `push_to_hub` of a packed model write the same checkpoint format again. The on-disk format and
the runtime are documented in docs/EXPORT.md.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Submodules, not `transformers.quantizers`: this module may be imported while that package is still initializing.
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._compat import allow_loading_attributes, checkpoint_naming, conversion_ops_class, tied_weight_sources
from ..errors import OscqError, OscqValueError
from ..quantization.batchnorm import require_batchnorm_handling
from ..quantization.packed_tensor import SCALE_SUFFIX, PackedWeight, weight_storage_bytes
from ..quantization.primitives import check_finite
from ..quantization.selection import output_dim, select_weights
from ..quantization.spec import PER_CHANNEL, PER_TENSOR, QuantSpec
from .checkpoint import (
    FORMAT_VERSION,
    QUANT_METHOD,
    READABLE_FORMAT_VERSIONS,
    CheckpointFormatError,
    checkpoint_state_dict,
    finish_saved_folder,
    restore_guarded_fields,
    validate_checkpoint_files,
)

logger = logging.getLogger(__name__)
OUTPUT_SCALE_AXIS = "output"
LOADING_OPTIONS = ("dequantize", "plain_rounding")  # set for one load, never saved
GROUP_SIZE_ARGUMENT = "from_pretrained(..., quantization_config=OscqQuantizationConfig(group_size={}))"


class OscqQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of an hf_oscq checkpoint (the checkpoint's `QuantSpec`, the modules stored packed,
    how the export was made), and the options for loading or quantizing one.

    Loading a `w{b}` folder reads this config from its config.json. Passed to `from_pretrained`, it sets how a packed
    checkpoint loads (`dequantize`), or quantizes a float checkpoint while it loads (`bits` and the other spec
    fields): `from_pretrained(fp_dir, quantization_config=OscqQuantizationConfig(bits=3))` gives the model that
    exporting `fp_dir` at 3 bits with plain rounding and loading `w3` gives. Every setting is checked before any
    weight is read: invalid values, a group size that does not divide a selected layer's input features, and a model
    with BatchNorm layers, whose statistics rounding invalidates and which loading cannot re-estimate (export it
    with re-estimation instead, or pass `plain_rounding=True`).

    Args:
        bits: bit-width of the packed codes, in [2, 8]; needed to quantize on load.
        modules: names of the modules whose `.weight` is stored packed (the `select_weights` result); `None` when
            quantizing on load (filled in as the model loads).
        per_channel: one scale per output channel instead of one per tensor.
        format_version: version of the on-disk format; this hf_oscq writes version 2 and reads 1 and 2.
        bn_recalibrated: whether BatchNorm statistics were re-estimated with the quantized weights.
        target_modules: the `target_modules` the modules were (or are to be) selected with.
        exclude_modules: the `exclude_modules` the modules were (or are to be) selected with.
        guarded_fields: the real values of the top-level config fields that the export overwrote so that loaders
            without hf_oscq fail (see docs/EXPORT.md); restored before the model is built.
        granularity: `"per_tensor"`, `"per_channel"` or `"group"`; written since `QuantSpec`, read together with
            `per_channel` (which older checkpoints carry alone).
        group_size: input features per scale with `granularity="group"`.
        scale_axis: `"output"` in checkpoints whose per-channel and group-wise scales follow each layer's output
            dimension (GPT-2's `Conv1D` included); older checkpoints lack it, and their `Conv1D` scales ran along
            the input features, so such weights are refused on load.
        versions: the hf_oscq, torch and transformers versions that wrote the checkpoint (informational).
        dequantize: load plain float weights (`codes * scale`) instead of packed ones: float forward speed,
            fp32-sized memory, no quantization_config left on the model. A loading option, never saved.
        plain_rounding: quantizing a float checkpoint of a model with BatchNorm layers on load, round it without
            re-estimating their statistics (the paper's PTQ, which costs accuracy at low bit-widths); without it such
            a model is refused. A loading option, never saved.

    Raises:
        OscqValueError: for invalid arguments, naming them.
        CheckpointFormatError: for another format version or invalid fields in a checkpoint's config.json.
    """

    def __init__(
        self,
        bits: int | None = None,
        modules: list[str] | None = None,
        per_channel: bool = False,
        format_version: int = FORMAT_VERSION,
        bn_recalibrated: bool = False,
        target_modules: Any = None,
        exclude_modules: Any = None,
        guarded_fields: dict[str, Any] | None = None,
        granularity: str | None = None,
        versions: dict[str, str] | None = None,
        dequantize: bool = False,
        group_size: int | None = None,
        scale_axis: str | None = None,
        plain_rounding: bool = False,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.modules = list(modules) if modules is not None else None
        self.granularity = granularity or (PER_CHANNEL if per_channel else PER_TENSOR)
        self.per_channel = per_channel
        self.group_size = group_size
        self.scale_axis = scale_axis
        self.format_version = format_version
        self.bn_recalibrated = bn_recalibrated
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.guarded_fields = dict(guarded_fields or {})
        self.versions = dict(versions or {})
        self.dequantize = bool(dequantize)
        self.plain_rounding = bool(plain_rounding)
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """The config of a checkpoint's config.json (how transformers reads it): invalid fields are a
        `CheckpointFormatError` naming config.json."""
        try:
            return super().from_dict(config_dict, return_unused_kwargs, **kwargs)
        except CheckpointFormatError:
            raise
        except OscqValueError as error:
            raise CheckpointFormatError(f"Invalid quantization_config in config.json: {error}") from None

    @classmethod
    def from_spec(cls, spec: QuantSpec, modules: list[str] | None = None, **fields) -> OscqQuantizationConfig:
        """The config of a checkpoint quantized with `spec`, storing `modules` packed; `fields` are the other
        arguments (`bn_recalibrated`, `guarded_fields`, `versions`, `dequantize`). Without `modules`: the config that
        quantizes a float checkpoint with `spec` while it loads."""
        return cls(modules=modules, **spec.to_dict(), scale_axis=OUTPUT_SCALE_AXIS, **fields)

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
                "group_size": self.group_size,
            }
        )

    def post_init(self) -> None:
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            writer = self.versions.get("hf_oscq")
            writer = f" ({writer})" if writer else ""
            readable = ", ".join(map(str, READABLE_FORMAT_VERSIONS))
            raise CheckpointFormatError(
                f"This checkpoint uses hf_oscq format version {self.format_version!r}, but this hf_oscq reads "
                f"versions {readable}. Install the hf_oscq version that wrote it{writer} (or a newer one), or export "
                "it again."
            )
        # As arguments these name OscqQuantizationConfig; `from_dict` (config.json) names the file instead.
        if self.bits is not None:  # a config passed only for its loading options has no spec
            try:
                self.per_channel = self.spec.per_channel
            except ValueError as error:
                raise OscqValueError(f"OscqQuantizationConfig: {error}") from None
        if self.modules is not None and (not self.modules or not all(isinstance(m, str) for m in self.modules)):
            raise OscqValueError("OscqQuantizationConfig: `modules` must be a non-empty list of names.")

    def get_loading_attributes(self) -> dict[str, Any]:
        """The options a config passed to `from_pretrained` sets on a checkpoint's own config."""
        return {"dequantize": self.dequantize}

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for option in LOADING_OPTIONS:
            output.pop(option, None)
        return output


allow_loading_attributes(OscqQuantizationConfig)


def _single(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


class OscqDeserialize(conversion_ops_class()):
    """Turns the serialized tensors of one weight (`weight` codes + `weight_scale`) into a `PackedWeight` parameter,
    or into its float values with `dequantize=True`. Weights stored in float pass through in the model's dtype."""

    def __init__(self, hf_quantizer: OscqHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo: dict) -> OscqDeserialize:
        # transformers copies the converter for every layer; all copies report to the same quantizer
        return self

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None, **kwargs):
        try:
            return self._convert(input_dict, full_layer_name, model)
        except OscqError as error:
            return self.hf_quantizer.hold(error, {full_layer_name: model.get_parameter(full_layer_name)})

    def _convert(self, input_dict: dict[str, Any], full_layer_name: str, model) -> dict[str, Any]:
        weight, scale = _single(input_dict["weight"]), _single(input_dict.get("weight" + SCALE_SUFFIX))
        target = model.get_parameter(full_layer_name)
        stored_shape = self.hf_quantizer.packed.get(full_layer_name)
        if stored_shape is None:
            if scale is not None or not weight.is_floating_point():
                raise CheckpointFormatError(
                    f"{full_layer_name!r} is stored packed but quantization_config does not list it: export the "
                    "model again."
                )
            return {full_layer_name: weight.to(target.dtype)}  # norms, biases of Conv1D... in the requested dtype
        self.hf_quantizer.loaded.add(full_layer_name)
        if tuple(stored_shape) != tuple(target.shape):  # a new head: transformers reports it as a size mismatch
            return {full_layer_name: torch.empty(stored_shape, device="meta")}
        bits = self.hf_quantizer.quantization_config.bits
        module = model.get_submodule(full_layer_name.rpartition(".")[0])
        try:
            packed = PackedWeight.from_checkpoint(
                weight, scale, bits, target.shape, target.dtype, output_dim(module), name=full_layer_name
            )
        except OscqValueError as error:
            raise CheckpointFormatError(str(error)) from None
        if self.hf_quantizer.quantization_config.dequantize:
            return {full_layer_name: packed.dequantize()}
        return {full_layer_name: torch.nn.Parameter(packed, requires_grad=False)}


class OscqQuantize(conversion_ops_class()):
    """Quantizes one float weight of a checkpoint while it loads (`from_pretrained(..., quantization_config=...)`)."""

    def __init__(self, hf_quantizer: OscqHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None, **kwargs):
        try:
            return self._convert(input_dict, model)
        except OscqError as error:
            return self.hf_quantizer.hold(error, {name: _single(value) for name, value in input_dict.items()})

    def _convert(self, input_dict: dict[str, Any], model) -> dict[str, Any]:
        config = self.hf_quantizer.quantization_config
        converted = {}
        for name, value in input_dict.items():
            weight = _single(value)
            check_finite(weight, name)
            out_dim = output_dim(model.get_submodule(name.rpartition(".")[0]))
            packed = PackedWeight.from_float(weight, self.hf_quantizer.spec, out_dim)
            converted[name] = packed.dequantize() if config.dequantize else torch.nn.Parameter(packed, False)
        return converted


def save_packed_pretrained(model, save_directory, *args, **kwargs) -> None:
    """The one save path of a model holding packed weights (`model.config.quantization_config` saying which), for a
    loaded model's `save_pretrained` and for `export_quantized`: transformers writes the folder (config, the tensors
    of `checkpoint_state_dict` under the checkpoint names of the model's class, tied weights once), then the weights
    files get the format metadata and checksum and config.json the guarded fields (`finish_saved_folder`)."""
    with checkpoint_naming(model):
        type(model).save_pretrained(model, save_directory, *args, **kwargs)
    finish_saved_folder(save_directory, model.config.quantization_config)


@contextlib.contextmanager
def quantized_for_saving(model, quantization_config: OscqQuantizationConfig) -> Iterator[None]:
    """While active, a model built or loaded in float whose selected weights hold `PackedWeight`s saves as a
    packed checkpoint described by `quantization_config` (`save_packed_pretrained`); its quantizer and config are
    put back on exit."""
    missing = object()
    quantizer = model.__dict__.get("hf_quantizer", missing)
    previous_config = model.config.__dict__.get("quantization_config", missing)
    model.hf_quantizer = OscqHfQuantizer(quantization_config, pre_quantized=True)
    model.config.quantization_config = quantization_config
    try:
        yield
    finally:
        for owner, name, value in ((model, "hf_quantizer", quantizer), (model.config, "quantization_config",
                                                                        previous_config)):  # fmt: skip
            if value is missing:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, value)


def _save_packed_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
    """`save_pretrained` of a loaded packed model (`save_packed_pretrained`). With `push_to_hub`, the finished folder
    is what `push_to_hub` uploads."""
    hub_options = {
        key: kwargs.pop(key)
        for key in ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision", "tags")
        if key in kwargs
    }
    save_packed_pretrained(self, save_directory, *args, **kwargs)
    if push_to_hub:
        repo_id = hub_options.pop("repo_id", Path(save_directory).name)
        return self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_options)
    return None


def _packed_half(self, *args):
    """`.half()` of a packed model: every float parameter and buffer in float16, packed weights staying packed
    (transformers refuses `.half()` on quantized models whose weights cannot change dtype)."""
    return torch.nn.Module.half(self, *args)


def _packed_float(self, *args):
    """`.float()` of a packed model, as `_packed_half`."""
    return torch.nn.Module.float(self, *args)


def _packed_memory_footprint(self, return_buffers: bool = True) -> int:
    """`get_memory_footprint()` of a packed model: the bytes its parameters (and buffers) hold, packed weights
    counted by their codes and scales instead of their logical float size."""
    return weight_storage_bytes(self, buffers=return_buffers)


# Methods of a loaded packed model that differ from its class's (removed again by `model.dequantize()`).
_PACKED_METHODS = {
    "save_pretrained": _save_packed_pretrained,
    "half": _packed_half,
    "float": _packed_float,
    "get_memory_footprint": _packed_memory_footprint,
}


class OscqHfQuantizer(HfQuantizer):
    """Loads hf_oscq bit-packed checkpoints as packed weights (or float with `dequantize=True`), quantizes float
    checkpoints on load, saves packed models in the same format and dequantizes them (`model.dequantize()`)."""

    requires_calibration = False
    serialized_names = {"weight": ["weight", "weight" + SCALE_SUFFIX]}

    def __init__(self, quantization_config: OscqQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and (quantization_config.bits is None or quantization_config.modules is None):
            raise CheckpointFormatError(
                "Invalid quantization_config in config.json: it needs `bits` and `modules`. Export the model again."
            )
        if not self.pre_quantized and quantization_config.bits is None:
            raise OscqValueError(
                "Quantizing while loading needs a bit-width: from_pretrained(..., quantization_config="
                "OscqQuantizationConfig(bits=3))."
            )
        self.spec = quantization_config.spec if quantization_config.bits is not None else None
        self.packed: dict[str, tuple[int, ...]] = {}  # parameter name -> shape of the stored weight
        self.to_quantize: set[str] = set()
        self.loaded: set[str] = set()
        self.held: list[OscqError] = []  # raised while a weight loaded, raised again once loading is over

    def hold(self, error: OscqError, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keeps an error raised while a weight loads and returns placeholders of its tensors' shapes: transformers
        would turn the error into a generic one ("issues during automatic conversion") and its message into a log
        record; `_process_model_after_weight_loading` raises it once loading is over, as it is."""
        self.held.append(error)
        return {name: torch.empty(tuple(tensor.shape), dtype=tensor.dtype) for name, tensor in tensors.items()}

    def update_attn_implementation(self, config):
        # The only hook that sees the model config before the weights file is resolved and the model is built:
        # put back the fields the export overwrote to make loads without hf_oscq fail (docs/EXPORT.md).
        return restore_guarded_fields(config, self.quantization_config.guarded_fields)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized:  # every setting is checked on the model built from config.json, before loading
            weights = select_weights(model, spec=self.spec, group_size_source=GROUP_SIZE_ARGUMENT)
            require_batchnorm_handling(
                model,
                plain_rounding=config.plain_rounding,
                ways_out="export it with re-estimation (hf_oscq.export_quantized(model, OUT, bits=..., "
                "calibration_batches=...) or `hf-oscq export FOLDER --dataset NAME`) and load its w{b} folder, or "
                "pass OscqQuantizationConfig(..., plain_rounding=True) to round it plainly (the paper's PTQ).",
            )
            # A tied copy (lm_head of tied embeddings) is the weight it is tied to: the checkpoint, and the file
            # save_pretrained writes, hold it once, under that weight's name.
            tied = tied_weight_sources(model)
            names = list(dict.fromkeys(tied.get(name, name) for name in weights))
            self.to_quantize = set(names)
            config.modules = [name.removesuffix(".weight") for name in names]
            config.scale_axis = OUTPUT_SCALE_AXIS
            return model
        if not checkpoint_files:
            raise CheckpointFormatError("hf_oscq checkpoints load from their model.safetensors file; none was found.")
        self.packed = validate_checkpoint_files(checkpoint_files, config, model)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return param_name in self.to_quantize

    def get_quantize_ops(self) -> OscqQuantize:
        return OscqQuantize(self)

    def get_load_operations(self) -> dict:
        # One op for both modes: it reads `quantization_config.dequantize` itself. Listed as "dequantize" too, so that
        # model-specific converters (fused or renamed weights) receive float weights.
        return {"deserialize": OscqDeserialize, "dequantize": OscqDeserialize}

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.held:
            raise self.held[0]
        missing = sorted(set(self.packed) - self.loaded)
        if missing:
            raise CheckpointFormatError(
                f"The checkpoint holds no packed weights for {missing[:5]} although quantization_config lists them: "
                "the file is incomplete. Export the model again."
            )
        # The loading ops are not renamings to revert when saving: the saved names are the model's own.
        model._weight_conversions = [
            conversion
            for conversion in getattr(model, "_weight_conversions", None) or []
            if not any(isinstance(op, OscqDeserialize | OscqQuantize) for op in getattr(conversion, "operations", ()))
        ]
        if self.quantization_config.dequantize:
            if not self.pre_quantized:  # the rounded float model: nothing left to save in the packed format
                self.remove_quantization_config(model)
            return model
        # transformers has no hook after it writes a folder; the packed format also needs the checksum and the
        # guarded config.json fields there, so the model's own save_pretrained finishes the folder it wrote. Casts
        # and the memory footprint are the packed weights' own too (_PACKED_METHODS).
        for name, method in _PACKED_METHODS.items():
            setattr(model, name, types.MethodType(method, model))
        return model

    def get_state_dict_and_metadata(self, model):
        return checkpoint_state_dict(model), {}

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        # Bytes per weight of a packed weight (its codes; scales are a few percent more), for transformers' and
        # accelerate's device-map and memory estimates.
        if param_name in self.packed or param_name in self.to_quantize:
            return self.quantization_config.bits / 8
        return super().param_element_size(model, param_name, param)

    def _dequantize(self, model, dtype=None):
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        replaced: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for attribute, parameter in module._parameters.items():
                if isinstance(parameter, PackedWeight):
                    if id(parameter) not in replaced:  # tied weights stay one parameter
                        values = parameter.dequantize(dtype if dtype is not None else parameter.dtype)
                        replaced[id(parameter)] = torch.nn.Parameter(values, requires_grad=True)
                    module._parameters[attribute] = replaced[id(parameter)]
        for name in _PACKED_METHODS:
            model.__dict__.pop(name, None)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Packed codes are read-only; model.dequantize() gives trainable float weights.
        return False


register_quantization_config(QUANT_METHOD)(OscqQuantizationConfig)
register_quantizer(QUANT_METHOD)(OscqHfQuantizer)
