"""The training methods of `OscillationTrainer` (`osc_method`), one module each, and the registry that maps their
names to them: the Trainer, `OscillationConfig`, the model cards, the recipes and the Space ask the method
(`get_method(name)`) what it adds to the loss, which settings it reads, and how to name it.

| `osc_method` | what it trains with |
|---|---|
| `"oscillation"` | the paper's regularizer, full-precision forward pass (PAPER.md section 3) |
| `"qat"` | quantization-aware training at `osc_bits` (the paper's QAT baseline) |
| `"none"` | plain training (the FP + PTQ baseline) |
| `"kure"` | KURE's kurtosis regularizer (Shkolnik et al. 2020), full-precision forward pass |
| `"multibit_qat"` | QAT at every bit-width of `osc_multibit_bits` at once (Any-Precision DNN, MatQuant) |
| `"dampening"` | QAT plus Nagel et al.'s oscillation dampening (2022) |

A new method is one module defining a `TrainingMethod` subclass and one `register_method` call here. An export's
manifest stores its own method under `training.osc_method` and its baselines' cross-bit tables under `comparisons`,
keyed by each method's `comparison_key` (`"fp_ptq"` for `"none"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import OscqValueError
from ...paper import PAPER
from .base import MethodLoss, TrainingMethod, TrainingStep
from .dampening import OscillationDampening
from .kure import KurtosisRegularization
from .multibit import MultiBitQAT
from .oscillation import OscillationRegularizer
from .plain import FP_PTQ, PlainTraining
from .qat import QuantizationAwareTraining

__all__ = [
    "DEFAULT_METHOD",
    "FP_PTQ",
    "OSC_METHODS",
    "MethodLoss",
    "TrainingMethod",
    "TrainingStep",
    "comparison_key",
    "find_method",
    "get_method",
    "method_names",
    "method_sentence",
    "register_method",
    "run_label",
    "run_tag",
    "trained_how",
]

_METHODS: dict[str, TrainingMethod] = {}


def register_method(method: TrainingMethod) -> TrainingMethod:
    """Adds `method` to the registry under `method.name` (what `osc_method` takes) and returns it.

    Raises:
        OscqValueError: when another method has that name.
    """
    if method.name in _METHODS and type(_METHODS[method.name]) is not type(method):
        raise OscqValueError(f"A training method named {method.name!r} is registered already.")
    _METHODS[method.name] = method
    return method


for _method in (
    OscillationRegularizer(),
    QuantizationAwareTraining(),
    PlainTraining(),
    KurtosisRegularization(),
    MultiBitQAT(),
    OscillationDampening(),
):
    register_method(_method)

DEFAULT_METHOD = OscillationRegularizer.name
# The built-in methods, in registration order (the paper's three first); `method_names()` also lists the methods
# registered later with `register_method`.
OSC_METHODS = tuple(_METHODS)


def method_names() -> tuple[str, ...]:
    """The names of every registered method, methods registered after import included."""
    return tuple(_METHODS)


def find_method(name: str | None) -> TrainingMethod | None:
    """The method registered as `name` or whose `comparison_key` is `name`, else `None`."""
    if name in _METHODS:
        return _METHODS[name]
    return next((method for method in _METHODS.values() if method.comparison_key == name), None)


def get_method(name: str) -> TrainingMethod:
    """The method registered as `name`.

    Raises:
        OscqValueError: for a name no method is registered under, listing the names.
    """
    method = _METHODS.get(name)
    if method is None:
        spelled = str(name).strip().lower().replace("-", "_")
        hint = (
            f" Did you mean {spelled!r}? Method names are lower case, words joined by '_'."
            if spelled in _METHODS
            else ""
        )
        raise OscqValueError(f"osc_method must be one of {method_names()}, got {name!r}.{hint}")
    return method


def comparison_key(method: str) -> str:
    """The key of a baseline trained with `method` in an export's `comparisons`: `"fp_ptq"` for `"none"`."""
    return get_method(method).comparison_key


def run_label(key: str | None, short: bool = False) -> str:
    """Label of a run by its method or comparison key: `"oscillation regularizer"` (short: `"Oscillation"`),
    `"QAT"`, `"FP + PTQ"`, ...; an unknown key is its own label, `None` is `"model"`."""
    if key is None:
        return "model"
    method = find_method(key)
    if method is None:
        return key
    return method.short_label if short else method.label


def method_sentence(record: Mapping[str, Any]) -> str:
    """How a run was trained, as the sentence model cards open their training section with, from its training record
    or settings (`osc_method`, `osc_bits`, `osc_lambda`, `osc_penalty_normalization` and the method's own settings,
    as `OscillationConfig.method_settings()` gives them)."""
    method = record.get("osc_method")
    found = find_method(method or DEFAULT_METHOD)
    return f"Trained with osc_method={method!r}." if found is None else found.sentence(record)


def trained_how(method: str | None) -> str:
    """How a model was trained, as the export cards' summaries say it (`"with the oscillation regularizer of ..."`)."""
    found = find_method(method or DEFAULT_METHOD)
    return "with hf_oscq" if found is None else found.trained_how.format(paper=PAPER)


def run_tag(method: str, settings: Mapping[str, Any]) -> str:
    """A run's row label in tables (`"oscillation regularizer @3"`, `"QAT @3"`, `"FP + PTQ"`, `"multi-bit QAT
    {2,4,8}"`) from its method and settings (`osc_bits`, `osc_lambda`, the method's own)."""
    found = find_method(method)
    return method if found is None else found.tag(settings)
