"""Output paths: checked before any work; atomic writes that follow the umask."""

import os
import stat

import pytest

from genknowsub_fast.paths import check_output_dir, check_output_file, write_atomically


def test_check_output_file(tmp_path):
    assert check_output_file(tmp_path / "x.bin") == str(tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists() and list(tmp_path.iterdir()) == [], "the check leaves nothing behind"
    for path, match in (
        (tmp_path / "missing" / "x.bin", "does not exist"),
        (tmp_path, "is a directory"),
        ("", "empty path"),
        ("/proc/x.bin", "cannot write in '/proc'"),
    ):
        with pytest.raises(ValueError, match=match):
            check_output_file(path, "--output")


def test_check_output_dir_creates_it(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == str(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="cannot be created"):
        check_output_dir("/proc/genknowsub-fast-test")


def test_write_atomically_follows_the_umask_and_cleans_up(tmp_path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write("new")
        os.chmod(tmp, 0o600)  # as safetensors' save_file leaves it

    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "out", write)
    finally:
        os.umask(old)
    assert (tmp_path / "out").read_text() == "new"
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o640

    def fail(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(tmp_path / "out", fail)
    assert (tmp_path / "out").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ValueError, match="cannot write"):
        write_atomically(tmp_path / "missing" / "out", write)
