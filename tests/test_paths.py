import os

import pytest

from hf_oscq.paths import child_path


def test_a_plain_name_gives_the_child_path(tmp_path):
    assert child_path(tmp_path, "vit-w3") == tmp_path / "vit-w3"
    assert child_path(tmp_path, "..hidden") == tmp_path / "..hidden"  # dots inside a name are fine


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\\b", "/etc", "a\0b"])
def test_names_leaving_the_folder_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="cannot name a folder inside"):
        child_path(tmp_path, name)


def test_a_symlink_leading_outside_is_refused(tmp_path):
    (tmp_path / "inside").mkdir()
    os.symlink(tmp_path, tmp_path / "inside" / "escape")
    with pytest.raises(ValueError, match="leads outside"):
        child_path(tmp_path / "inside", "escape")


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch):
    """`check_output_path`, which `hf-oscq export --output`, `hf-oscq eval --output_json` and `export_quantized`
    call before loading anything: a file where a folder belongs (directly above, or higher up), and a folder that
    cannot be written (read-only file system; tests run as root, so `os.access` is what reports it)."""
    from hf_oscq.paths import check_output_path

    (tmp_path / "FILE").write_text("")
    assert check_output_path(tmp_path / "new" / "deeper", "--output") == tmp_path / "new" / "deeper"
    for path in (tmp_path / "FILE" / "sub", tmp_path / "FILE" / "a" / "b"):
        with pytest.raises(
            ValueError, match=rf"^--output .*: '{tmp_path / 'FILE'}' is a file, where a folder belongs"
        ):
            check_output_path(path, "--output")
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))  # a read-only folder
    with pytest.raises(ValueError, match=rf"the folder '{tmp_path}' cannot be written \(read-only file system"):
        check_output_path(tmp_path / "out", "--output_json")


def test_an_output_of_the_wrong_kind_is_refused(tmp_path):
    """A file output (`--output_json`, a bench record) where a folder stands, and a folder output (`--output_dir`,
    `--results`) where a file stands, are refused naming both; either kind may replace one of its own."""
    from hf_oscq.paths import check_output_path, not_a_folder

    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    with pytest.raises(ValueError, match=rf"^--output_json '{tmp_path / 'DIR'}' is a folder, where a file belongs"):
        check_output_path(tmp_path / "DIR", "--output_json", "file")
    with pytest.raises(ValueError, match=rf"^--output_dir '{tmp_path / 'FILE'}' is a file, where a folder belongs"):
        check_output_path(tmp_path / "FILE", "--output_dir", "folder")
    assert check_output_path(tmp_path / "FILE", "--output_json", "file") == tmp_path / "FILE"
    assert check_output_path(tmp_path / "DIR", "--output_dir", "folder") == tmp_path / "DIR"
    assert not_a_folder(tmp_path / "FILE") == "is a file, not a folder"
    assert not_a_folder(tmp_path / "missing") == "does not exist"
