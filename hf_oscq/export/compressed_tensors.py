"""Export folders in the compressed-tensors `pack-quantized` format, which transformers (with the `compressed-tensors`
package) and vLLM load without hf_oscq.

hf_oscq's grid, integer codes in [-(2**(b-1) - 1), 2**(b-1) - 1] times a max-magnitude scale, is a subset of
compressed-tensors' symmetric integer grid ([-2**(b-1), 2**(b-1) - 1] times a scale), so each weight is written
exactly: its codes are those `quantize_codes` gives, packed by compressed-tensors' own compressor
(`PackedQuantizationCompressor`: `weight_packed` int32 words, `weight_scale`, `weight_shape`), and config.json carries
compressed-tensors' `quantization_config` (`quant_method: compressed-tensors`, `format: pack-quantized`, strategy
tensor / channel / group with its group size, every module of the targeted types left in float listed in `ignore`).

What the format and its loaders hold, and what is refused at export time (`check_compressed_tensors_model`):
* Only `nn.Linear` weights (and subclasses). compressed-tensors quantizes Linear and Embedding modules and skips every
  other type, so the packed tensors of a convolution or GPT-2's `Conv1D` would be ignored and the layer initialized at
  random; transformers' loader cannot build a quantized Embedding (its weight initialization reads `weight`, which
  the packed layout replaces), and vLLM quantizes linear layers only.
* No weight tied to another module's (a language model's `lm_head` tied to its input embeddings): transformers'
  loader fails on it.
* A float32 model loads with exactly `quantize_model`'s weights. A float16 / bfloat16 model loads with its scales in
  that dtype (both loaders keep scales in the model's dtype), so its weights differ from hf_oscq's by the scale's
  rounding; the export says so in its log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save as serialize
from torch import nn

from .._compat import remove_tied_weights, revert_checkpoint_names
from ..errors import OscqValueError
from ..quantization.batchnorm import counted
from ..quantization.layout import scale_shape
from ..quantization.primitives import nonzero_scale, quantize_codes
from ..quantization.ptq import quantized_weights
from ..quantization.selection import select_weights
from ..quantization.spec import GROUP, PER_CHANNEL, PER_TENSOR, QuantSpec
from ..timm_models import CIFAR_RESNET18
from ..versions import library_versions
from .checkpoint import VERSION_KEY, _sorted_metadata, read_config, write_config
from .digest import CONFIG_KEY, DIGEST_KEY, blob_digest, config_record
from .folder import WEIGHTS_NAME
from .formats import COMPRESSED_TENSORS_FORMAT, check_export_format

logger = logging.getLogger(__name__)

PACK_QUANTIZED = "pack-quantized"
INSTALL_COMPRESSED_TENSORS = "pip install compressed-tensors (or hf_oscq[serve])"
STRATEGIES = {PER_TENSOR: "tensor", PER_CHANNEL: "channel", GROUP: "group"}
# The checksum's definition (digest.py): header and data, as format version 2 of hf_oscq's own files.
DIGEST_VERSION = 2


def require_compressed_tensors() -> ModuleType:
    """The `compressed_tensors` package.

    Raises:
        OscqValueError: when it is not installed, saying how to install it.
    """
    try:
        import compressed_tensors
    except ImportError:
        raise OscqValueError(
            f"The compressed-tensors format needs the compressed-tensors package: {INSTALL_COMPRESSED_TENSORS}."
        ) from None
    return compressed_tensors


def compressed_tensors_versions() -> dict[str, str]:
    """`library_versions()` and the compressed-tensors version that writes the checkpoints."""
    return {**library_versions(), "compressed_tensors": require_compressed_tensors().__version__}


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def check_compressed_tensors_model(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Refuses, before anything is written, what the compressed-tensors format or its loaders cannot hold: a timm
    architecture that only hf_oscq defines (`resnet18_cifar`: no loader without hf_oscq can build the model), selected
    weights of layers other than `nn.Linear`, and selected weights tied to another module's (see the module docstring
    for why). Logs a warning for float16 / bfloat16 weights, whose loaded scales are rounded to that dtype.

    Args:
        model: the model to export.
        weights: the selected weights (`select_weights`), by parameter name.

    Raises:
        OscqValueError: naming what cannot be held and what to do; or when compressed-tensors is missing.
    """
    require_compressed_tensors()
    architecture = getattr(getattr(model, "config", None), "architecture", None)
    if architecture == CIFAR_RESNET18:
        raise OscqValueError(
            f"The model is timm's {architecture!r}, an architecture hf_oscq defines (hf_oscq.timm_models): neither "
            "transformers nor vLLM can build it without `import hf_oscq`, which the compressed-tensors format exists "
            "to avoid. Export format='oscq', or train timm's resnet18 (the recipes' --cifar_stem false)."
        )
    modules = {name: model.get_submodule(name.rpartition(".")[0]) for name in weights}
    other = [f"{name.rpartition('.')[0]} ({type(module).__name__})" for name, module in modules.items()]
    other = [text for text, module in zip(other, modules.values()) if not isinstance(module, nn.Linear)]
    if other:
        raise OscqValueError(
            f"The compressed-tensors format holds quantized weights of Linear layers only (its loaders in "
            f"transformers and vLLM quantize no convolution, GPT-2 Conv1D or embedding), but {len(other)} selected "
            f"{'layer is' if len(other) == 1 else 'layers are'} not Linear: {_shown(other)}. Leave them in float with "
            "exclude_modules=[...] (hf-oscq export --exclude_modules ...), or export format='oscq', which holds every "
            "layer type."
        )
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module_name)
    tied = [(name, owners[id(weight)]) for name, weight in weights.items() if len(set(owners[id(weight)])) > 1]
    if tied:
        name, shared = tied[0]
        raise OscqValueError(
            f"The weight of {' and '.join(sorted(set(shared)))} is one tied parameter, which compressed-tensors "
            f"cannot store quantized (transformers' loader fails on it): leave {name.rpartition('.')[0]} in float "
            "with exclude_modules=[...] (a language model's default selection leaves lm_head and the embeddings in "
            "float), or export format='oscq'."
        )
    halves = sorted(
        {str(weight.dtype) for weight in weights.values() if weight.dtype in (torch.float16, torch.bfloat16)}
    )
    if halves:
        logger.warning(
            "The model's weights are %s: transformers and vLLM keep compressed-tensors scales in the model's dtype, "
            "so the loaded weights differ from hf_oscq's (float32 scales) by the rounding of each scale to it.",
            " and ".join(halves),
        )


def check_export_fits(model: nn.Module, spec: QuantSpec, format: str) -> None:
    """Refuses, before any training, a model and spec that an export in `format` cannot hold (the recipes call it
    on the model they are about to train, so that a refusal does not wait for the end of the run).

    Raises:
        OscqValueError: as `check_compressed_tensors_model`, for the compressed-tensors format.
    """
    if check_export_format(format) == COMPRESSED_TENSORS_FORMAT:
        check_compressed_tensors_model(model, select_weights(model, spec=spec))


def quantization_scheme(spec: QuantSpec) -> Any:
    """compressed-tensors' `QuantizationScheme` of `spec` for Linear layers: symmetric integer weights of `spec.bits`
    bits, strategy tensor / channel / group (with `spec.group_size`), no activation quantization."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=True,
        strategy=STRATEGIES[spec.granularity],
        group_size=spec.group_size,
    )
    return QuantizationScheme(targets=["Linear"], weights=weights)


def quantization_config(model: nn.Module, spec: QuantSpec, quantized: Iterable[str]) -> Any:
    """compressed-tensors' `QuantizationConfig` of an export: one config group targeting `Linear` (subclasses
    included, as compressed-tensors and vLLM match type names), every Linear layer left in float in `ignore`, status
    compressed, format pack-quantized.

    Args:
        model: the exported model.
        spec: the bit-width's spec.
        quantized: the names of the quantized modules (`"model.layers.0.mlp.up_proj"`).
    """
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    quantized = set(quantized)
    ignore = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in quantized
    ]
    return QuantizationConfig(
        config_groups={"group_0": quantization_scheme(spec)},
        format=PACK_QUANTIZED,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def compress_weight(weight: torch.Tensor, spec: QuantSpec, scheme: Any) -> dict[str, torch.Tensor]:
    """One Linear weight `(out, in)` in compressed-tensors' pack-quantized tensors, with hf_oscq's codes and scales.

    compressed-tensors' compressor rounds `weight / weight_scale` and packs the codes; given hf_oscq's scale it
    rounds exactly as `quantize_codes`. A scale of 0 (an all-zero scale group, codes 0) is stored as 1, since
    compressed-tensors divides by it; the weights it gives are the same zeros.

    Returns:
        `{"weight_packed": int32 (out, ceil(in * bits / 32)), "weight_scale": (1,) per tensor, (out, 1) per channel,
        (out, in // group_size) group-wise, in the scale dtype (`scale_dtype`), "weight_shape": int64 (2,)}`.

    Raises:
        OscqValueError: when the packed codes would differ from hf_oscq's (a compressed-tensors version that rounds or
            packs otherwise).
    """
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    codes, scale = quantize_codes(weight, spec=spec, out_dim=0)  # Linear weights only: (out, in)
    stored = nonzero_scale(scale).reshape((1,) if spec.per_tensor else scale_shape(weight.shape, spec))
    compressed = PackedQuantizationCompressor.compress(
        {"weight": weight.detach().to(scale.dtype), "weight_scale": stored}, scheme
    )
    if not torch.equal(unpack_from_int32(compressed["weight_packed"], spec.bits, weight.shape), codes):
        raise OscqValueError(
            "compressed-tensors packed codes that differ from hf_oscq's: this compressed-tensors version rounds or "
            "packs otherwise. Install the version this hf_oscq was tested with, or export format='oscq'."
        )
    return {key: value.detach().cpu().contiguous() for key, value in compressed.items()}


def _checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor], packed: set[str]) -> dict:
    """Model-side names -> the names `save_pretrained` writes; every packed tensor must keep its own."""
    renamed = revert_checkpoint_names(model, tensors) if hasattr(model, "config") else tensors
    identity = {id(tensor) for tensor in renamed.values()}
    lost = sorted(name for name in packed if id(tensors[name]) not in identity)
    if lost:
        raise OscqValueError(
            f"This model converts the weights {lost[:5]} when saving (fused or split tensors), so they cannot be "
            "stored packed one by one: exclude them with exclude_modules=[...]."
        )
    return renamed


def serialize_compressed_tensors(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> bytes:
    """The safetensors bytes of a compressed-tensors checkpoint: the tensors, metadata naming the writing library
    versions, the record of `config` (the folder's config.json as written) and the checksum of header and data
    (`digest.py`), which `hf-oscq push` checks; loaders read the tensors alone."""
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    metadata = {"format": "pt", CONFIG_KEY: config_record(config)}
    metadata |= {VERSION_KEY.format(library=name): version for name, version in compressed_tensors_versions().items()}
    metadata[DIGEST_KEY] = blob_digest(serialize(tensors, metadata=metadata), DIGEST_VERSION)
    return _sorted_metadata(serialize(tensors, metadata=metadata))


def _copy(tensor: torch.Tensor, restored: bool) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return tensor.clone() if restored else tensor


def write_compressed_tensors_variant(
    model: nn.Module,
    fp_dir: Path,
    folder: Path,
    spec: QuantSpec,
    weights: Mapping[str, nn.Parameter],
    calibration_batches: Iterable | Callable[[], Iterable] | None,
    bn_recalibrated: bool,
    versions: dict[str, str],
) -> int:
    """Writes one bit-width's folder in the compressed-tensors format (config.json, model.safetensors, side files):
    `export_quantized(..., format="compressed-tensors")`'s counterpart of its packed-format writer, with the same
    arguments.

    Returns:
        The number of images BatchNorm was re-estimated on (0 without re-estimation).
    """
    from compressed_tensors.compressors import ModelCompressor

    folder.mkdir()
    counts: list[int] = []
    recalibration = contextlib.nullcontext()
    if bn_recalibrated:
        batches = calibration_batches() if callable(calibration_batches) else calibration_batches
        recalibration = quantized_weights(model, calibration_batches=counted(batches, counts), spec=spec)
    with recalibration:  # the re-estimated statistics are restored on exit: copy what is stored in float
        live = model.state_dict()
        kept = set(remove_tied_weights(model, live))
        state = {key: _copy(live[key], bn_recalibrated) for key in kept if key not in weights}
    scheme = quantization_scheme(spec)
    tensors, packed = {}, set()
    for name, weight in weights.items():
        module = name.removesuffix(".weight")
        for key, value in compress_weight(weight, spec, scheme).items():
            tensors[f"{module}.{key}"] = value
            packed.add(f"{module}.{key}")
    tensors |= state
    tensors = _checkpoint_names(model, tensors, packed)

    config = read_config(fp_dir)
    config.pop("quantization_config", None)
    write_config(folder, config)
    # compressed-tensors writes its own quantization_config, as llm-compressor's exports carry it
    ModelCompressor(
        quantization_config=quantization_config(model, spec, [n.removesuffix(".weight") for n in weights])
    ).update_config(str(folder))
    config = write_config(folder, read_config(folder))
    (folder / WEIGHTS_NAME).write_bytes(serialize_compressed_tensors(tensors, config))
    for extra in fp_dir.iterdir():  # image processor, tokenizer and other side files: each folder works on its own
        if extra.is_file() and extra.name != "config.json" and not extra.name.startswith("model"):
            (folder / extra.name).write_bytes(extra.read_bytes())
    return sum(counts)
