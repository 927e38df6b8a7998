"""The run-directory lock against real processes: a live holder is named and waited for, a killed one's lock is
taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from slimflow.storage.fs import WriteError
from slimflow.storage.lock import LOCK_FILE, RunDirBusy, acquire, holds, read_holder, release, run_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Takes the lock, says so on stdout, holds it until its stdin closes.
_HOLDER = """
import sys
from slimflow.storage.lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"  # synchronised on its own word, not on time
    return proc


def test_a_busy_directory_names_its_holder_and_without_wait_is_refused_at_once(tmp_path):
    proc = _holder(tmp_path)
    try:
        holder = read_holder(str(tmp_path))
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname() and holder["token"]
        with pytest.raises(RunDirBusy) as e:
            acquire(str(tmp_path), wait=False)
        msg = str(e.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}, since {holder['started']}" in msg
        assert "\n" not in msg and not holds(str(tmp_path))
    finally:
        proc.stdin.close()
        proc.wait()
    assert read_holder(str(tmp_path)) is None  # released: the record is emptied, the file stays
    with run_lock(str(tmp_path), wait=False):
        assert read_holder(str(tmp_path))["pid"] == os.getpid()


def test_a_waiter_is_told_once_and_gets_the_lock_when_the_holder_ends(tmp_path):
    proc = _holder(tmp_path)
    told: list[str] = []
    told_event, got = threading.Event(), threading.Event()

    def notify(msg):
        told.append(msg)
        told_event.set()

    def waiter():
        acquire(str(tmp_path), notify=notify)
        got.set()

    t = threading.Thread(target=waiter)
    t.start()
    try:
        assert told_event.wait(60)
        assert not got.is_set()  # still waiting while the holder holds
        assert f"in use by pid {proc.pid}" in told[0] and "waiting" in told[0]
    finally:
        proc.stdin.close()
        proc.wait()
    t.join(60)
    assert got.is_set() and len(told) == 1  # told once; a normal release is no takeover
    assert read_holder(str(tmp_path))["pid"] == os.getpid()
    release(str(tmp_path))


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    dead = read_holder(str(tmp_path))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_holder(str(tmp_path)) == dead  # the record outlives its holder...
    told: list[str] = []
    with run_lock(str(tmp_path), wait=False, notify=told.append):  # ...but not its lock
        assert read_holder(str(tmp_path))["token"] != dead["token"]
    assert len(told) == 1 and f"left by pid {proc.pid} on host {dead['host']}" in told[0]


def test_a_record_left_by_a_dead_process_is_taken_over(tmp_path):
    # what an O_EXCL lock file of a crashed run would look like: a record, and no live lock behind it
    stale = {"host": socket.gethostname(), "pid": 2**22 + 7, "proc_start": "1", "started": "2026-01-01 00:00:00 UTC",
             "command": "slimflow run c.yaml", "token": "x"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    told: list[str] = []
    with run_lock(str(tmp_path), wait=False, notify=told.append):
        assert read_holder(str(tmp_path))["pid"] == os.getpid()
    assert "left by pid 4194311" in told[0] and "slimflow run c.yaml" in told[0]


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with run_lock(str(tmp_path)):
        with run_lock(str(tmp_path), wait=False):  # the pipeline flow inside the CLI's hold: no self-deadlock
            assert holds(str(tmp_path))
        assert holds(str(tmp_path)) and read_holder(str(tmp_path))["pid"] == os.getpid()
        # another process still sees it held
        done = subprocess.run([sys.executable, "-c", "import sys; from slimflow.storage.lock import acquire; "
                               "acquire(sys.argv[1], wait=False)", str(tmp_path)], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1 and f"in use by pid {os.getpid()}" in done.stderr
    assert not holds(str(tmp_path)) and read_holder(str(tmp_path)) is None
    with pytest.raises(RuntimeError, match="does not hold"):
        release(str(tmp_path))


def test_a_run_directory_that_is_a_file_is_an_error_naming_it(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=f"{blocker} is a file"):
        acquire(str(blocker))
    assert blocker.read_text() == "x"

