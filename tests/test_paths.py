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
