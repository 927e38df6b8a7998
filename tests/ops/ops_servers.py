"""Real servers on loopback for the operations tests: a Prefect server (on SQLite or PostgreSQL) started the
way ``docker/compose.yaml`` starts it, and the PostgreSQL it uses. No session harness: these tests talk to
their own server through ``PREFECT_API_URL``, as the UI and a worker do."""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# docker/compose.yaml's services run this script; the tests run the same lines outside a container.
ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "entrypoint.sh"


def entrypoint(*args: str) -> list[str]:
    return ["sh", str(ENTRYPOINT), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    """Poll ``check()`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def base_env(home: Path) -> dict:
    """The environment of every process in one test deployment: its own PREFECT_HOME (profiles, result
    storage), no telemetry, and the CLI's startup defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SLIMFLOW_"))}
    # the venv's `prefect`, `slimflow` and `python` first, as on the image's PATH
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY="false",
               PREFECT_UI_ENABLED="false")
    return env


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class PrefectServer:
    api_url: str
    env: dict  # for clients of this server: PREFECT_API_URL set
    log: Path


@contextlib.contextmanager
def prefect_server(home: Path, database_url: str):
    """The compose `server` service's command on a free loopback port; yields once /health answers."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = base_env(home)
    env.update(PREFECT_API_DATABASE_CONNECTION_URL=database_url, SLIMFLOW_SERVER_HOST="127.0.0.1",
               SLIMFLOW_SERVER_PORT=str(port))
    log = home / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(entrypoint("server"), env=env, stdout=f, stderr=subprocess.STDOUT)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        def healthy():
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            import httpx

            try:
                return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 180, f"the Prefect server on port {port} (log: {log})")
        client_env = {k: v for k, v in env.items() if not k.startswith("SLIMFLOW_SERVER_")
                      and k != "PREFECT_API_DATABASE_CONNECTION_URL"}
        client_env["PREFECT_API_URL"] = api_url
        yield PrefectServer(api_url, client_env, log)
    finally:
        stop(proc)


def _pg_bin() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    # Debian keeps the server binaries off PATH, one folder per major version.
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_database():
    """A throwaway PostgreSQL cluster on a free loopback port with a `prefect` database and pg_trgm (Prefect's
    requirement); yields its SQLAlchemy asyncpg URL and removes everything on exit. Runs the server as the
    `postgres` user when this process is root (postgres refuses to run as root)."""
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL server binaries (initdb) are not installed; scripts/ci-postgres.sh installs them")
    as_root = os.geteuid() == 0
    # Not under pytest's tmp_path: its folders are private to this user, and the server may run as another.
    root = Path(tempfile.mkdtemp(prefix="slimflow-pg-"))
    data = root / "data"
    if as_root:
        shutil.chown(root, "postgres", "postgres")

    def run(*cmd):
        full = ["runuser", "-u", "postgres", "--", *map(str, cmd)] if as_root else list(map(str, cmd))
        return subprocess.run(full, check=True, capture_output=True, text=True)

    port = free_port()
    started = False
    try:
        run(pg / "initdb", "-D", data, "-U", "prefect", "--auth=trust", "--encoding=UTF8", "--no-sync")
        # -k: the socket lives in our folder, not /var/run/postgresql (absent without the Debian service).
        # pg_ctl -w returns once the server accepts connections.
        run(pg / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-w", "-t", "120",
            "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start")
        started = True
        conn = ["-h", "127.0.0.1", "-p", str(port), "-U", "prefect"]
        run(pg / "createdb", *conn, "prefect")
        run(pg / "psql", *conn, "-d", "prefect", "-v", "ON_ERROR_STOP=1", "-c", "CREATE EXTENSION pg_trgm")
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        if started:
            run(pg / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def write_tiny_config(folder: Path, name: str, extra: str = "") -> Path:
    """~120 real Chinese reviews as CSV and a config with small shards: the whole pipeline in seconds."""
    from slimflow.tasks.datasets import load_rows

    rows = load_rows("zh-reviews")
    pos = [r for r in rows if r[1] == "pos"][:60]
    neg = [r for r in rows if r[1] == "neg"][:60]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        w.writerows(pos + neg)
    cfg = folder / "config.yaml"
    cfg.write_text(f"name: {name}\nlang: zh\ndata: {{train: train.csv}}\nshards: {{rows: 40}}\n"
                   f"augment: {{n_iter: 2}}\nsegment: {{workers: 1}}\n{extra}", encoding="utf-8")
    return cfg
