import os

import pytest

from storage import fs


def test_atomic_write_replaces_whole_file(tmp_path):
    p = str(tmp_path / "a" / "f.bin")
    fs.atomic_write_bytes(p, b"old")
    fs.atomic_write_bytes(p, b"new contents")
    assert open(p, "rb").read() == b"new contents"
    assert os.listdir(tmp_path / "a") == ["f.bin"]  # no temp file left behind


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    p = str(tmp_path / "f.json")
    fs.atomic_write_text(p, "committed")

    def killed(src, dst):  # the process dies between writing the temp file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        fs.atomic_write_text(p, "half")
    monkeypatch.undo()
    assert open(p).read() == "committed"
    assert os.listdir(tmp_path) == ["f.json"]


def test_full_disk_is_an_error_and_keeps_state(tmp_path, monkeypatch):
    import errno

    p = tmp_path / "m.json"
    fs.atomic_write_text(str(p), "v1")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        fs.atomic_write_text(str(p), "v2")
    monkeypatch.undo()
    assert p.read_text() == "v1"
    assert os.listdir(tmp_path) == ["m.json"]


def test_memory_filesystem_goes_through_the_same_api():
    url = "memory://slimflow-test/x/y.txt"
    fs.atomic_write_text(url, "hello")
    assert fs.exists(url)
    assert fs.read_bytes(url) == b"hello"
    assert fs.listdir("memory://slimflow-test/x") == ["y.txt"]
    fs.remove(url)
    assert not fs.exists(url)
