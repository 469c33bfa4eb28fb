"""The errors hf_oscq raises on purpose: each message is one line saying what was wrong and how to fix it.

`hf-oscq` and the recipe scripts print any `OscqError` as that one line (exit code 1) instead of a traceback
(`exit_code`), and log through one handler (`configure_logging`). The concrete errors keep the built-in base their
callers catch (`ValueError` for bad input, `RuntimeError` for failed operations).
"""

import logging
import sys
from collections.abc import Callable

# Libraries that give their root logger a stream handler of their own and still pass records on to the root
# logger's handler: each of their warnings would print twice under `configure_logging`.
_SELF_PRINTING_LOGGERS = ("datasets", "huggingface_hub")


class OscqError(Exception):
    """Base of every error hf_oscq raises for bad input or a failed operation."""


def exit_code(program: str, run: Callable[[], int | None]) -> int:
    """Runs a command-line entry point: its exit code (0 for None), or 1 after writing an `OscqError` raised by `run`
    as one line on stderr, `<program>: error: <message>`."""
    try:
        return run() or 0
    except OscqError as error:
        message = " ".join(str(error).splitlines())
        sys.stderr.write(f"{program}: error: {message}\n")
        return 1


def configure_logging(level: int = logging.INFO, format: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Logging of a command-line entry point, the Space or a benchmark: records of `level` and above on stderr in
    `format`, each record once. The libraries that print with a stream handler of their own (`datasets`,
    `huggingface_hub`, as transformers does) keep their handler, level and format, and stop passing their records on
    to the root logger's. Where the root logger already has a handler (an application's or pytest's logging), nothing
    changes."""
    if logging.root.handlers:
        return
    logging.basicConfig(level=level, format=format)
    for name in _SELF_PRINTING_LOGGERS:
        logging.getLogger(name).propagate = False


class OscqValueError(OscqError, ValueError):
    """An argument, setting, tensor or file that hf_oscq cannot use (bad bit-width, no weight selected, NaN weights,
    corrupted codes, ...)."""
