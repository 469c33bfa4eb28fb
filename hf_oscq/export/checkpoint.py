"""The on-disk format of a bit-packed hf_oscq checkpoint: tensor names, shapes, metadata, checksum, load guards.

Writing and validating live together so that they cannot drift apart; docs/EXPORT.md describes the same format
in prose. Only safetensors are read or written, never pickles.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from .._compat import checkpoint_to_model_names, keys_loading_may_skip, remove_tied_weights, revert_checkpoint_names
from ..errors import OscqValueError
from ..quantization.layout import scale_shape as layout_scale_shape
from ..quantization.packed_ops import invalid_codes
from ..quantization.packed_tensor import SCALE_SUFFIX, PackedWeight, packed_shape, scale_problem
from ..quantization.selection import output_dim
from ..quantization.spec import QuantSpec
from ..versions import INSTALL_HINT, library_versions
from .digest import CONFIG_KEY, DIGEST_KEY, blob_digest, config_differences, config_record, covered_config, file_digest

logger = logging.getLogger(__name__)

QUANT_METHOD = "oscq"
FORMAT_VERSION = 2  # written; 2 added the header and config.json to the checksum
READABLE_FORMAT_VERSIONS = (1, 2)
# Scale dtypes each format version writes: float32 (float64 for float64 weights); version 1 also wrote the weight's
# float16 / bfloat16.
SCALE_DTYPES = {1: ("F16", "BF16", "F32", "F64"), 2: ("F32", "F64")}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
VERSION_KEY = "{library}_version"  # safetensors metadata: "hf_oscq_version", "torch_version", "transformers_version"

# Values written over top-level config.json fields, so that loaders without hf_oscq stop with an error naming
# it: transformers reads `transformers_weights` as the weights file name and rejects one that does not end in
# .safetensors, quoting it; timm's `local-dir:` loader rejects an unknown `architecture`, quoting it.
TRANSFORMERS_GUARD = (
    "model.safetensors holds bit-packed hf_oscq weights: run `import hf_oscq` before from_pretrained (to install "
    f"hf_oscq: {INSTALL_HINT}). If your script did import hf_oscq, a folder named hf_oscq next to it shadows the "
    "installed package: run the script from another folder"
)
TIMM_GUARD = (
    "{architecture} with bit-packed hf_oscq weights: run `import hf_oscq` and load the folder with transformers' "
    "AutoModelForImageClassification.from_pretrained"
)


class CheckpointFormatError(OscqValueError):
    """A bit-packed checkpoint that cannot be loaded correctly (corrupted, truncated, or inconsistent)."""


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


def restore_guarded_fields(config: Any, guarded: Mapping[str, Any]) -> Any:
    """Puts the real values `guard_config` returned back on a transformers config object (a field that was absent is
    removed); returns the config."""
    for field, value in guarded.items():
        if value is None:
            if hasattr(config, field):
                delattr(config, field)
        else:
            setattr(config, field, value)
    return config


def serialize_checkpoint(
    tensors: Mapping[str, torch.Tensor], bits: int, config: Mapping[str, Any] | None = None
) -> bytes:
    """The safetensors bytes of a checkpoint: the tensors, format metadata (format version, bit-width, the hf_oscq,
    torch and transformers versions that wrote it), the record of `config` (the folder's config.json as written, see
    `digest.config_record`) and the checksum of header and data (`digest.file_digest`).

    A file written without `config` has no config record, and the loader refuses it.
    """
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    metadata = {"format": "pt", "oscq_format_version": str(FORMAT_VERSION), "oscq_bits": str(bits)}
    metadata |= {VERSION_KEY.format(library=name): version for name, version in library_versions().items()}
    if config is not None:
        metadata[CONFIG_KEY] = config_record(config)
    # The checksum leaves itself out of the header it covers, and adding it moves no data offset.
    metadata[DIGEST_KEY] = blob_digest(serialize(tensors, metadata=metadata), FORMAT_VERSION)
    return _sorted_metadata(serialize(tensors, metadata=metadata))


def _sorted_metadata(blob: bytes) -> bytes:
    """`blob` with the metadata in its header in key order. safetensors writes the metadata in hash-map order,
    which changes from process to process; sorted, the same checkpoint is the same bytes. The header keeps its
    length (JSON with the same separators, padded with spaces as safetensors pads it), so no data offset moves."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # an escape written differently: keep the header as safetensors wrote it
        return blob
    return blob[:8] + text.ljust(size) + blob[8 + size :]


def write_config(folder: str | Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Writes `folder/config.json` and returns it as read back (the dict the config record is made from)."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (Path(folder) / "config.json").write_text(text)
    return json.loads(text)


_FIX = "Export the model again with hf_oscq.export_quantized (or `hf-oscq export`), or download the file again."


class StoredTensor(NamedTuple):
    """A tensor as a checkpoint file stores it: safetensors dtype name, shape, file and name in the file."""

    dtype: str
    shape: tuple[int, ...]
    path: Path
    key: str

    def read(self) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(self.key)


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            entries = {}
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                entries[name] = StoredTensor(tensor_slice.get_dtype(), tuple(tensor_slice.get_shape()), path, name)
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise CheckpointFormatError(
            f"{path} is not a readable safetensors file ({error}): it is truncated or corrupted. {_FIX}"
        ) from None
    return metadata, entries


def _format_version(path: Path, metadata: Mapping[str, str], config_version: int) -> int:
    found = metadata.get("oscq_format_version")
    if found not in map(str, READABLE_FORMAT_VERSIONS):
        writer = metadata.get(VERSION_KEY.format(library="hf_oscq"))
        writer = f" ({writer})" if writer else ""
        raise CheckpointFormatError(
            f"{path} has hf_oscq format version {found!r}; this hf_oscq reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Install the hf_oscq version that wrote it{writer}, or "
            "export it again."
        )
    if int(found) != config_version:
        raise CheckpointFormatError(
            f"{path} has format version {found} but config.json says {config_version}: the folder mixes files from "
            "two exports. Export the model again."
        )
    return int(found)


def _check_digest(path: Path, metadata: Mapping[str, str], version: int) -> None:
    if metadata.get(DIGEST_KEY) != file_digest(path, version):
        covered = "header or tensor data" if version >= 2 else "tensor data"
        raise CheckpointFormatError(
            f"{path} is corrupted, truncated or edited: its {covered} does not match its checksum. {_FIX}"
        )


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


def _check_float16_scales(stored: StoredTensor, scale: torch.Tensor) -> None:
    """Refuses float16 scales below the smallest normal float16 (format version 1). Those exports rounded such
    weights with that smallest normal as the scale but stored the true one, so their codes are wrong (8x too small at
    8 bits for a channel whose largest weight is 1e-3). Scales are computed and stored in float32 now."""
    tiny = torch.finfo(torch.float16).tiny
    if stored.dtype == "F16" and bool(((scale > 0) & (scale < tiny)).any()):
        raise CheckpointFormatError(
            f"The float16 scale {stored.key!r} in {stored.path} is below {tiny:.3g}: this checkpoint was exported by "
            "an hf_oscq that rounded such weights with a larger scale than the one it stored, so its codes are "
            "wrong. Export the model again with this version (scales are computed and stored in float32)."
        )


def _check_scale(
    stored: StoredTensor, codes: StoredTensor, shape: tuple[int, ...], bits: int, version: int, out_dim: int = 0
) -> None:
    """A scale is what the writer produces: a float dtype of the format, and values the codec accepts
    (`packed_tensor.scale_problem`: finite, positive, or 0 exactly where every code it multiplies is 0)."""
    fix = "a faulty writer produced this file (its checksum matches): export the model again."
    if stored.dtype not in SCALE_DTYPES[version]:
        raise CheckpointFormatError(
            f"Scale {stored.key!r} in {stored.path} has dtype {stored.dtype}; format version {version} stores scales "
            f"as {' or '.join(SCALE_DTYPES[version])}: {fix}"
        )
    scale = stored.read()
    zero_codes = torch.empty(0, dtype=torch.uint8)  # the codes are read only where a scale is 0
    problem = scale_problem(scale, codes.read() if bool((scale == 0).any()) else zero_codes, bits, shape, out_dim)
    if problem is not None:
        raise CheckpointFormatError(f"Scale {stored.key!r} in {stored.path} {problem}: {fix}")
    if version == 1:
        _check_float16_scales(stored, scale)


def _check_unpacked(
    entries: Mapping[str, StoredTensor], listed: Mapping[str, Any], model: torch.nn.Module, complete: bool
) -> None:
    """Every tensor stored unpacked has the kind of dtype the model's tensor has (float or not), and, for the class
    the checkpoint was exported from, every tensor the model loads is in the checkpoint (transformers would
    initialize a missing one at random)."""
    state = {name: tensor.is_floating_point() for name, tensor in model.state_dict().items()}
    for name, stored in entries.items():
        if name in listed or name.endswith(".weight" + SCALE_SUFFIX) or name not in state:
            continue
        if (stored.dtype in FLOAT_DTYPES) != state[name]:
            wanted = "a float dtype" if state[name] else "an integer dtype"
            raise CheckpointFormatError(
                f"Tensor {stored.key!r} in {stored.path} has dtype {stored.dtype}, but the model's {name!r} needs "
                f"{wanted}: a faulty writer produced this file. Export the model again."
            )
    if not complete:
        return
    tied, optional = keys_loading_may_skip(model)
    missing = sorted(
        name
        for name in state
        if name not in entries and name not in tied and not any(re.search(pattern, name) for pattern in optional)
    )
    if missing:
        raise CheckpointFormatError(
            f"The checkpoint has no tensor for {missing[:5]}, which the model built from config.json needs "
            "(transformers would initialize them at random): the file is incomplete. Export the model again."
        )


def _check_config_record(path: Path, metadata: Mapping[str, str]) -> None:
    """The config.json beside the weights is the one they were written with (format version 2)."""
    config_path = path.parent / "config.json"
    if CONFIG_KEY not in metadata:
        raise CheckpointFormatError(
            f"{path} has no record of the config.json it was written with, which format version {FORMAT_VERSION} "
            "requires: a faulty writer produced it. Export the model again."
        )
    try:
        current = covered_config(json.loads(config_path.read_text()))
    except (OSError, ValueError) as error:
        raise CheckpointFormatError(
            f"Cannot read {config_path} ({error}): an hf_oscq checkpoint is checked against the config.json next to "
            "its weights. Load the folder the export wrote."
        ) from None
    differences = config_differences(json.loads(metadata[CONFIG_KEY]), current)
    if differences:
        field, recorded, found = differences[0]
        more = f" (and {len(differences) - 1} more fields)" if len(differences) > 1 else ""
        raise CheckpointFormatError(
            f"{config_path} field {field!r} is {found!r}, but the weights were exported with {recorded!r}{more}: the "
            "config was edited after export or comes from another checkpoint. Restore the exported config.json, or "
            "export the model again."
        )


def validate_checkpoint_files(
    files: Iterable[str | Path], quantization_config: Any, model: torch.nn.Module, check_codes: bool = False
) -> dict[str, tuple[int, ...]]:
    """Checks checkpoint files against their `quantization_config`, their config.json and the model before any
    weight is loaded.

    Checked: each file's format version and checksum (format version 2: header, tensor data and config.json; version
    1: the tensor data), the bit-width, every listed module's codes (uint8, the shape the weight needs) and scale
    (a dtype of the format, finite, positive, or 0 only over zero codes), no scale of an unlisted module, the dtype
    kind of the tensors stored unpacked and, for the exported class, that every tensor the model loads is there.

    `model` may be the class the checkpoint was exported from, its backbone (`AutoModel`) or another head: packed
    weights of modules the model does not have are left to transformers (unexpected keys), and a packed weight whose
    first dimension differs from the model's (`num_labels=...`) is reported to transformers as a size mismatch.

    Args:
        files: the checkpoint's safetensors files (one, or the shards).
        quantization_config: the checkpoint's `OscqQuantizationConfig`.
        model: the model being loaded (on the meta device is enough).
        check_codes: also check every packed weight's codes (`check_packed_tensors`), which loading does as each
            weight is read; for checking a folder without loading it.

    Returns:
        `{parameter name in model: shape of the stored weight}` for every packed weight the model has.

    Raises:
        CheckpointFormatError: naming the file, tensor or config field at fault and how to fix it.
    """
    spec = quantization_config.spec
    bits = spec.bits
    entries: dict[str, StoredTensor] = {}
    headers: list[tuple[Path, dict[str, str]]] = []
    version = FORMAT_VERSION
    for path in map(Path, files):
        metadata, file_entries = _read_header(path)
        version = _format_version(path, metadata, quantization_config.format_version)
        _check_digest(path, metadata, version)
        if metadata.get("oscq_bits") != str(bits):
            raise CheckpointFormatError(
                f"Bit-width mismatch: config.json says bits={bits} but the tensors in {path} were packed at "
                f"{metadata.get('oscq_bits')!r} bits. The folder mixes files from two exports: export it again."
            )
        headers.append((path, metadata))
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
            if entries[key].shape != wanted[1] or wanted[0] not in (None, entries[key].dtype)
        ]
        stored = weight_shape
        if mismatched:
            stored = None
            if entries[name].dtype == "U8":
                stored = _stored_shape(
                    entries[name].shape, entries[name + SCALE_SUFFIX].shape, weight_shape, spec, out_dim
                )
            if stored is None:
                key, (dtype, shape) = mismatched[0]
                raise CheckpointFormatError(
                    f"Tensor {key!r} has dtype {entries[key].dtype} and shape {list(entries[key].shape)}, but a "
                    f"weight of shape {list(weight_shape)} at bits={bits} ({spec.granularity}) needs "
                    f"{dtype or 'a float dtype'} and shape {list(shape)}: the codes do not match config.json."
                )
        _check_scale(entries[name + SCALE_SUFFIX], entries[name], tuple(stored), bits, version, out_dim)
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
    _check_unpacked(entries, listed, model, exported_class)
    if check_codes:
        for name, shape in listed.items():
            stored = entries[name]
            check_packed_tensors(f"{stored.key} in {stored.path}", stored.read(), None, bits, math.prod(shape))
    if version >= 2:
        for path, metadata in headers:
            _check_config_record(path, metadata)
    else:
        logger.warning(
            "%s uses hf_oscq format version 1, whose checksum covers the tensor data only (not the header or "
            "config.json); its tensors and scales were checked for consistency. Export the model again to get the "
            "full checksum.",
            headers[0][0].parent,
        )
    return listed


def check_packed_tensors(name: str, codes: torch.Tensor, scale: torch.Tensor | None, bits: int, numel: int) -> None:
    """Checks the tensors of one packed weight as it loads, before they reach the model (the file-level checks ran
    in `validate_checkpoint_files` before loading began). The one place for checks of stored values.

    Raises:
        CheckpointFormatError: for codes no valid export writes, or non-zero padding.
    """
    problem = invalid_codes(codes, bits, numel)
    if problem is not None:
        raise CheckpointFormatError(  # the wording of PackedWeight.from_checkpoint: one fault, one message
            f"The packed weight {name!r} is invalid: its codes hold {problem}. The file is corrupted or was packed at "
            "another bit-width: export the model again."
        )


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `save_pretrained` writes for a model holding packed weights: every `PackedWeight` as its two
    checkpoint tensors (`PackedWeight.checkpoint_tensors`). Tied packed weights give views of one storage, which
    transformers then saves once.

    Raises:
        OscqValueError: when the model's class converts packed weights when saving (fused or split tensors), which
            would store codes that no longer match their scales; names the weights and the way out.
    """
    tensors, packed = {}, []
    for name, value in model.state_dict().items():
        if isinstance(value, PackedWeight):
            tensors.update(value.checkpoint_tensors(name))
            packed.append(name)
        else:
            tensors[name] = value
    kept = remove_tied_weights(model, tensors)
    survivors = {id(tensor) for tensor in revert_checkpoint_names(model, kept).values()}
    converted = [name for name in packed if name in kept and id(kept[name]) not in survivors]
    if converted:
        raise OscqValueError(
            f"This model converts the weights {converted[:5]} when saving (fused or split tensors), so they cannot be "
            "stored bit-packed one by one: exclude them with exclude_modules=[...]."
        )
    return tensors


def finish_saved_folder(folder: str | Path, quantization_config: Any) -> None:
    """Turns a folder that `save_pretrained` wrote for a packed model into a checkpoint of this format: config.json
    with the guarded fields (`guard_config`) and the `quantization_config` recording them, then every weights file
    rewritten with the format metadata, the config record and the checksum (`serialize_checkpoint`, as the export
    writes them)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    guarded = guard_config(config)
    config["quantization_config"] = {
        **quantization_config.to_dict(),
        "format_version": FORMAT_VERSION,  # a model loaded from an older format is saved in this one
        "guarded_fields": guarded,
    }
    config = write_config(folder, config)
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_bytes(serialize_checkpoint(tensors, quantization_config.bits, config))
        os.replace(staging, path)


def read_config(folder: str | Path) -> dict[str, Any]:
    """The `config.json` of a folder as a dict."""
    return json.loads((Path(folder) / "config.json").read_text())
