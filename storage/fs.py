"""One filesystem API for local paths and fsspec URLs (``s3://``, ``gs://``, ``memory://``).

Every write goes through :func:`atomic_write_bytes`: readers never see a half-written file, because the
bytes land in a temporary sibling that is fsynced and then renamed over the target (POSIX rename is
atomic). Object stores have no rename, but a single PUT is already all-or-nothing there.
"""

from __future__ import annotations

import errno
import os
import posixpath
import tempfile
import uuid

import fsspec


def is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _strip_file(path: str) -> str:
    return str(path)[len("file://") :] if str(path).startswith("file://") else str(path)


def fs_for(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path as that filesystem names it."""
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs, p


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(_strip_file(base), *parts)
    return posixpath.join(str(base), *parts)


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(_strip_file(path))
    fs, p = fs_for(path)
    return fs.exists(p)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(_strip_file(path), exist_ok=True)
    else:
        fs, p = fs_for(path)
        fs.makedirs(p, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if is_local(path):
        with open(_strip_file(path), "rb") as f:
            return f.read()
    fs, p = fs_for(path)
    return fs.cat_file(p)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries directly under ``path``; empty when it does not exist."""
    if is_local(path):
        p = _strip_file(path)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    fs, p = fs_for(path)
    if not fs.exists(p):
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


def remove(path: str) -> None:
    if is_local(path):
        p = _strip_file(path)
        if os.path.isdir(p):
            import shutil

            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    else:
        fs, p = fs_for(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)


def _fsync_dir(path: str) -> None:
    # The rename is only durable once the directory entry is on disk too.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. tmpfs on some kernels) refuse fsync on directories
    finally:
        os.close(fd)


class WriteError(OSError):
    """A file could not be written (disk full, read-only, a file where a folder should be): names the path."""


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space (or choose another --out), then rerun to resume",
    errno.EDQUOT: "the disk quota is exceeded: free some space (or choose another --out), then rerun to resume",
    errno.EACCES: "permission denied: make the folder writable or choose another --out",
    errno.EPERM: "permission denied: make the folder writable or choose another --out",
    errno.EROFS: "the filesystem is read-only: choose another --out",
    errno.EEXIST: "a file is in the way where a folder is needed: choose another --out",
    errno.ENOTDIR: "a file is in the way where a folder is needed: choose another --out",
}


def _write_error(path: str, e: OSError) -> WriteError:
    reason = _WRITE_HINTS.get(e.errno or -1, e.strerror or str(e))
    where = ""
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        parent = os.path.dirname(os.path.abspath(path))
        while parent != os.path.dirname(parent) and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        where = f" ({parent} is a file)" if os.path.isfile(parent) else ""
    return WriteError(e.errno, f"cannot write {path}{where}: {reason}")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one.

    An ``OSError`` (disk full, read-only, a file where a folder should be) is raised as :class:`WriteError`
    naming ``path`` and how to fix it; the temporary file is removed and the old ``path`` stays as it was.
    """
    try:
        _atomic_write_bytes(path, data)
    except WriteError:
        raise
    except OSError as e:
        raise _write_error(path, e) from e


def _atomic_write_bytes(path: str, data: bytes) -> None:
    if not is_local(path):
        fs, p = fs_for(path)
        parent = posixpath.dirname(p)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(p, data)
        return
    path = _strip_file(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".{uuid.uuid4().hex[:6]}.tmp",
                               dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(parent)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
