"""The errors hf_oscq raises on purpose: each message is one line saying what was wrong and how to fix it.

Every entry point (`hf-oscq`, the recipe scripts, the bench scripts) runs through one boundary, `exit_code`: an
`OscqError`, or an expected operating-system error (a missing, unreadable or read-only path, a full disk, a file where
a folder belongs: `describe_os_error`), is printed as that one line (exit code 1) instead of a traceback; any other
error keeps its traceback, since it is a bug to report. Everything logs through one handler (`configure_logging`).
The concrete errors keep the built-in base their callers catch (`ValueError` for bad input, `OSError` for files and
folders, `RuntimeError` for failed operations).
"""

import contextlib
import errno
import logging
import sys
from collections.abc import Callable, Iterator


class OscqError(Exception):
    """Base of every error hf_oscq raises for bad input or a failed operation."""


# errno -> (what is wrong with the path, how to fix it): the operating-system errors a user causes and can fix.
_OS_ERRORS = {
    errno.ENOENT: ("does not exist", "check the path"),
    errno.EACCES: (
        "cannot be accessed (permission denied)",
        "pick a path you may read and write, or change its permissions",
    ),
    errno.EPERM: (
        "cannot be changed (operation not permitted)",
        "pick a path you may write, or change its permissions",
    ),
    errno.EROFS: ("is on a read-only file system", "write to a folder on a writable disk"),
    errno.ENOSPC: ("cannot be written: no space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("cannot be written: disk quota exceeded", "free some space or write to another disk"),
    errno.ENOTDIR: ("is not a folder (a file stands where a folder belongs)", "pick a path whose folders are folders"),
    errno.EEXIST: ("already exists", "remove it or pick another path"),
    errno.EISDIR: ("is a folder where a file belongs", "pass a file path"),
    errno.ENAMETOOLONG: ("has a name too long for the file system", "pick a shorter path"),
}


def describe_os_error(error: BaseException) -> str | None:
    """One line naming the path of an expected operating-system error and how to fix it, e.g. `'/data/out' is on a
    read-only file system: write to a folder on a writable disk.`; `None` for any other error (a bug, to be shown
    with its traceback)."""
    if not isinstance(error, OSError) or error.errno not in _OS_ERRORS:
        return None
    what, fix = _OS_ERRORS[error.errno]
    paths = [str(path) for path in (error.filename, error.filename2) if path is not None]
    subject = " -> ".join(repr(path) for path in paths) if paths else "A file or folder"
    return f"{subject} {what}: {fix}."


class OscqOSError(OscqError, OSError):
    """A file or folder operation that failed for a reason the user can fix (read-only, full, missing, a file where a
    folder belongs); the message names the path, what was being done, how to fix it and what was kept."""


def os_error(error: OSError, doing: str, kept: str = "") -> OSError:
    """`error` as an `OscqOSError` whose one-line message says what was being done and what was kept (e.g. `Cannot
    write the export to '/out': '/out' is on a read-only file system: write to a folder on a writable disk. Nothing
    was written.`), or `error` itself when it is not an expected operating-system error (`describe_os_error`)."""
    described = describe_os_error(error)
    if described is None:
        return error
    converted = OscqOSError(f"Cannot {doing}: {described}" + (f" {kept}" if kept else ""))
    converted.errno = error.errno  # callers branching on the errno still can
    return converted


@contextlib.contextmanager
def os_errors(doing: str, kept: str = "") -> Iterator[None]:
    """Turns the expected operating-system errors raised inside into `OscqOSError`s (see `os_error`)."""
    try:
        yield
    except OSError as error:
        converted = error if isinstance(error, OscqError) else os_error(error, doing, kept)
        if converted is error:
            raise
        raise converted from error


def exit_code(program: str, run: Callable[[], int | None]) -> int:
    """Runs a command-line entry point: its exit code (0 for None), or 1 after writing an `OscqError` raised by `run`,
    or an expected operating-system error (`describe_os_error`), as one line on stderr, `<program>: error:
    <message>`, or 130 (the shell's code for Ctrl-C) after writing `<program>: interrupted` when the user interrupts
    it (Ctrl-C) instead of a traceback. Any other error propagates with its traceback."""
    try:
        return run() or 0
    except OscqError as error:
        return _fail(program, str(error))
    except OSError as error:
        message = describe_os_error(error)
        if message is None:
            raise
        return _fail(program, message)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{program}: interrupted\n")
        return 130


def _fail(program: str, message: str) -> int:
    message = " ".join(message.splitlines())
    sys.stderr.write(f"{program}: error: {message}\n")
    return 1


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
