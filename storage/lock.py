"""One writer per run directory: ``RUN_DIR/.slimflow.lock`` (issue 13).

Two runs writing one run directory break each other: the second one's manifest commit sweeps shard files the
first is still reading (CorruptShardError). Every command that writes a run directory holds this lock while it
runs; a second one waits for it (or, with ``--no-wait``, stops at once), told who holds it.

How: ``fcntl.flock`` on a lock file that stays, rather than creating the file with ``O_CREAT | O_EXCL``. The
kernel drops a flock when its holder dies, SIGKILL included, so a dead holder's lock is free at once: no guess
from a pid that may have been reused, no lock a crash leaves behind, and the same holds across hosts on NFS
(Linux maps flock onto NFS byte-range locks, which the server drops when the client's lease ends), where an
``O_EXCL`` file written by a dead process on another host could never be told apart from a live one. The file
is never deleted: deleting it would let a newcomer lock a new file while another process still holds (or is
about to lock) the old one. Its content is only the holder's record (host, pid, process start time, start
time, command, a random token) for the waiting message; the holder empties it when it releases, so a record
found under a free lock is one its holder never cleared: it died, and the taker says so.

The lock is per process and re-entrant: a process that holds it (the CLI) may take it again (the pipeline
flow, each stage flow) without waiting for itself. Threads of one process share it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from slimflow.storage.fs import _write_error, is_local

LOCK_FILE = ".slimflow.lock"
_HOLDER_WAIT_S = 2.0  # how long a waiter reads an empty record while the new holder is still writing it

_held: dict[str, list] = {}  # realpath of the lock file -> [fd, depth]: the locks this process holds
_held_guard = threading.Lock()


class RunDirBusy(RuntimeError):
    """The run directory is in use by another run (``wait=False``): the message names the holder."""


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_FILE)


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names one
    process, so a reused pid is not taken for the holder. None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def _alive(holder: dict) -> bool | None:
    """Whether the holder's process still runs: None when that cannot be known (another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    start = holder.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)


def describe(holder: dict | None) -> str:
    """A holder record as words: ``pid 123 on host h, since 2026-12-01 03:00:00 UTC (`slimflow run ...`)``."""
    if not holder:
        return "another process (it has not written its name yet)"
    command = f" (`{holder['command']}`)" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}{command}"


def _read_record(fd: int) -> dict | None:
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a record half-written: the holder is writing it now


def read_holder(run_dir: str) -> dict | None:
    """The record in ``run_dir``'s lock file (the holder, or a holder that died), or None."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read_record(fd)
    finally:
        os.close(fd)


def _record(token: str) -> bytes:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = " ".join(["slimflow", *sys.argv[1:]]) if os.path.basename(sys.argv[0]) in ("slimflow", "cli.py") \
        else " ".join(sys.argv)[:300]
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                       "started": now, "command": command, "token": token}).encode("utf-8")


def _open(run_dir: str) -> int:
    path = lock_path(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _write_error(path, e) from e


def _flock(fd: int, path: str, blocking: bool) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(e.errno, f"cannot lock {path}: the filesystem of the run directory does not support "
                          "file locks (an NFS mount without lockd?); use a run directory on a local disk or "
                          "mount with locking") from e
        raise


def acquire(run_dir: str, *, wait: bool = True, notify: Callable[[str], None] | None = None) -> None:
    """Take ``run_dir``'s lock for this process (again, if it already holds it).

    Another holder: with ``wait`` block until it releases (or dies), after calling ``notify`` once with a
    message naming it; without, raise :class:`RunDirBusy` naming it. A record left by a holder that died is
    taken over, and ``notify`` is told whose it was.
    """
    if not is_local(run_dir):
        raise ValueError(f"{run_dir}: a run directory must be a local path (or a shared filesystem mounted as "
                         "one); object-store URLs are not supported")
    path = lock_path(run_dir)
    key = os.path.realpath(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            return
    fd = _open(run_dir)
    try:
        told = False
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while not _flock(fd, path, blocking=False):
            holder = _read_record(fd)
            if holder is None and time.monotonic() < deadline:
                time.sleep(0.05)  # the holder has the lock but not yet its record written; try both again
                continue
            alive = _alive(holder) if holder else None
            who = describe(holder) + (" (that process has exited; a process it started still holds the lock)"
                                      if alive is False else "")
            if not wait:
                raise RunDirBusy(f"run directory {run_dir} is in use by {who}; wait for it to finish, or drop "
                                 "--no-wait to wait for it")
            if notify is not None and not told:
                notify(f"run directory {run_dir} is in use by {who}; waiting for it to finish (Ctrl-C stops)")
                told = True
            _flock(fd, path, blocking=True)
            break
        previous = _read_record(fd)
        if previous is not None and notify is not None:
            notify(f"taking over the lock of {run_dir} left by {describe(previous)}, which ended without "
                   "releasing it")
        token = secrets.token_hex(8)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _record(token), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)  # closing drops the flock, if it was taken
        raise
    with _held_guard:
        _held[key] = [fd, 1]


def release(run_dir: str) -> None:
    """Give back one hold of ``run_dir``'s lock; the last one empties the record and unlocks."""
    key = os.path.realpath(lock_path(run_dir))
    with _held_guard:
        entry = _held.get(key)
        if entry is None:
            raise RuntimeError(f"release of {run_dir}'s lock, which this process does not hold")
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
    fd = entry[0]
    try:
        os.ftruncate(fd, 0)  # an empty record under a free lock: released, not abandoned
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holds(run_dir: str) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    with _held_guard:
        return os.path.realpath(lock_path(run_dir)) in _held


@contextmanager
def run_lock(run_dir: str, *, wait: bool = True, notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the ``with`` block (see :func:`acquire`)."""
    acquire(run_dir, wait=wait, notify=notify)
    try:
        yield
    finally:
        release(run_dir)
