import errno
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.EROFS, "Read-only file system", "/data/out"), "'/data/out' is on a read-only file system"),
        (OSError(errno.ENOSPC, "No space left on device", "/data/out"), "no space left on the device: free some"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/x"), "'/data/x' cannot be accessed"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/FILE/sub"), "a file stands where a folder"),
        (FileExistsError(errno.EEXIST, "File exists", "/data/FILE"), "'/data/FILE' already exists"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere"), "'/nowhere' does not exist"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), "'/data' is a folder where a file belongs"),
    ],
    ids=["read_only", "full", "unreadable", "file_in_path", "file_for_folder", "missing", "folder_for_file"],
)
def test_expected_os_errors_are_one_line_naming_the_path_and_exit_1(capsys, error, expected):
    """The boundary of every entry point (hf-oscq, recipes, bench scripts): each kind of operating-system error a
    user causes is one line naming the path and the fix, exit code 1."""
    from hf_oscq.errors import exit_code

    def fails():
        raise error

    assert exit_code("hf-oscq export", fails) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("hf-oscq export: error: ") and expected in line


def test_unexpected_errors_keep_their_traceback():
    from hf_oscq.errors import exit_code

    for error in (OSError(errno.EIO, "Input/output error"), RuntimeError("a bug"), ValueError("a bug")):

        def fails(error=error):
            raise error

        with pytest.raises(type(error)):
            exit_code("hf-oscq export", fails)


def test_os_errors_say_what_was_done_and_kept_and_stay_os_errors():
    from hf_oscq.errors import OscqError, os_errors

    with pytest.raises(
        OSError, match=r"^Cannot write the export /out: '/out' is on a read-only .* Nothing was"
    ) as raised:
        with os_errors("write the export /out", "Nothing was written."):
            raise OSError(errno.EROFS, "Read-only file system", "/out")
    assert isinstance(raised.value, OscqError) and raised.value.errno == errno.EROFS
    with pytest.raises(OSError) as raised:  # not a user's error: left as it is
        with os_errors("write"):
            raise OSError(errno.EIO, "Input/output error")
    assert not isinstance(raised.value, OscqError)


def test_entry_point_scripts_print_bad_input_as_one_line(tmp_path, capsys, monkeypatch):
    """recipes/ and bench/ scripts run through the same boundary (here recipes/toy_model.py, writing under a file)."""
    import runpy

    (tmp_path / "FILE").write_text("")
    script = Path(__file__).resolve().parents[1] / "recipes" / "toy_model.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--output_dir", str(tmp_path / "FILE" / "sub"), "--steps", "2"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("toy_model.py: error: ") and str(tmp_path / "FILE") in line


ENTRY_POINTS = sorted(
    path
    for folder in ("bench", "recipes")
    for path in (Path(__file__).resolve().parents[1] / folder).glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_script_runs_through_the_error_boundary(script):
    """Every runnable script of bench/ and recipes/ ends in `exit_code` (directly or through the recipes' shared
    `main`), so that bad input is one line and exit 1 in each of them, not in the ones a test happened to try."""
    text = script.read_text()
    main_block = text[text.index('if __name__ == "__main__":') :]
    through_recipe = "from hf_oscq.scripts" in text and "main(" in main_block and script.parent.name == "recipes"
    assert "exit_code(" in main_block or through_recipe, f"{script.name} does not run through hf_oscq.errors.exit_code"


@pytest.mark.parametrize(
    ("script", "arguments"),
    [
        ("aggregate_peers.py", ["--peers", "{missing}"]),
        ("aggregate_peers.py", ["--costs", "{missing}"]),
        ("lm_scale.py", ["--output", "{under_file}"]),
        ("method_cost.py", ["--output", "{under_file}"]),
        ("lm_peers.py", ["--results", "{under_file}"]),
    ],
)
def test_bench_scripts_check_their_paths_before_any_work(tmp_path, capsys, monkeypatch, script, arguments):
    """A bench script given a path it cannot use stops before training or timing anything, with one line naming the
    flag, and writes nothing (aggregate_peers.py does not replace RESULTS' tables with empty ones)."""
    import runpy

    bench = Path(__file__).resolve().parents[1] / "bench"
    (tmp_path / "FILE").write_text("")
    document = tmp_path / "RESULTS.md"
    document.write_text("kept\n")
    paths = {"missing": str(tmp_path / "missing"), "under_file": str(tmp_path / "FILE" / "out.json")}
    argv = [argument.format(**paths) for argument in arguments]
    if script == "aggregate_peers.py":
        argv += ["--document", str(document), "--figures", str(tmp_path)]
    monkeypatch.syspath_prepend(str(bench))
    monkeypatch.setattr(sys, "argv", [str(bench / script), *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(bench / script), run_name="__main__")
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"{script}: error: {arguments[0]} ") and str(tmp_path) in line
    assert document.read_text() == "kept\n" and sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "RESULTS.md"]
