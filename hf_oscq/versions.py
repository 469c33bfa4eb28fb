"""The version of hf_oscq, how to install it, and the versions of the libraries that wrote an export (recorded in
its manifest, its safetensors metadata and its model cards)."""

from __future__ import annotations

__version__ = "0.1.0"
PACKAGE = "hf_oscq"

# hf_oscq is not on the Python package index: pip installs it from a clone of its repository, or from the wheel
# `pip wheel --no-deps .` builds there (a pure-Python wheel, named as below).
WHEEL = f"{PACKAGE}-{__version__}-py3-none-any.whl"
BUILD_WHEEL = "pip wheel --no-deps ."
INSTALL_COMMAND = f"pip install {WHEEL}"
INSTALL_FROM_CLONE = "pip install -e ."
INSTALL_HINT = (
    f"{PACKAGE} {__version__} is not on PyPI: in a clone of its repository run `{INSTALL_FROM_CLONE}`, or build the "
    f"wheel there with `{BUILD_WHEEL}` and run `{INSTALL_COMMAND}`"
)


def library_versions() -> dict[str, str]:
    """`{"hf_oscq": ..., "torch": ..., "transformers": ...}`: the versions running now."""
    import torch
    import transformers

    return {"hf_oscq": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
