"""Soak: 8 concurrent clients drive the teacher service on loopback for 60 s (issue 6).

The service (slimflow.tasks.service in a subprocess) serves a tiny random 2-layer BERT teacher built here (the bench
measures the service: batching, HTTP, memory; not e5's speed). Each client posts 1-16 random texts per
request. Prints requests/s, p50/p99 latency, errors (goal 0) and the service's RSS after warm-up and at the
end (goal: growth <= 10%).

    .venv/bin/python bench/soak.py [--seconds 60]     # writes bench/results/soak.json
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "tasks" / "teacher"))

from bench._common import goal, print_goals, teacher_service, write_results  # noqa: E402


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of ``pid`` in MiB, from /proc."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line[:5]] = int(line.split()[1]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    import httpx
    from slimflow.tasks.teacher.fit import adopt_pretrained
    from teacher_fixtures import LABELS, build_seqcls_dir, random_texts

    tmp = tempfile.mkdtemp(prefix="bench-soak-")
    tdir = f"{tmp}/teacher"
    adopt_pretrained(tdir, labels=LABELS, model=build_seqcls_dir(f"{tmp}/tiny"))
    with teacher_service(tdir, 8572, ROOT, device="cpu", dtype="fp32", threads=1) as (url, proc):
        pool = random_texts(2000, seed=1, hi=40)
        for _ in range(50):  # warm-up: allocator and caches settle before the first RSS reading
            httpx.post(f"{url}/v1/logits", json={"texts": pool[:16]})
        rss_start, peak_start = rss_mb(proc.pid)
        lat: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=30) as c:
                while time.monotonic() < stop_at:
                    texts = rng.sample(pool, rng.randint(1, 16))
                    t0 = time.perf_counter()
                    try:
                        ok = c.post("/v1/logits", json={"texts": texts}).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    dt = time.perf_counter() - t0
                    with lock:
                        lat.append(dt)
                        errors[0] += not ok

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_end, peak_end = rss_mb(proc.pid)
        stats = httpx.get(f"{url}/v1/stats").json()
    lat.sort()
    p50, p99 = lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000
    growth = (peak_end - peak_start) / peak_start * 100
    print(f"{args.clients} clients x {wall:.0f} s on loopback, tiny 2-layer BERT teacher")
    print(f"requests/s {len(lat) / wall:.1f}   p50 {p50:.1f} ms   p99 {p99:.1f} ms   errors {errors[0]}")
    print(f"service: mean batch {stats['mean_batch_texts']:.1f} texts / {stats['mean_batch_requests']:.2f} requests")
    print(f"service RSS: {rss_start:.0f} -> {rss_end:.0f} MiB; peak {peak_start:.0f} -> {peak_end:.0f} MiB "
          f"({growth:+.1f}%)")
    goals = [goal("errors", errors[0], 0, False), goal("peak RSS growth over the soak, % (<= 10)", growth, 10.0, False)]
    print_goals(goals)
    path = write_results("soak", goals, seconds=wall, clients=args.clients, requests=len(lat),
                         requests_per_s=len(lat) / wall, p50_ms=p50, p99_ms=p99, rss_mb={"start": rss_start,
                         "end": rss_end, "peak_start": peak_start, "peak_end": peak_end}, service=stats,
                         note="shared 2-core machine: other work (another bench) ran alongside")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
