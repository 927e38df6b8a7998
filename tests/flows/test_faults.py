"""Faults injected for real: a run killed with SIGKILL mid-stage, then rerun."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import read_manifest
from slimflow.storage.shards import read_shard
from slimflow.tasks.datasets import load_rows


def _balanced_train_csv(tmp_path, n: int) -> None:
    """``tmp_path/train.csv``: n real zh reviews, half pos, half neg."""
    import csv

    rows = load_rows("zh-reviews")
    rows = [r for r in rows if r[1] == "pos"][: n // 2] + [r for r in rows if r[1] == "neg"][: n // 2]
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        w.writerows(rows)


def _config(tmp_path, n=1200, shard_rows=20):

    _balanced_train_csv(tmp_path, n)
    cfg = {"name": "faults", "lang": "zh", "data": {"train": "train.csv"}, "shards": {"rows": shard_rows},
           "augment": {"n_iter": 3}, "segment": {"workers": 1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env():
    from prefect.settings import PREFECT_API_URL

    # the subprocess talks to this session's test server instead of starting its own
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}


def _slimflow(*args):
    return [sys.executable, "-m", "slimflow.flows.cli", *args]


def test_killed_during_segment_then_rerun_completes_exactly_once(tmp_path):
    cfg, out = _config(tmp_path), str(tmp_path / "run")
    seg_dir = tmp_path / "run" / "segment"

    def midway():  # shard files on disk, no manifest: the stage is part-way
        return not (seg_dir / "manifest.json").exists() and len(list(seg_dir.glob("*/*.parquet"))) >= 3

    _kill_when(_slimflow("run", cfg, "--out", out, "--until", "augment"), midway, "segment", tmp_path / "kill.log")
    assert read_manifest(str(seg_dir)) is None  # never half-committed
    finished = sum(r.state_type.value == "COMPLETED" for r in _task_runs("segment-faults"))

    rerun = subprocess.run(_slimflow("run", cfg, "--out", out, "--until", "augment"), env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    layout = RunLayout(out)
    import json

    report = json.load(open(layout.report_json))
    # Work that finished before the kill was kept, not redone. Prefect reports a task Completed a moment before it
    # commits the task's cache record, so a task killed inside that window is recomputed (to the same bytes).
    assert report["tasks"]["by_stage"]["segment"]["cached"] >= finished - 1
    ids = [i for r in read_manifest(layout.stage_dir("segment")).shards for i in read_shard(out, r).column("id")
           .to_pylist()]
    ingested = [i for r in read_manifest(layout.stage_dir("ingest")).shards for i in read_shard(out, r).column("id")
                .to_pylist()]
    assert sorted(ids) == sorted(ingested) and len(ids) == len(set(ids)) == 1200
    aug = read_manifest(layout.stage_dir("augment"))
    aug_ids = [i for r in aug.shards for i in read_shard(out, r).column("id").to_pylist()]
    assert len(aug_ids) == len(set(aug_ids)) > 0


# ----------------------------------------------------------------------------------------------------------------
# Killed during augment, then during label, then during train: each rerun resumes and the end state is exact.


def _chain_config(tmp_path, n=240):

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tasks", "teacher"))
    from teacher_fixtures import build_seqcls_dir  # a tiny random BERT: labelling is cheap, never a download

    teacher = build_seqcls_dir(tmp_path / "tiny-teacher")
    _balanced_train_csv(tmp_path, n)
    cfg = {"name": "chain", "lang": "zh", "data": {"train": "train.csv"}, "shards": {"rows": 16},
           "augment": {"n_iter": 3}, "segment": {"workers": 1},
           "teacher": {"model": teacher, "fit": "none", "device": "cpu", "dtype": "fp32", "threads": 1,
                       "max_length": 60},  # the tiny BERT has 64 positions
           "students": ["bow", "bilstm"], "student": {"epochs": 3, "patience": 3, "embed_dim": 16, "hidden": 16}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _task_runs(flow_run_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))


def _kill_when(cmd, ready, what, log, deadline_s=240) -> None:
    """Start ``slimflow`` in its own process group and SIGKILL the group once ``ready()`` is true."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)  # polling interval, with a deadline: not a synchronisation sleep
        assert proc.poll() is None, (f"the run ended before it could be killed during {what}: "
                                     f"{open(log, encoding='utf-8', errors='replace').read()[-1500:]}")
        assert time.monotonic() < deadline, f"{what} never reached the kill point"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_killed_during_augment_label_and_train_then_rerun_is_exact(tmp_path):
    import glob
    import json

    import torch

    cfg, out = _chain_config(tmp_path), str(tmp_path / "run")
    layout = RunLayout(out)
    cmd = _slimflow("run", cfg, "--out", out, "--until", "train")

    def stage_midway(stage, min_shards):
        # The disk, not the API, tells when shard tasks have finished: task-run states reach the Prefect server
        # as events, often after a fast stage has already committed.
        def ready():
            return (read_manifest(layout.stage_dir(stage)) is None
                    and len(glob.glob(f"{out}/{stage}/*/*.parquet")) >= min_shards)
        return ready

    def records() -> dict[str, int]:
        # Prefect's committed cache records (one JSON file per key) and when each was written; a record the kill
        # cut off mid-write is not committed (the rerun cannot read it and recomputes the task)
        d, out_ = layout.prefect_cache, {}
        for f in os.listdir(d) if os.path.isdir(d) else []:
            path = os.path.join(d, f)
            try:
                with open(path, "rb") as f_:
                    json.loads(f_.read())
            except ValueError:
                continue
            out_[f] = os.stat(path).st_mtime_ns
        return out_

    committed = {}
    for stage in ("augment", "label"):
        _kill_when(cmd, stage_midway(stage, 3), stage, tmp_path / f"{stage}.log")
        assert read_manifest(layout.stage_dir(stage)) is None  # never half-committed
        committed[stage] = records()

    def training_midway():
        return read_manifest(layout.stage_dir("train")) is None and bool(glob.glob(f"{out}/train/*/last.pt"))

    _kill_when(cmd, training_midway, "train", tmp_path / "train.log")
    assert read_manifest(layout.stage_dir("train")) is None
    # what each student had checkpointed when it was killed (loads with weights_only=True: tensors and dicts)
    snap = {}
    for p in glob.glob(f"{out}/train/*/last.pt"):
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - the file was never renamed into place; the resume ignores it too
            continue
        snap[os.path.basename(os.path.dirname(p))] = state["history"]
    assert snap, "no epoch checkpoint was complete at the kill"

    final = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    report = json.load(open(layout.report_json))

    # Nothing committed before a kill was recomputed. "Committed" is the task's cache record on disk: Prefect
    # reports a task Completed a moment before it writes that record, and with a thread per shard several tasks
    # can be inside that window when the kill lands (they are recomputed, to the same bytes). A recomputed task
    # writes its record again, so every record present at a kill must be the very file written before it.
    final_records = records()
    for stage, before in committed.items():
        assert before, f"nothing was committed before the kill during {stage}"
        rewritten = [k for k, t in before.items() if final_records.get(k) != t]
        assert not rewritten, f"{stage}: {len(rewritten)} of {len(before)} committed records were written again"
    for stage in ("augment", "label"):  # each killed stage did run again after its kill
        assert len({t.flow_run_id for t in _task_runs(f"{stage}-chain")}) >= 2, stage
    assert report["tasks"]["by_stage"]["augment"]["executed"] == 0  # ...and the final run reran none of it
    assert report["tasks"]["by_stage"]["label"]["executed"] == 0

    # every expected row exactly once
    def ids(stage, col="id", split=None):
        m = read_manifest(layout.stage_dir(stage))
        return [i for r in m.shards if split in (None, r.split) for i in read_shard(out, r).column(col).to_pylist()]

    seg_train = ids("segment", split="train")
    aug = ids("augment")
    assert len(aug) == len(set(aug)) > 0 and set(ids("augment", "source_id")) <= set(seg_train)
    assert sorted(r.index for r in read_manifest(layout.stage_dir("augment")).shards) == list(
        range(len(read_manifest(layout.stage_dir("segment")).split("train"))))
    assert sorted(ids("label")) == sorted(seg_train + aug + ids("segment", split="unlabelled"))

    # every student finished, and one killed mid-training resumed from its last epoch checkpoint
    students = read_manifest(layout.stage_dir("train")).extra["students"]
    assert len(students) == 4 and all(s["epochs_run"] == 3 for s in students)
    for name, history in snap.items():
        done = json.load(open(f"{out}/train/{name}/result.json"))["history"]
        assert done[: len(history)] == history, name  # the same epochs, timings included: resumed, not rerun
