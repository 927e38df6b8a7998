"""Two runs on one run directory (issue 13): the second waits for the first, or with --no-wait stops at once."""

import os
import signal
import socket
import subprocess
import sys
import time

from slimflow.flows.cli import main
from slimflow.storage.layout import STAGES, RunLayout
from slimflow.storage.lock import read_holder
from slimflow.storage.manifest import read_manifest
from slimflow.storage.shards import shard_ok
from test_faults import _env, _slimflow
from test_reliability import _config_file


def _until(cond, what, deadline_s=240, procs=()):
    deadline = time.monotonic() + deadline_s
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a run ended early while waiting for {what}"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)  # polling interval, with a deadline: not a synchronisation sleep


def _text(path):
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""


def test_two_runs_on_one_directory_run_one_after_the_other(tmp_path):
    cfg, out = _config_file(tmp_path), str(tmp_path / "run")
    cmd = _slimflow("run", cfg, "--out", out, "--until", "augment")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with open(logs[0], "wb") as err:
        first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    second = None
    try:
        _until(lambda: (read_holder(out) or {}).get("pid") == first.pid, "the first run holds the lock",
               procs=[first])
        # Held still (SIGSTOP) until the second run has said it waits: the overlap is certain, not a race.
        os.kill(first.pid, signal.SIGSTOP)
        with open(logs[1], "wb") as err:
            second = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        _until(lambda: "waiting for it to finish" in _text(logs[1]), "the second run waits", procs=[second])
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(600) == 0, _text(logs[0])[-2000:]
        assert second.wait(600) == 0, _text(logs[1])[-2000:]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    waiting = [line for line in _text(logs[1]).splitlines() if "waiting for it to finish" in line]
    assert len(waiting) == 1  # said once
    assert f"in use by pid {first.pid} on host {socket.gethostname()}, since " in waiting[0]
    assert "slimflow run" in waiting[0]
    layout = RunLayout(out)
    done = [s for s in STAGES if read_manifest(layout.stage_dir(s)) is not None]
    assert done == ["ingest", "segment", "augment"]
    for stage in done:  # no shard a manifest names was swept by the other run's commit
        refs = read_manifest(layout.stage_dir(stage)).shards
        assert refs and all(shard_ok(out, r) for r in refs), stage
    assert read_holder(out) is None  # released


_HOLD = """
import sys
from slimflow.storage.lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_no_wait_exits_at_once_naming_the_holder(tmp_path, capsys):
    cfg, out = _config_file(tmp_path), str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, out], cwd=os.getcwd(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline() == "held\n"
        capsys.readouterr()
        for argv in (["run", cfg, "--out", out, "--no-wait"], ["segment", cfg, "--out", out, "--no-wait"],
                     ["rerun", out, "--stage", "ingest", "--no-wait"]):
            assert main(argv) == 1
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and err.startswith("slimflow: error: run directory ")
            assert f"is in use by pid {holder.pid} on host {socket.gethostname()}, since " in err
        assert sorted(os.listdir(out)) == [".slimflow.lock"]  # nothing ran, not even the config was written
    finally:
        holder.stdin.close()
        holder.wait()
