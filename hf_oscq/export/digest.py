"""The checksum of a bit-packed checkpoint file and the record of its config.json.

Format version 2 (docs/EXPORT.md): `oscq_sha256` is the SHA-256 of the file's header (every tensor's name, dtype,
shape and offsets, and the metadata except the checksum itself, as canonical JSON) followed by the tensor data. The
metadata holds `oscq_config`, the canonical JSON of `config.json` without its informational fields, so the checksum
covers the config too, and the loader can name the field that differs. Format version 1 files (the first exports)
carry a checksum of the tensor data alone.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

DIGEST_KEY = "oscq_sha256"
CONFIG_KEY = "oscq_config"
# config.json fields that do not change the model: where it was loaded from and which transformers wrote it. Every
# other field (architecture sizes, norms' eps, activation, labels, the quantization_config but its `versions`) is
# covered.
INFORMATIONAL_CONFIG_FIELDS = ("_name_or_path", "transformers_version")
INFORMATIONAL_QUANTIZATION_FIELDS = ("versions",)
_CHUNK = 1 << 20


def covered_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` (a `config.json` dict) without the fields the checksum leaves out (`INFORMATIONAL_CONFIG_FIELDS`,
    and `quantization_config.versions`)."""
    covered = {key: copy.deepcopy(value) for key, value in config.items() if key not in INFORMATIONAL_CONFIG_FIELDS}
    quantization = covered.get("quantization_config")
    if isinstance(quantization, dict):
        for key in INFORMATIONAL_QUANTIZATION_FIELDS:
            quantization.pop(key, None)
    return covered


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_record(config: Mapping[str, Any]) -> str:
    """The `oscq_config` metadata string of a `config.json` dict (as read back from the file)."""
    return _canonical(covered_config(config))


def config_differences(recorded: Any, current: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """`(dotted field, recorded value, current value)` for every field where two configs differ (`<absent>` for a
    field only one has), sorted by field."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current)):
            field = f"{path}.{key}" if path else key
            found += config_differences(recorded.get(key, "<absent>"), current.get(key, "<absent>"), field)
        return found
    return [] if recorded == current else [(path, recorded, current)]


def _data_chunks(handle: BinaryIO) -> Iterator[bytes]:
    yield from iter(lambda: handle.read(_CHUNK), b"")


def _digest(header: bytes, chunks: Iterator[bytes], format_version: int) -> str:
    digest = hashlib.sha256()
    if format_version >= 2:
        parsed = json.loads(header)
        parsed.get("__metadata__", {}).pop(DIGEST_KEY, None)
        digest.update(_canonical(parsed).encode())
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def blob_digest(blob: bytes, format_version: int) -> str:
    """The checksum of safetensors bytes held in memory (see `file_digest`)."""
    size = 8 + int.from_bytes(blob[:8], "little")
    return _digest(blob[8:size], iter([memoryview(blob)[size:]]), format_version)


def file_digest(path: str | Path, format_version: int) -> str:
    """The checksum of a safetensors file as its format version defines it: header and data (version 2), or the
    data alone (version 1). The data is read in 1 MiB chunks."""
    with open(path, "rb") as handle:
        header = handle.read(int.from_bytes(handle.read(8), "little"))
        return _digest(header, _data_chunks(handle), format_version)
