"""Reading export folders in the compressed-tensors format (`compressed_tensors.py` writes them): the modules a
folder stores packed, and the checks `hf-oscq push` makes before sending one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .checkpoint import read_config
from .compressed_tensors import DIGEST_VERSION, PACK_QUANTIZED, require_compressed_tensors
from .digest import CONFIG_KEY, DIGEST_KEY, config_differences, covered_config, file_digest
from .folder import WEIGHTS_NAME, ExportFolderError, weight_files


def packed_modules(folder: str | Path) -> list[str]:
    """The modules a compressed-tensors checkpoint folder stores packed (`"model.layers.0.mlp.up_proj"`), in file
    order, read from the safetensors headers."""
    modules = []
    for path in weight_files(Path(folder)):
        with safe_open(str(path), framework="pt") as handle:
            modules += [key.removesuffix(".weight_packed") for key in handle.keys() if key.endswith(".weight_packed")]
    return modules


def verify_compressed_tensors_folder(folder: str | Path) -> None:
    """Checks a compressed-tensors folder this hf_oscq wrote, without loading the model: `quantization_config` is
    one compressed-tensors reads (pack-quantized, symmetric integers), every weights file matches its checksum and
    the config.json it was written with, and every packed module has its three tensors with their dtypes.

    Raises:
        ExportFolderError: naming the file and what is wrong with it; or when compressed-tensors is missing.
    """
    require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationConfig

    folder = Path(folder)
    config = read_config(folder)
    quantization = config.get("quantization_config") or {}
    try:
        parsed = QuantizationConfig.model_validate(quantization)
    except ValueError as error:
        raise ExportFolderError(
            f"{folder}/config.json has an invalid compressed-tensors quantization_config: {error}"
        ) from None
    if parsed.format != PACK_QUANTIZED or any(not group.weights.symmetric for group in parsed.config_groups.values()):
        raise ExportFolderError(
            f"{folder}/config.json is not a symmetric {PACK_QUANTIZED} compressed-tensors checkpoint: export it again."
        )
    files = weight_files(folder)
    if not files:
        raise ExportFolderError(f"{folder} has no {WEIGHTS_NAME}: export it again.")
    for path in files:
        _verify_file(path, config)


def _verify_file(path: Path, config: dict[str, Any]) -> None:
    fix = "Export the model again, or download the file again."
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise ExportFolderError(
            f"{path} is not a readable safetensors file ({error}): it is truncated. {fix}"
        ) from None
    if metadata.get(DIGEST_KEY) != file_digest(path, DIGEST_VERSION):
        raise ExportFolderError(f"{path} is corrupted, truncated or edited: it does not match its checksum. {fix}")
    differences = config_differences(json.loads(metadata.get(CONFIG_KEY, "{}")), covered_config(config))
    if differences:
        field, recorded, found = differences[0]
        raise ExportFolderError(
            f"{path.parent / 'config.json'} field {field!r} is {found!r}, but the weights were exported with "
            f"{recorded!r}: restore the exported config.json, or export the model again."
        )
    wanted = {"weight_packed": ("I32",), "weight_shape": ("I64", "I32"), "weight_scale": ("F32", "F64", "F16", "BF16")}
    for key in dtypes:
        module, _, suffix = key.rpartition(".")
        if suffix == "weight_packed":
            for part, allowed in wanted.items():
                found = dtypes.get(f"{module}.{part}")
                if found not in allowed:
                    raise ExportFolderError(
                        f"{path}: {module}.{part} is {'missing' if found is None else found}, a packed weight needs "
                        f"{' or '.join(allowed)}. {fix}"
                    )
