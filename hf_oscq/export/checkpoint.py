"""The on-disk format of a bit-packed hf_oscq checkpoint: tensor names, shapes, metadata, checksum, load guards.

Writing and validating live together so that they cannot drift apart; docs/EXPORT.md describes the same format
in prose. Only safetensors are read or written, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from .._compat import checkpoint_to_model_names
from ..errors import OscqValueError
from ..quantization.layout import scale_shape as layout_scale_shape
from ..quantization.packed_tensor import PackedWeight
from ..quantization.packing import invalid_packed_codes, packed_size
from ..quantization.selection import output_dim
from ..quantization.spec import QuantSpec
from ..versions import INSTALL_HINT, library_versions

QUANT_METHOD = "oscq"
FORMAT_VERSION = 1
SCALE_SUFFIX = "_scale"  # "conv1.weight" holds the packed codes, "conv1.weight_scale" the scale(s)
VERSION_KEY = "{library}_version"  # safetensors metadata: "hf_oscq_version", "torch_version", "transformers_version"

# Values written over top-level config.json fields, so that loaders without hf_oscq stop with an error naming
# it: transformers reads `transformers_weights` as the weights file name and rejects one that does not end in
# .safetensors, quoting it; timm's `local-dir:` loader rejects an unknown `architecture`, quoting it.
TRANSFORMERS_GUARD = (
    "model.safetensors holds bit-packed hf_oscq weights: run `import hf_oscq` before from_pretrained (to install "
    f"hf_oscq: {INSTALL_HINT})"
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


def scale_shape(weight_shape: Iterable[int], spec: QuantSpec, out_dim: int = 0) -> tuple[int, ...]:
    """Shape of the stored scale: `()` per tensor, `(out, 1, ..., 1)` per channel, `(out, groups)` group-wise (as
    `compute_scale` returns; output channel first whatever `out_dim`)."""
    return layout_scale_shape(tuple(weight_shape), spec, out_dim)


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


def _parameter_name(module_weight: str, params: Mapping[str, Any], prefix: str) -> str:
    """A weight name of the exported model (`quantization_config.modules`) as named in `model`, which may be the
    backbone (without the `base_model_prefix`) or another head class (with it)."""
    if module_weight in params or not prefix:
        return module_weight
    if module_weight.startswith(prefix + ".") and module_weight[len(prefix) + 1 :] in params:
        return module_weight[len(prefix) + 1 :]
    return f"{prefix}.{module_weight}" if f"{prefix}.{module_weight}" in params else module_weight


def _stored_shape(
    codes: tuple[int, ...], scale: tuple[int, ...], shape: tuple[int, ...], spec: QuantSpec, out_dim: int
) -> tuple[int, ...] | None:
    """The shape of the weight the codes hold when only dim 0 differs from `shape` (a head with another number of
    labels); `None` when no such shape, or more than one, fits the stored tensors."""
    if len(shape) < 2 or out_dim != 0:
        return None
    rest = math.prod(shape[1:])
    if scale:  # one scale row per output channel
        candidates = [scale[0]]
    else:
        size = codes[-1]
        candidates = [
            n // rest for n in range((8 * size - 8) // spec.bits + 1, 8 * size // spec.bits + 1) if n % rest == 0
        ]
    fits = [
        (rows, *shape[1:])
        for rows in candidates
        if packed_shape((rows, *shape[1:]), spec.bits) == codes
        and scale_shape((rows, *shape[1:]), spec, out_dim) == scale
    ]
    return fits[0] if len(fits) == 1 else None


def _check_float16_scales(path: Path, entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Refuses float16 scales below the smallest normal float16. Earlier exports of float16 models rounded such
    weights with that smallest normal as the scale but stored the true one, so their codes are wrong (8x too small at
    8 bits for a channel whose largest weight is 1e-3). Scales are computed and stored in float32 now."""
    names = [name for name, (dtype, _) in entries.items() if dtype == "F16" and name.endswith(SCALE_SUFFIX)]
    if not names:
        return
    tiny = torch.finfo(torch.float16).tiny
    with safe_open(str(path), framework="pt") as handle:
        for name in names:
            scale = handle.get_tensor(name)
            if bool(((scale > 0) & (scale < tiny)).any()):
                raise CheckpointFormatError(
                    f"The float16 scale {name!r} in {path} is below {tiny:.3g}: this checkpoint was exported by an "
                    "hf_oscq that rounded such weights with a larger scale than the one it stored, so its codes are "
                    "wrong. Export the model again with this version (scales are computed and stored in float32)."
                )


def validate_checkpoint_files(
    files: Iterable[str | Path], quantization_config: Any, model: torch.nn.Module
) -> dict[str, tuple[int, ...]]:
    """Checks checkpoint files against their `quantization_config` and the model before any weight is loaded.

    `model` may be the class the checkpoint was exported from, its backbone (`AutoModel`) or another head: packed
    weights of modules the model does not have are left to transformers (unexpected keys), and a packed weight whose
    first dimension differs from the model's (`num_labels=...`) is reported to transformers as a size mismatch.

    Returns:
        `{parameter name in model: shape of the stored weight}` for every packed weight the model has.

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
        _check_float16_scales(path, file_entries)
        entries.update(file_entries)
    if hasattr(model, "config"):
        entries = checkpoint_to_model_names(entries, model, SCALE_SUFFIX)
    params = {name: tuple(param.shape) for name, param in model.named_parameters()}
    exported_class = type(model).__name__ in (getattr(getattr(model, "config", None), "architectures", None) or [])
    prefix = getattr(model, "base_model_prefix", "") or ""
    listed: dict[str, tuple[int, ...]] = {}
    for module in quantization_config.modules:
        name = _parameter_name(f"{module}.weight", params, prefix)
        if name not in params:
            if not exported_class:
                continue  # a module of another head: its tensors are unexpected keys, as for a float checkpoint
            raise CheckpointFormatError(
                f"quantization_config lists module {module!r}, but the model built from config.json has no parameter "
                f"{name!r}: config.json and the weights come from different models. Export the model again."
            )
        weight_shape = params[name]
        out_dim = output_dim(model.get_submodule(name.rpartition(".")[0]))
        if out_dim and not spec.per_tensor and getattr(quantization_config, "scale_axis", None) != "output":
            raise CheckpointFormatError(
                f"{name!r} is a layer whose output channels are dim {out_dim} (GPT-2's Conv1D), and this checkpoint "
                f"was exported by an hf_oscq whose {spec.granularity} scales ran along its input features instead: "
                "export the model again with this version."
            )
        expected = {
            name: ("U8", packed_shape(weight_shape, bits)),
            name + SCALE_SUFFIX: (None, scale_shape(weight_shape, spec, out_dim)),
        }
        for key in expected:
            if key not in entries:
                raise CheckpointFormatError(
                    f"The checkpoint has no tensor {key!r}, which quantization_config requires."
                )
        mismatched = [
            (key, wanted)
            for key, wanted in expected.items()
            if entries[key][1] != wanted[1] or wanted[0] not in (None, entries[key][0])
        ]
        stored = weight_shape
        if mismatched:
            stored = None
            if entries[name][0] == "U8":
                stored = _stored_shape(entries[name][1], entries[name + SCALE_SUFFIX][1], weight_shape, spec, out_dim)
            if stored is None:
                key, (dtype, shape) = mismatched[0]
                found_dtype, found_shape = entries[key]
                raise CheckpointFormatError(
                    f"Tensor {key!r} has dtype {found_dtype} and shape {list(found_shape)}, but a weight of shape "
                    f"{list(weight_shape)} at bits={bits} ({spec.granularity}) needs "
                    f"{dtype or 'a float dtype'} and shape {list(shape)}: the codes do not match config.json."
                )
        listed[name] = stored  # a new head's shape: transformers reports the mismatch
    stray = sorted(
        key
        for key in entries
        if key.endswith(".weight" + SCALE_SUFFIX)
        and key.removesuffix(SCALE_SUFFIX) not in listed
        and (exported_class or key.removesuffix(SCALE_SUFFIX) in params)
    )
    if stray:
        raise CheckpointFormatError(
            f"The checkpoint holds scales for modules that quantization_config does not list: {stray[:5]}. "
            "config.json and the weights come from different exports: export the model again."
        )
    return listed


def check_packed_tensors(name: str, codes: torch.Tensor, scale: torch.Tensor, bits: int, numel: int) -> None:
    """Checks the tensors of one packed weight as it loads, before they reach the model (the file-level checks ran
    in `validate_checkpoint_files` before loading began). The one place for checks of stored values.

    Raises:
        CheckpointFormatError: for codes no valid export writes, or non-zero padding.
    """
    problem = invalid_packed_codes(codes.reshape(-1), bits, numel)
    if problem is not None:
        raise CheckpointFormatError(
            f"The packed codes of {name!r} hold {problem}: the file is corrupted or was packed at another bit-width. "
            "Export the model again."
        )


def checkpoint_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every `PackedWeight` as its two checkpoint tensors: `NAME` (codes, `packed_shape`) and
    `NAME_scale`. Tied packed weights give views of one storage, which transformers then saves once."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state_dict.items():
        if isinstance(value, PackedWeight):
            tensors[name] = value.packed.view(packed_shape(value.shape, value.bits))
            tensors[name + SCALE_SUFFIX] = value.scale
        else:
            tensors[name] = value
    return tensors


def finish_saved_folder(folder: str | Path, quantization_config: Any) -> None:
    """Turns a folder that `save_pretrained` wrote for a packed model into a checkpoint of this format: every
    weights file rewritten with the format metadata and checksum (`serialize_checkpoint`, as the export writes
    them), and config.json with the guarded fields (`guard_config`) and the `quantization_config` recording them."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_bytes(serialize_checkpoint(tensors, quantization_config.bits))
        os.replace(staging, path)
    config = read_config(folder)
    guarded = guard_config(config)
    config["quantization_config"] = {**quantization_config.to_dict(), "guarded_fields": guarded}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(folder: str | Path) -> dict[str, Any]:
    """The `config.json` of a folder as a dict."""
    return json.loads((Path(folder) / "config.json").read_text())
