"""Result files: written whole or not at all, with the mode a plain open gives, and errors naming the target."""

import os

import pytest

from graspext._io import write_text


def test_errors_name_the_target_not_the_temporary_file(tmp_path):
    target = tmp_path / "missing-folder" / "summary.json"
    with pytest.raises(OSError, match=f"cannot write {target}") as info:
        write_text(target, "{}")
    assert ".tmp-" not in str(info.value)


def test_mode_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind
