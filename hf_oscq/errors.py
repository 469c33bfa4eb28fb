"""The errors hf_oscq raises on purpose: each message is one line saying what was wrong and how to fix it.

`hf-oscq` and the recipe scripts print any `OscqError` as that one line (exit code 1) instead of a traceback
(`exit_code`), and log through one handler (`configure_logging`). The concrete errors keep the built-in base their
callers catch (`ValueError` for bad input, `RuntimeError` for failed operations).
"""

import logging
import sys
from collections.abc import Callable


class OscqError(Exception):
    """Base of every error hf_oscq raises for bad input or a failed operation."""


def exit_code(program: str, run: Callable[[], int | None]) -> int:
    """Runs a command-line entry point: its exit code (0 for None), or 1 after writing an `OscqError` raised by `run`
    as one line on stderr, `<program>: error: <message>`, or 130 (the shell's code for Ctrl-C) after writing
    `<program>: interrupted` when the user interrupts it (Ctrl-C) instead of a traceback."""
    try:
        return run() or 0
    except OscqError as error:
        message = " ".join(str(error).splitlines())
        sys.stderr.write(f"{program}: error: {message}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{program}: interrupted\n")
        return 130


def configure_logging(level: int = logging.INFO, format: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Logging of a command-line entry point, the Space or a benchmark: records of `level` and above on stderr in
    `format`, each record once. A record that a library's console handler of its own has already printed
    (`datasets`, `huggingface_hub`, and `transformers` where the `CI` environment variable makes it pass records on)
    keeps that library's format and is not printed again (`_PrintedByItsLibrary`). Where the root logger already has
    a handler (an application's or pytest's logging), nothing changes."""
    if logging.root.handlers:
        return
    logging.basicConfig(level=level, format=format)
    for handler in logging.root.handlers:
        handler.addFilter(_PrintedByItsLibrary())


class _PrintedByItsLibrary(logging.Filter):
    """Drops a record that reached the root logger's handler through a logger below root with a console handler of
    its own that took the record (a stream handler other than a file, of the record's level or lower): that handler
    has printed it already. A record that reaches root has propagated through every logger of its name's chain, so
    the chain is all there is to look at. Looked up per record, so a library imported or reconfigured later is
    covered too."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        while logger is not logging.root:
            if any(_prints_to_console(handler, record) for handler in logger.handlers):
                return False
            logger = logger.parent
        return True


def _prints_to_console(handler: logging.Handler, record: logging.LogRecord) -> bool:
    console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    return console and record.levelno >= handler.level


class OscqValueError(OscqError, ValueError):
    """An argument, setting, tensor or file that hf_oscq cannot use (bad bit-width, no weight selected, NaN weights,
    corrupted codes, ...)."""
