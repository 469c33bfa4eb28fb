"""Which weights get quantized: defined once here, used by the penalty, QAT, PTQ, export and tracking."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import OscqValueError
from .spec import ALL_LAYERS, ALL_WEIGHTS, GROUP, Patterns, QuantSpec

__all__ = ["ALL_LAYERS", "ALL_WEIGHTS", "output_dim", "output_dims", "select_weights", "weight_owners"]

_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
# Layers whose weight stores the output channels in dim 1: GPT-2's transposed Linear, `(in, out)`.
_TRANSPOSED_TYPES: tuple[type[nn.Module], ...] = ()
try:
    from transformers.pytorch_utils import Conv1D

    _DEFAULT_TYPES += (Conv1D,)
    _TRANSPOSED_TYPES += (Conv1D,)
except ImportError:  # pragma: no cover - transformers is a dependency
    pass


def _matches(name: str, pattern: str) -> bool:
    """PEFT-style match: the exact module name, a dotted suffix of it, or a regex matching the whole name."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _language_model_head(model: nn.Module) -> nn.Module | None:
    """The output embedding (`lm_head`) of a language model, `None` for other models."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if get_output_embeddings is None:
        return None
    try:
        head = get_output_embeddings()
    except (AttributeError, NotImplementedError):  # transformers' base class raises this for models without one
        return None
    return head if isinstance(head, nn.Module) else None


def _shown(names: list[str]) -> str:
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def require_module(model) -> None:
    """Refuses anything but an `nn.Module` where a function of hf_oscq takes the model, before it is used.

    Raises:
        OscqValueError: naming the type passed (a list of tensors, a path: load the model first).
    """
    if not isinstance(model, nn.Module):
        raise OscqValueError(
            f"hf_oscq's quantizers and penalties take the model (a torch.nn.Module), got {type(model).__name__}: "
            "pass the model itself (from_pretrained(...) loads one from a folder)."
        )


def select_weights(
    model: nn.Module,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    *,
    spec: QuantSpec | None = None,
    group_size_source: str = "group_size",
) -> dict[str, nn.Parameter]:
    """The weights to quantize, keyed by parameter name (`"layer1.0.conv1.weight"`).

    Args:
        model: any `nn.Module`.
        target_modules: `None` for the default: the weights of Linear, Conv1d/2d/3d and Embedding layers (biases and
            norm layers stay float), except in a language model (a model with output embeddings, `lm_head`), where
            the default is its Linear / Conv layers without the output embeddings: the decoder blocks' projections,
            with token / position embeddings and `lm_head` in float. `"all-layers"` selects every Linear / Conv /
            Embedding layer, those of a language model included (tied embeddings once); `"all-weights"` every
            module with a `.weight` (the paper's reference code); or module names / dotted suffixes / regular
            expressions matching whole module names.
        exclude_modules: patterns of the same kind; matching modules are left in float.
        spec: a `QuantSpec` whose `target_modules` / `exclude_modules` are used instead; a group-wise spec is also
            checked against every selected weight (`check_group_size`).
        group_size_source: the argument the spec's group size came from, named in that check's error
            (`osc_group_size`, `--group_size`, or a template such as `OscqQuantizationConfig(group_size={})`).

    Returns:
        An ordered dict of distinct parameters (tied weights appear once, under their first name).

    Raises:
        OscqValueError: when `model` is not an `nn.Module` (a list of tensors, a path: load the model first).
        OscqValueError: when nothing is selected, with the module names that were available; or when a group-wise
            spec's group size does not divide a selected layer's input features, naming the layer.

    Warns:
        UserWarning: for each target or exclude pattern that matches no module with a weight (a typo selects or
            excludes nothing).
    """
    require_module(model)
    if spec is not None:
        if target_modules is not None or exclude_modules is not None:
            raise TypeError("select_weights: pass spec=QuantSpec(...) or target_modules/exclude_modules, not both.")
        target_modules, exclude_modules = spec.target_modules, spec.exclude_modules
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    excludes = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules or [])
    preset = not targets or targets in ([ALL_WEIGHTS], [ALL_LAYERS])
    default_types, skipped = _DEFAULT_TYPES, None
    if targets == [ALL_LAYERS]:
        targets = []
    elif not targets and (head := _language_model_head(model)) is not None:
        default_types = tuple(kind for kind in _DEFAULT_TYPES if kind is not nn.Embedding)
        skipped = head
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    owners: list[str] = []
    modules: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        owners.append(module_name)
        if not targets:
            wanted = isinstance(module, default_types) and module is not skipped
        elif preset:
            wanted = True
        else:
            wanted = any(_matches(module_name, pattern) for pattern in targets)
        if wanted and not any(_matches(module_name, pattern) for pattern in excludes):
            seen.add(id(weight))
            selected[f"{module_name}.weight" if module_name else "weight"] = weight
            modules[module_name] = module
    if not selected:
        raise OscqValueError(
            f"No weights selected for quantization with target_modules={target_modules!r} and "
            f"exclude_modules={exclude_modules!r}. Modules with a weight in this model: [{_shown(owners)}]. Pass "
            f"names, dotted suffixes or a regex of those, None for Linear/Conv/Embedding layers, or {ALL_WEIGHTS!r}."
        )
    for kind, patterns in (("target_modules", [] if preset else targets), ("exclude_modules", excludes)):
        for pattern in patterns:
            if not any(_matches(name, pattern) for name in owners):
                warnings.warn(
                    f"{kind} pattern {pattern!r} matches no module with a weight, so it "
                    f"{'selects' if kind == 'target_modules' else 'excludes'} nothing. Modules with a weight in this "
                    f"model: [{_shown(owners)}]; patterns are names, dotted suffixes or regexes of those.",
                    UserWarning,
                    stacklevel=1,  # one location: Python's default filter shows it once, however many callers select
                )
    if spec is not None:
        check_group_size(modules, spec, group_size_source)
    return selected


def check_group_size(modules: Mapping[str, nn.Module], spec: QuantSpec, source: str = "group_size") -> None:
    """Checks that a group-wise `spec`'s group size divides the input features (`weight.numel() / out channels`,
    along `output_dim`) of every module's weight, as group-wise scales need; any other granularity fits every layer.

    Args:
        modules: the modules owning the selected weights, by module name.
        spec: the `QuantSpec`.
        source: the argument the group size came from, named in the error: a name (`osc_group_size`, shown as
            `osc_group_size=16`) or a template with `{}` where the value goes.

    Raises:
        OscqValueError: naming the first layer it does not divide, its input features, `source`, and the largest group
            size that divides every layer.
    """
    if spec.granularity != GROUP:
        return
    features = {}
    for name, module in modules.items():
        shape = tuple(module.weight.shape)
        out = shape[output_dim(module)] if shape else 1
        features[name] = (math.prod(shape) // out if out else 0, shape)
    misfits = [(name, fan_in, shape) for name, (fan_in, shape) in features.items() if fan_in % spec.group_size]
    if misfits:
        name, fan_in, shape = misfits[0]
        largest = math.gcd(*(fan_in for fan_in, _ in features.values()))
        more = f" (and {len(misfits) - 1} more layers)" if len(misfits) > 1 else ""
        named = source.format(spec.group_size) if "{}" in source else f"{source}={spec.group_size}"
        raise OscqValueError(
            f"{named} does not divide the {fan_in} input features of layer {name or 'the model'!r} "
            f"(weight shape {list(shape)}){more}: group-wise scales need a group size dividing every selected layer's "
            f"input features (the largest that does here is {largest}), or leave that layer out with exclude_modules."
        )


def weight_owners(
    model: nn.Module,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    *,
    spec: QuantSpec | None = None,
    group_size_source: str = "group_size",
) -> dict[str, nn.Module]:
    """The modules owning the weights `select_weights` picks, under the same names (arguments as `select_weights`).

    Code that reads the weights throughout a training run keeps their modules rather than the parameters: FSDP2
    replaces each module's parameter objects when it shards and gathers them (see `sharding.current_weights`).
    """
    selected = select_weights(model, target_modules, exclude_modules, spec=spec, group_size_source=group_size_source)
    return {name: model.get_submodule(name.rpartition(".")[0]) for name in selected}


def output_dim(module: nn.Module) -> int:
    """The dimension of `module.weight` that indexes output channels: 1 for GPT-2's `Conv1D` (weight `(in, out)`)
    and transposed convolutions (weight `(in, out, ...)`), 0 for every other layer (Linear, Conv, Embedding: each
    row is an output channel or an embedding vector). Per-channel and group-wise scales follow it."""
    transposed = isinstance(module, _TRANSPOSED_TYPES) or isinstance(module, nn.modules.conv._ConvTransposeNd)
    return 1 if transposed else 0


def output_dims(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> list[int]:
    """`output_dim` of the module owning each of `weights` (named as `select_weights` names them), in order."""
    return [output_dim(model.get_submodule(name.rpartition(".")[0])) for name in weights]
