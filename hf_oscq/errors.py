"""The errors hf_oscq raises on purpose: each message is one line saying what was wrong and how to fix it.

`hf-oscq` prints any `OscqError` as that one line (exit code 1) instead of a traceback. The concrete errors keep the
built-in base their callers catch (`ValueError` for bad input, `RuntimeError` for failed operations).
"""


class OscqError(Exception):
    """Base of every error hf_oscq raises for bad input or a failed operation."""


class OscqValueError(OscqError, ValueError):
    """An argument, setting, tensor or file that hf_oscq cannot use (bad bit-width, no weight selected, NaN weights,
    corrupted codes, ...)."""
