"""The training methods (`osc_method`) and the labels runs carry in tables, plots, model cards and the Space.

An export's manifest stores its own method under `training.osc_method` and its baselines' cross-bit tables under
`comparisons`, keyed by method, except that the plain-training baseline is `"fp_ptq"` (full precision, then PTQ).
Pure Python.
"""

from __future__ import annotations

OSCILLATION, QAT, NONE = "oscillation", "qat", "none"
OSC_METHODS = (OSCILLATION, QAT, NONE)
FP_PTQ = "fp_ptq"  # comparison key of the plain-training baseline

# run key -> (label on model cards, short label in the Space and tables)
_LABELS = {
    OSCILLATION: ("oscillation regularizer", "Oscillation"),
    QAT: ("QAT", "QAT"),
    NONE: ("FP + PTQ", "FP + PTQ"),
    FP_PTQ: ("FP + PTQ", "FP + PTQ"),
}


def comparison_key(method: str) -> str:
    """The key of a baseline trained with `method` in an export's `comparisons`: `"fp_ptq"` for `"none"`."""
    return FP_PTQ if method == NONE else method


def run_label(key: str | None, short: bool = False) -> str:
    """Label of a run by its method or comparison key: `"oscillation regularizer"` (short: `"Oscillation"`),
    `"QAT"`, `"FP + PTQ"`; an unknown key is its own label, `None` is `"model"`."""
    if key is None:
        return "model"
    labels = _LABELS.get(key)
    return key if labels is None else labels[short]


def method_sentence(
    method: str | None, bits: int | None = None, osc_lambda: float | None = None, normalization: str | None = None
) -> str:
    """How a run was trained, as the sentence model cards open their training section with."""
    from ..paper import PAPER

    normalized = f" with the `{normalization}` penalty normalization" if normalization else ""
    return {
        OSCILLATION: f"Trained with the oscillation regularizer of {PAPER} at {bits} bits "
        f"(`osc_lambda = {osc_lambda}`){normalized}, full-precision forward pass, then rounded after training.",
        QAT: f"Trained with quantization-aware training at {bits} bits (baseline of {PAPER}).",
        NONE: "Trained in full precision without any quantization term (the FP + PTQ baseline).",
    }.get(method or OSCILLATION, f"Trained with osc_method={method!r}.")
