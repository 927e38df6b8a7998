"""Shared bench plumbing: machine facts, the results file, a timer, a one-core pin."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": cpu_flags(), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def cpu_flags() -> dict:
    """The CPU features that decide which precision is fast here (reduced-precision GEMM paths)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        flags = set()
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}


def goal(name: str, value: float, target: float, higher_is_better: bool) -> dict:
    # Judged on the value as recorded (4 decimals), so "met" agrees with the figure shown and float residue
    # cannot flip it: 100 * (0.8013 - 0.7983), a difference of two ten-seed means, is 0.30000000000000027.
    value = round(float(value), 4)
    met = value >= target if higher_is_better else value <= target
    return {"name": name, "value": value, "target": target, "higher_is_better": higher_is_better, "met": bool(met)}


def write_results(name: str, goals: list[dict], **extra) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"goals": goals, "machine": machine(), **extra}, f, indent=2, ensure_ascii=False)
    return path


def print_goals(goals: list[dict]) -> None:
    print(f"\n{'goal':58s} {'value':>10s} {'target':>10s}  met")
    for g in goals:
        cmp = ">=" if g["higher_is_better"] else "<="
        print(f"{g['name']:58s} {g['value']:10.3f} {cmp}{g['target']:9.3f}  {'yes' if g['met'] else 'NO'}")


@contextmanager
def timer(out: dict, key: str):
    t0 = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t0


@contextmanager
def cores(ids: set[int]):
    """Pin this process (and children it starts) to ``ids``; restore afterwards."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ids & before or before)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def teacher_service(teacher_dir: str, port: int, cwd: str, **serve_kwargs):
    """``slimflow.tasks.service.serve`` in a subprocess on loopback; yields (url, process) once /healthz answers."""
    import subprocess
    import sys

    import httpx

    kw = "".join(f", {k}={v!r}" for k, v in serve_kwargs.items())
    code = f"from slimflow.tasks.service import serve; serve({teacher_dir!r}, port={port}, log_level='warning'{kw})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the teacher service on port {port} did not start") from None
                time.sleep(0.1)  # polling interval while the model loads
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
