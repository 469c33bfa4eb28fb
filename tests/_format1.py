"""Writes a checkpoint folder in hf_oscq's format version 1 (a SHA-256 of the tensor data alone, no config record),
the format of the first exports, computed here independently of hf_oscq's writer."""

import hashlib
import json
from pathlib import Path

from safetensors.torch import save


def write_format1_checkpoint(folder: Path, tensors: dict, bits: int) -> None:
    """Rewrites `folder/model.safetensors` with `tensors` as format version 1 and marks config.json version 1."""
    metadata = {"format": "pt", "oscq_format_version": "1", "oscq_bits": str(bits)}
    draft = save(tensors, metadata=metadata)
    data_start = 8 + int.from_bytes(draft[:8], "little")
    metadata["oscq_sha256"] = hashlib.sha256(draft[data_start:]).hexdigest()
    (folder / "model.safetensors").write_bytes(save(tensors, metadata=metadata))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(config))
