import os
import subprocess
import sys

import pytest

# Logs a warning through the loggers of the libraries that print with a handler of their own, with hf_oscq's
# entry-point logging set up before (as hf-oscq does, importing them lazily) or after they are imported.
SCRIPT = """
import logging
from hf_oscq.errors import configure_logging
if {before}:
    configure_logging()
import datasets, huggingface_hub, transformers
if not {before}:
    configure_logging()
huggingface_hub.utils.logging.get_logger("huggingface_hub.utils._http").warning("hub-warning")
datasets.utils.logging.get_logger("datasets.load").warning("datasets-warning")
transformers.utils.logging.get_logger("transformers.modeling_utils").warning("transformers-warning")
logging.getLogger("hf_oscq.cli").info("hf_oscq-info")
"""


# transformers passes its records on to the root logger only where the `CI` environment variable is set.
@pytest.mark.parametrize("ci", [None, "true"])
@pytest.mark.parametrize("before", [True, False])
def test_entry_point_logging_prints_each_library_warning_once(before, ci):
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci is not None:
        env["CI"] = ci
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(before=before)], capture_output=True, text=True, check=True, env=env
    )
    lines = result.stderr.splitlines()
    for message in ("hub-warning", "datasets-warning", "transformers-warning"):
        assert sum(message in line for line in lines) == 1, result.stderr
    assert "INFO hf_oscq.cli: hf_oscq-info" in lines


def test_an_interrupted_entry_point_prints_one_line_and_exits_130(capsys):
    from hf_oscq.errors import exit_code

    def interrupted():
        raise KeyboardInterrupt

    assert exit_code("hf-oscq export", interrupted) == 130
    assert capsys.readouterr().err.strip() == "hf-oscq export: interrupted"
