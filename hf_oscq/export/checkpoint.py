"""The on-disk format of a bit-packed hf_oscq checkpoint: tensor names, shapes, metadata, checksum, load guards.

Writing and validating live together so that they cannot drift apart; docs/EXPORT.md describes the same format
in prose. Only safetensors are read or written, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from .._compat import checkpoint_to_model_names
from ..errors import OscqValueError
from ..quantization.packing import packed_size
from ..quantization.spec import QuantSpec
from ..versions import library_versions

QUANT_METHOD = "oscq"
FORMAT_VERSION = 1
SCALE_SUFFIX = "_scale"  # "conv1.weight" holds the packed codes, "conv1.weight_scale" the scale(s)
VERSION_KEY = "{library}_version"  # safetensors metadata: "hf_oscq_version", "torch_version", "transformers_version"

# Values written over top-level config.json fields, so that loaders without hf_oscq stop with an error naming
# it: transformers reads `transformers_weights` as the weights file name and rejects one that does not end in
# .safetensors, quoting it; timm's `local-dir:` loader rejects an unknown `architecture`, quoting it.
TRANSFORMERS_GUARD = (
    "model.safetensors holds bit-packed hf_oscq weights: run `import hf_oscq` (pip install hf_oscq) before "
    "from_pretrained"
)
TIMM_GUARD = (
    "{architecture} with bit-packed hf_oscq weights: run `import hf_oscq` and load the folder with transformers' "
    "AutoModelForImageClassification.from_pretrained"
)


class CheckpointFormatError(OscqValueError):
    """A bit-packed checkpoint that cannot be loaded correctly (corrupted, truncated, or inconsistent)."""


def packed_shape(weight_shape: Iterable[int], bits: int) -> tuple[int, ...]:
    """Shape of the stored codes: `(bytes,)`, or `(1, bytes)` for a 1-D weight.

    The number of dimensions always differs from the weight's, so a plain `load_state_dict` (strict or not)
    raises a size mismatch instead of copying codes into a float weight.
    """
    shape = tuple(weight_shape)
    size = packed_size(math.prod(shape), bits)
    return (1, size) if len(shape) == 1 else (size,)


def scale_shape(weight_shape: Iterable[int], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the stored scale: `()` per tensor, `(out, 1, ..., 1)` per channel (as `compute_scale` returns)."""
    shape = tuple(weight_shape)
    if spec.per_channel and len(shape) > 0:
        return (shape[0],) + (1,) * (len(shape) - 1)
    return ()


def guard_config(config: dict[str, Any]) -> dict[str, Any]:
    """Overwrites the guarded fields of a `config.json` dict in place; returns their real values to restore."""
    guarded = {"transformers_weights": config.get("transformers_weights")}
    config["transformers_weights"] = TRANSFORMERS_GUARD
    if isinstance(config.get("architecture"), str):  # timm models (transformers' TimmWrapper)
        guarded["architecture"] = config["architecture"]
        config["architecture"] = TIMM_GUARD.format(architecture=config["architecture"])
    return guarded


def _data_offset(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def serialize_checkpoint(tensors: Mapping[str, torch.Tensor], bits: int) -> bytes:
    """The safetensors bytes of a checkpoint, with format metadata (format version, bit-width, the hf_oscq, torch and
    transformers versions that wrote it) and a SHA-256 of the tensor data."""
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    metadata = {"format": "pt", "oscq_format_version": str(FORMAT_VERSION), "oscq_bits": str(bits)}
    metadata |= {VERSION_KEY.format(library=name): version for name, version in library_versions().items()}
    draft = serialize(tensors, metadata=metadata)
    metadata["oscq_sha256"] = hashlib.sha256(memoryview(draft)[_data_offset(draft) :]).hexdigest()
    return serialize(tensors, metadata=metadata)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(int.from_bytes(handle.read(8), "little"), 1)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    fix = "Export the model again with hf_oscq.export_quantized (or `hf-oscq export`), or download the file again."
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            entries = {}
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                entries[name] = (tensor_slice.get_dtype(), tuple(tensor_slice.get_shape()))
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise CheckpointFormatError(
            f"{path} is not a readable safetensors file ({error}): it is truncated or corrupted. {fix}"
        ) from None
    if metadata.get("oscq_sha256") != _file_digest(path):
        raise CheckpointFormatError(
            f"{path} is corrupted or truncated: its tensor data does not match its checksum. {fix}"
        )
    return metadata, entries


def validate_checkpoint_files(files: Iterable[str | Path], quantization_config: Any, model: torch.nn.Module) -> None:
    """Checks checkpoint files against their `quantization_config` and the model before any weight is loaded.

    Raises:
        CheckpointFormatError: naming the file or tensor at fault and how to fix it.
    """
    spec = quantization_config.spec
    bits = spec.bits
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in map(Path, files):
        metadata, file_entries = _read_header(path)
        if metadata.get("oscq_format_version") != str(FORMAT_VERSION):
            writer = metadata.get(VERSION_KEY.format(library="hf_oscq"))
            writer = f" ({writer})" if writer else ""
            raise CheckpointFormatError(
                f"{path} has hf_oscq format version {metadata.get('oscq_format_version')!r}; this hf_oscq reads "
                f"version {FORMAT_VERSION}. Install the hf_oscq version that wrote it{writer}, or export it again."
            )
        if metadata.get("oscq_bits") != str(bits):
            raise CheckpointFormatError(
                f"Bit-width mismatch: config.json says bits={bits} but the tensors in {path} were packed at "
                f"{metadata.get('oscq_bits')!r} bits. The folder mixes files from two exports: export it again."
            )
        entries.update(file_entries)
    if hasattr(model, "config"):
        entries = checkpoint_to_model_names(entries, model, SCALE_SUFFIX)
    listed = set()
    for module in quantization_config.modules:
        name = f"{module}.weight"
        listed.add(name)
        try:
            weight_shape = tuple(model.get_parameter(name).shape)
        except AttributeError:
            raise CheckpointFormatError(
                f"quantization_config lists module {module!r}, but the model built from config.json has no parameter "
                f"{name!r}: config.json and the weights come from different models. Export the model again."
            ) from None
        expected = {
            name: ("U8", packed_shape(weight_shape, bits)),
            name + SCALE_SUFFIX: (None, scale_shape(weight_shape, spec)),
        }
        for key, (dtype, shape) in expected.items():
            if key not in entries:
                raise CheckpointFormatError(
                    f"The checkpoint has no tensor {key!r}, which quantization_config requires."
                )
            found_dtype, found_shape = entries[key]
            if found_shape != shape or (dtype is not None and found_dtype != dtype):
                raise CheckpointFormatError(
                    f"Tensor {key!r} has dtype {found_dtype} and shape {list(found_shape)}, but a weight of shape "
                    f"{list(weight_shape)} at bits={bits} ({spec.granularity}) needs "
                    f"{dtype or 'a float dtype'} and shape {list(shape)}: the codes do not match config.json."
                )
    stray = sorted(
        key
        for key in entries
        if key.endswith(".weight" + SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) not in listed
    )
    if stray:
        raise CheckpointFormatError(
            f"The checkpoint holds scales for modules that quantization_config does not list: {stray[:5]}. "
            "config.json and the weights come from different exports: export the model again."
        )


def read_config(folder: str | Path) -> dict[str, Any]:
    """The `config.json` of a folder as a dict."""
    return json.loads((Path(folder) / "config.json").read_text())
