"""Faults injected for real: a run killed with SIGKILL mid-stage, then rerun."""

import os
import signal
import subprocess
import sys
import time

import yaml

from storage.layout import RunLayout
from storage.manifest import read_manifest
from storage.shards import read_shard
from tasks.datasets import load_rows


def _config(tmp_path, n=1200, shard_rows=20):
    import csv

    rows = load_rows("zh-reviews")
    rows = [r for r in rows if r[1] == "pos"][: n // 2] + [r for r in rows if r[1] == "neg"][: n // 2]
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        w.writerows(rows)
    cfg = {"name": "faults", "lang": "zh", "data": {"train": "train.csv"}, "shards": {"rows": shard_rows},
           "augment": {"n_iter": 3}, "segment": {"workers": 1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env():
    from prefect.settings import PREFECT_API_URL

    # the subprocess talks to this session's test server instead of starting its own
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}


def _completed_segment_tasks() -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["segment-faults"])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.COMPLETED]))))
    return len(runs)


def _slimflow(*args):
    return [sys.executable, "-m", "flows.cli", *args]


def test_killed_during_segment_then_rerun_completes_exactly_once(tmp_path):
    cfg, out = _config(tmp_path), str(tmp_path / "run")
    seg_dir = tmp_path / "run" / "segment"
    proc = subprocess.Popen(_slimflow("run", cfg, "--out", out, "--until", "augment"), env=_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # Poll the API (not sleep-and-hope) until some segment tasks have completed but the stage is not committed.
    while time.monotonic() < deadline and proc.poll() is None:
        if _completed_segment_tasks() >= 2 and not (seg_dir / "manifest.json").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-stage"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_manifest(str(seg_dir)) is None  # never half-committed

    rerun = subprocess.run(_slimflow("run", cfg, "--out", out, "--until", "augment"), env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    layout = RunLayout(out)
    import json

    report = json.load(open(layout.report_json))
    assert report["tasks"]["by_stage"]["segment"]["cached"] >= 1  # work finished before the kill was kept
    ids = [i for r in read_manifest(layout.stage_dir("segment")).shards for i in read_shard(out, r).column("id")
           .to_pylist()]
    ingested = [i for r in read_manifest(layout.stage_dir("ingest")).shards for i in read_shard(out, r).column("id")
                .to_pylist()]
    assert sorted(ids) == sorted(ingested) and len(ids) == len(set(ids)) == 1200
    aug = read_manifest(layout.stage_dir("augment"))
    aug_ids = [i for r in aug.shards for i in read_shard(out, r).column("id").to_pylist()]
    assert len(aug_ids) == len(set(aug_ids)) > 0
