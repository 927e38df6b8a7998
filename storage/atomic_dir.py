"""Output folders replaced whole (issue 13): built aside, hashed, swapped in.

A folder of files that go together (an exported student: model.onnx, vocab.json, ...; a fitted teacher) is
never rewritten file by file, where a kill midway leaves a new model beside an old vocabulary. Instead::

    with build_dir("run/export/bow") as tmp:      # run/export/bow.incomplete-<random>, empty
        ...write every file into tmp...
        meta["files"] = file_hashes(tmp)           # {name: {bytes, sha256}}
        ...write the marker (student.json) into tmp, last...
    # on leaving the block: files fsynced, bow -> bow.old-<random>, bow.incomplete-... -> bow, old deleted

The old folder stays whole until the new one is complete. Between the two renames (microseconds) the folder
is absent: a reader that finds it missing, or finds files that do not match the marker's hashes (it read
across a swap), reads again once (tasks/students/export.Predictor). A kill leaves at most a
``.incomplete-*`` (never read: the folder's name is not on it) or, between the renames, a ``.old-*`` with no
folder: the next build of that folder removes the first and puts the second back first (:func:`sweep`).
Local paths only (rename is the point): run directories are local or mounted (docs/operations.md).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from slimflow.storage.fs import _fsync_dir, _write_error, is_local
from slimflow.storage.hashing import sha256_bytes, sha256_file

INCOMPLETE = ".incomplete-"
OLD = ".old-"


class FolderMismatch(ValueError):
    """A folder's file does not match the hash its marker records (altered, or mixed from two writes)."""


def _leftovers(final: str, tag: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(final))
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(name + tag))


def sweep(final: str) -> None:
    """Tidy what a killed build of ``final`` left: ``.incomplete-*`` folders are removed; a ``.old-*`` with no
    ``final`` (killed between the swap's two renames) was the whole previous folder and is put back."""
    for path in _leftovers(final, INCOMPLETE):
        shutil.rmtree(path)
    for path in _leftovers(final, OLD):
        if not os.path.lexists(final):
            os.rename(path, final)
        else:
            shutil.rmtree(path)


def _fsync_tree(root: str) -> None:
    # Every file and folder durable before the rename publishes them (a power cut must not publish holes).
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)


def swap_in(staging: str, final: str) -> None:
    """Put the complete folder ``staging`` at ``final``; the previous ``final`` is deleted only once it is."""
    _fsync_tree(staging)
    old = None
    if os.path.lexists(final):
        old = f"{final}{OLD}{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(staging, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def build_dir(final: str) -> Iterator[str]:
    """An empty folder beside ``final`` to write the new one into; swapped in at ``final`` when the block ends
    without an exception (see the module docstring). On an exception it is removed and ``final`` is untouched.
    """
    if not is_local(final):
        raise ValueError(f"{final}: folders are built and swapped on a local path; object-store URLs are not "
                         "supported")
    final = os.path.abspath(final.removeprefix("file://"))
    try:
        sweep(final)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        staging = f"{final}{INCOMPLETE}{secrets.token_hex(4)}"
        os.mkdir(staging)
    except OSError as e:
        raise _write_error(final, e) from e
    try:
        yield staging
        swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a half-built folder is never kept; the error goes on
        raise


def file_hashes(folder: str, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder`` but ``exclude`` (the marker)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel not in exclude:
                out[rel] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    return dict(sorted(out.items()))


def check_hashes(folder: str, files: dict[str, dict], fix: str) -> None:
    """Raise :class:`FolderMismatch` naming the first file of ``files`` that is missing under ``folder`` or does
    not match its recorded sha256; ``fix`` says what to run."""
    for rel, rec in files.items():
        path = os.path.join(folder, rel)
        if not os.path.exists(path):
            raise FolderMismatch(f"{path} is missing, though {folder} records it; {fix}")
        if sha256_file(path) != rec["sha256"]:
            raise FolderMismatch(f"{path} does not match the sha256 {folder} records for it (altered, or left "
                                 f"from another write); {fix}")


def check_blob(path: str, data: bytes, rec: dict | None, fix: str) -> bytes:
    """``data``, read from ``path``, if it matches ``rec`` (its marker's {bytes, sha256}); else
    :class:`FolderMismatch` naming ``path``. For readers that hash what they load rather than read it twice."""
    if rec is None:
        raise FolderMismatch(f"{path} is not among the files its folder records; {fix}")
    if sha256_bytes(data) != rec["sha256"]:
        raise FolderMismatch(f"{path} does not match the sha256 its folder records for it (altered, or left from "
                             f"another write); {fix}")
    return data
