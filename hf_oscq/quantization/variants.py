"""The names of a model's variants: `"fp"` for full precision, `"w{b}"` for its weights rounded at b bits.

Cross-bit tables, export folders, manifests, model cards, Hub repositories (`ORG/NAME-w{b}`), plots and the Space
all name variants through these functions. Pure Python.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

FULL_PRECISION = "fp"
_QUANTIZED = re.compile(r"w([0-9]+)")


def variant_name(bits: int | None) -> str:
    """`"fp"` for `None`, `"w3"` for 3."""
    return FULL_PRECISION if bits is None else f"w{int(bits)}"


def variant_bits(name: str) -> int | None:
    """The bit-width of a variant name: `None` for `"fp"`, 3 for `"w3"`.

    Raises:
        ValueError: for a name that is not a variant.
    """
    if name == FULL_PRECISION:
        return None
    match = _QUANTIZED.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a variant name: 'fp' or 'w<bits>'.")
    return int(match.group(1))


def is_variant(name: str) -> bool:
    """Whether `name` is `"fp"` or `"w<digits>"`."""
    return name == FULL_PRECISION or _QUANTIZED.fullmatch(name) is not None


def variant_names(bits: Iterable[int], full_precision: bool = True) -> list[str]:
    """`["fp", "w2", "w3", ...]` for the given bit-widths, in `sort_variants` order."""
    names = [variant_name(b) for b in bits]
    return sort_variants([FULL_PRECISION, *names] if full_precision else names)


def sort_variants(names: Iterable[str], descending: bool = False) -> list[str]:
    """Variant names with `"fp"` first, then by bit-width (ascending, or descending for "most bits first")."""
    sign = -1 if descending else 1
    return sorted(names, key=lambda name: (name != FULL_PRECISION, sign * (variant_bits(name) or 0)))


def variant_repo_id(repo_id: str, variant: str) -> str:
    """Hub repository of a variant: the parent `ORG/NAME` for `"fp"`, `ORG/NAME-w3` for `"w3"`."""
    return repo_id if variant == FULL_PRECISION else f"{repo_id}-{variant}"


def variant_title(variant: str) -> str:
    """Human label: `"full precision"` or `"3 bits"`."""
    bits = variant_bits(variant)
    return "full precision" if bits is None else f"{bits} bits"
