"""The Space's error boundary: every button's handler answers with a page, bad input as one line on it."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_oscq import OscqValueError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "space"))

from oscq_space import boundary  # noqa: E402
from oscq_space.text import generate_view  # noqa: E402
from oscq_space.views import accuracy_view, classify_view, weights_view  # noqa: E402


def _family_whose_tokenizer_raises(error: BaseException):
    def tokenizer(*args, **kwargs):
        raise error

    return {"lm": SimpleNamespace(name="lm", tokenizer=tokenizer, loaded=[])}


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (OscqValueError("The prompt cannot be used:\nfix it."), "**⚠️ The prompt cannot be used: fix it.**"),
        (
            OSError(errno.ENOENT, "No such file or directory", "/models/w3/tokenizer.json"),
            "**⚠️ '/models/w3/tokenizer.json' does not exist: check the path.**",
        ),
    ],
    ids=["oscq_error", "missing_file"],
)
def test_expected_errors_in_a_handler_are_one_line_on_the_page(error, message, caplog):
    with caplog.at_level(logging.ERROR):
        assert generate_view(_family_whose_tokenizer_raises(error), "lm", "And God said", 4) == (message, [])
    assert not caplog.records


def test_unexpected_errors_are_logged_with_their_traceback_and_the_page_stays_up(caplog):
    with caplog.at_level(logging.ERROR, logger="oscq_space.boundary"):
        result = generate_view(_family_whose_tokenizer_raises(RuntimeError("a bug")), "lm", "And God said", 4)
    assert result == ("**⚠️ This failed (RuntimeError: a bug); the log has the details.**", [])
    (record,) = caplog.records
    assert record.exc_info is not None and "generate_view failed" in record.getMessage()


def test_every_handler_is_behind_the_boundary():
    """Classify, Accuracy, Weights and Text: the handlers the page's buttons call."""
    for handler in (classify_view, accuracy_view, weights_view, generate_view):
        assert handler.__wrapped__.__module__.startswith("oscq_space."), handler
    assert boundary.warning("two\nlines") == "**⚠️ two lines**"
