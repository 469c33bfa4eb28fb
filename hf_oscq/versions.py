"""The version of hf_oscq, and the versions of the libraries that wrote an export (recorded in its manifest, its
safetensors metadata and its model cards)."""

from __future__ import annotations

__version__ = "0.1.0"

# hf_oscq is not on the Python package index yet: pip installs it from its git repository, or from a clone of it.
INSTALL_COMMAND = 'pip install "hf_oscq @ git+<URL of the hf_oscq repository>"'
INSTALL_FROM_CLONE = "pip install -e ."
INSTALL_HINT = f"{INSTALL_COMMAND} (or {INSTALL_FROM_CLONE} in a clone of it)"


def library_versions() -> dict[str, str]:
    """`{"hf_oscq": ..., "torch": ..., "transformers": ...}`: the versions running now."""
    import torch
    import transformers

    return {"hf_oscq": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
