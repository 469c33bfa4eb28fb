"""The version of hf_oscq, and the versions of the libraries that wrote an export (recorded in its manifest, its
safetensors metadata and its model cards)."""

from __future__ import annotations

__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    """`{"hf_oscq": ..., "torch": ..., "transformers": ...}`: the versions running now."""
    import torch
    import transformers

    return {"hf_oscq": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
