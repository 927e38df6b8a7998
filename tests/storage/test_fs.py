import os

import pytest
from slimflow.storage import fs


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
    with pytest.raises(OSError, match=f"cannot write {p}: the disk is full") as e:
        fs.atomic_write_text(str(p), "v2")
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
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


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_file_where_a_folder_should_be_names_it(tmp_path, below):
    blocker = tmp_path / "out"
    blocker.write_text("I am a file")
    target = os.path.join(blocker, below, "config.json") if below else os.path.join(blocker, "config.json")
    with pytest.raises(fs.WriteError, match=f"cannot write {target} \\({blocker} is a file\\): a file is in the way"):
        fs.atomic_write_text(target, "{}")
    assert blocker.read_text() == "I am a file"


def _tiny_tmpfs(path):
    """A 64 KiB tmpfs at ``path`` (real ENOSPC), or None where mounting is not allowed (not root, containers)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    return path if r.returncode == 0 else None


def test_a_really_full_disk_keeps_the_committed_file(tmp_path):
    import subprocess

    mnt = _tiny_tmpfs(tmp_path / "small")
    if mnt is None:
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched ENOSPC test covers the logic")
    try:
        p = str(mnt / "manifest.json")
        fs.atomic_write_text(p, "committed")
        with pytest.raises(fs.WriteError, match=f"cannot write {p}: the disk is full"):
            fs.atomic_write_bytes(p, b"x" * 200_000)  # more than the 64 KiB filesystem holds
        assert open(p).read() == "committed" and os.listdir(mnt) == ["manifest.json"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
