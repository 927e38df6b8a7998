"""Folders swapped in whole: the old one stays until the new one is complete; leftovers of a kill are tidied."""

import os

import pytest
from slimflow.storage.atomic_dir import FolderMismatch, build_dir, check_hashes, file_hashes, sweep


def _write(folder, files):
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def _read(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f)).read()
            for d, _, fs in os.walk(folder) for f in fs}


def test_a_build_replaces_the_folder_whole_and_an_error_leaves_it_untouched(tmp_path):
    final = str(tmp_path / "m")
    with build_dir(final) as tmp:
        assert os.path.basename(tmp).startswith("m.incomplete-") and not os.path.exists(final)
        _write(tmp, {"a.bin": "1", "sub/b.bin": "2"})
    assert _read(final) == {"a.bin": "1", "sub/b.bin": "2"} and os.listdir(tmp_path) == ["m"]
    with pytest.raises(RuntimeError):
        with build_dir(final) as tmp:
            _write(tmp, {"a.bin": "new"})
            raise RuntimeError("killed")
    assert _read(final) == {"a.bin": "1", "sub/b.bin": "2"} and os.listdir(tmp_path) == ["m"]
    with build_dir(final) as tmp:
        _write(tmp, {"c.bin": "3"})
    assert _read(final) == {"c.bin": "3"} and os.listdir(tmp_path) == ["m"]  # no file of the old one stays


def test_sweep_removes_half_builds_and_puts_back_a_folder_moved_aside(tmp_path):
    final = str(tmp_path / "m")
    _write(final + ".incomplete-x", {"a.bin": "half"})
    _write(final + ".old-y", {"a.bin": "whole"})  # killed between the swap's two renames: no final
    sweep(final)
    assert os.listdir(tmp_path) == ["m"] and _read(final) == {"a.bin": "whole"}
    _write(final + ".old-z", {"a.bin": "older"})  # with a final in place, an old one is just removed
    sweep(final)
    assert os.listdir(tmp_path) == ["m"] and _read(final) == {"a.bin": "whole"}


def test_recorded_hashes_name_the_file_that_does_not_match(tmp_path):
    _write(str(tmp_path), {"a.bin": "1", "meta.json": "{}", "sub/b.bin": "2"})
    files = file_hashes(str(tmp_path), exclude=("meta.json",))
    assert list(files) == ["a.bin", "sub/b.bin"] and files["a.bin"]["bytes"] == 1
    check_hashes(str(tmp_path), files, "redo it")
    _write(str(tmp_path), {"sub/b.bin": "3"})
    with pytest.raises(FolderMismatch, match=f"{tmp_path}/sub/b.bin does not match .*; redo it"):
        check_hashes(str(tmp_path), files, "redo it")
    os.remove(tmp_path / "a.bin")
    with pytest.raises(FolderMismatch, match="a.bin is missing"):
        check_hashes(str(tmp_path), files, "redo it")
