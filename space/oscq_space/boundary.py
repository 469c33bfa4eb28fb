"""The Space's error boundary: every button's handler returns a page, never a stack trace.

An error hf_oscq raises on purpose (`OscqError`), a bad upload (`InputError`) or an expected operating-system error
(a missing or unreadable file) becomes its one-line message on the page; any other error is logged with its traceback
(a bug to report) and the page says that the action failed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from hf_oscq.errors import OscqError, describe_os_error

from .classify import InputError

logger = logging.getLogger(__name__)


def warning(message: str) -> str:
    """A message shown as a warning on the page, on one line."""
    return f"**⚠️ {' '.join(message.split())}**"


def on_page(failed: Callable[[str], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wraps a handler: its result, or `failed(<warning message>)` (the handler's outputs with that message and empty
    results) when it raises."""

    def wrap(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except (OscqError, InputError) as error:
                return failed(warning(str(error)))
            except Exception as error:  # the page must stay up whatever a checkpoint does
                described = describe_os_error(error)
                if described is not None:
                    return failed(warning(described))
                logger.exception("%s failed", handler.__name__)
                return failed(warning(f"This failed ({type(error).__name__}: {error}); the log has the details."))

        return run

    return wrap
