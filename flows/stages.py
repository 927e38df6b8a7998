"""Running a stage's tasks: submit, show progress, count cache hits, trust the disk over the cache."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from prefect.futures import as_completed

from storage.shards import ShardRef, shard_ok


@dataclass
class StageResult:
    stage: str
    executed: int = 0
    cached: int = 0
    seconds: float = 0.0
    rows: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "executed": self.executed, "cached": self.cached,
                "seconds": round(self.seconds, 3), "rows": self.rows, **self.extra}


def _outputs_ok(run_dir: str, result: object) -> bool:
    """True when every file a task result points at exists with the recorded hash."""
    if isinstance(result, dict):
        if "path" in result and "sha256" in result:
            ref = ShardRef(split="", index=0, path=result["path"], rows=0, bytes=0, sha256=result["sha256"])
            if not shard_ok(run_dir, ref):
                return False
        return all(_outputs_ok(run_dir, v) for k, v in result.items() if isinstance(v, dict | list))
    if isinstance(result, list):
        return all(_outputs_ok(run_dir, v) for v in result)
    return True


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, disable=total == 0, leave=False)


def run_tasks(task, calls: list[dict], run_dir: str, result: StageResult, desc: str) -> list:
    """Submit ``task`` once per kwargs in ``calls``; return results in call order.

    A cache hit whose output files are gone or altered (a deleted run dir, a truncated shard) is recomputed
    with the cache refreshed for that one task, so a stale cache entry is never used.
    """
    t0 = time.perf_counter()
    futures = [task.submit(**kw) for kw in calls]
    with _bar(len(futures), desc) as bar:
        for _ in as_completed(futures):
            bar.update()
    results = []
    for fut, kw in zip(futures, calls):
        value = fut.result()
        if fut.state.name == "Cached":
            if _outputs_ok(run_dir, value):
                result.cached += 1
            else:
                value = task.with_options(refresh_cache=True).submit(**kw).result()
                result.executed += 1
        else:
            result.executed += 1
        results.append(value)
    result.seconds += time.perf_counter() - t0
    return results
