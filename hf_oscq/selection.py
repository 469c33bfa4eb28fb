"""Which weights get quantized: defined once here, used by the penalty, QAT, PTQ and export."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

# Preset matching the paper's reference code: every module that owns a `.weight` (norm layers included).
ALL_WEIGHTS = "all-weights"

_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
try:  # GPT-2 style language models use a transposed Linear
    from transformers.pytorch_utils import Conv1D

    _DEFAULT_TYPES += (Conv1D,)
except ImportError:  # pragma: no cover - transformers is a dependency
    pass

Patterns = str | Sequence[str] | None


def _as_list(patterns: Patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(name: str, pattern: str) -> bool:
    """PEFT-style match: the exact module name, a dotted suffix of it, or a regex matching the whole name."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def select_weights(
    model: nn.Module, target_modules: Patterns = None, exclude_modules: Patterns = None
) -> dict[str, nn.Parameter]:
    """The weights to quantize, keyed by parameter name (`"layer1.0.conv1.weight"`).

    Args:
        model: any `nn.Module`.
        target_modules: `None` for the default (weights of Linear, Conv1d/2d/3d and Embedding layers; biases and
            norm layers stay float), `"all-weights"` for every module with a `.weight` (the paper's reference
            code), or module names / dotted suffixes / regular expressions matching whole module names.
        exclude_modules: patterns of the same kind; matching modules are left in float.

    Returns:
        An ordered dict of distinct parameters (tied weights appear once, under their first name).

    Raises:
        ValueError: when nothing is selected, with the module names that were available.
    """
    targets = _as_list(target_modules)
    excludes = _as_list(exclude_modules)
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        if not targets:
            wanted = isinstance(module, _DEFAULT_TYPES)
        elif targets == [ALL_WEIGHTS]:
            wanted = True
        else:
            wanted = any(_matches(module_name, pattern) for pattern in targets)
        if wanted and not any(_matches(module_name, pattern) for pattern in excludes):
            seen.add(id(weight))
            selected[f"{module_name}.weight" if module_name else "weight"] = weight
    if not selected:
        candidates = [
            name
            for name, module in model.named_modules()
            if isinstance(module._parameters.get("weight"), nn.Parameter)
        ]
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"No weights selected for quantization with target_modules={target_modules!r} and "
            f"exclude_modules={exclude_modules!r}. Modules with a weight in this model: [{shown}]. Pass names, "
            f"dotted suffixes or a regex of those, None for Linear/Conv/Embedding layers, or {ALL_WEIGHTS!r}."
        )
    return selected


def weight_owners(
    model: nn.Module, target_modules: Patterns = None, exclude_modules: Patterns = None
) -> dict[str, nn.Module]:
    """The modules owning the weights `select_weights` picks, under the same names.

    Code that reads the weights throughout a training run keeps their modules rather than the parameters: FSDP2
    replaces each module's parameter objects when it shards and gathers them (see `sharding.current_weights`).
    """
    selected = select_weights(model, target_modules, exclude_modules)
    return {name: model.get_submodule(name.rpartition(".")[0]) for name in selected}
