"""Faults injected for real at the flow and CLI level (issue 6): corrupted shards, a full disk, an --out that
cannot be a directory, run names that try to leave the run directory."""

from __future__ import annotations

import csv
import errno
import os

import pytest
import yaml
from slimflow.flows.cli import main
from slimflow.flows.config import Config, ConfigError, load_config
from slimflow.flows.pipeline import StageOrderError, augment_flow, run_flow
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import read_manifest
from slimflow.storage.shards import read_shard, shard_ok
from slimflow.tasks.datasets import load_rows


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        w.writerows(rows)
    return str(path)


def _rows(n):
    rows = load_rows("zh-reviews")
    return [r for r in rows if r[1] == "pos"][: n // 2] + [r for r in rows if r[1] == "neg"][: n // 2]


def _config_file(tmp_path, n=80, **extra):
    cfg = {"name": "rel", "lang": "zh", "data": {"train": _write_csv(tmp_path / "train.csv", _rows(n))},
           "shards": {"rows": 16}, "augment": {"n_iter": 2}, "segment": {"workers": 1}, **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _ids(out, stage):
    return [i for r in read_manifest(RunLayout(out).stage_dir(stage)).shards
            for i in read_shard(out, r).column("id").to_pylist()]


def test_corrupted_shards_are_recomputed_and_a_corrupted_input_is_never_consumed(tmp_path):
    cfg = load_config(_config_file(tmp_path))
    out = str(tmp_path / "run")
    run_flow(config=cfg, out=out, until="augment")
    layout = RunLayout(out)
    ing, seg, aug = (read_manifest(layout.stage_dir(s)) for s in ("ingest", "segment", "augment"))
    expected_aug = sorted(_ids(out, "augment"))

    # 1. an augment output truncated, a segment shard (augment's input) edited in place, an ingest shard
    #    (segment's input) with one flipped byte
    aug_path = tmp_path / "run" / aug.shards[1].path
    aug_path.write_bytes(aug_path.read_bytes()[:-50])
    seg_path = tmp_path / "run" / seg.split("train")[0].path
    data = bytearray(seg_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg_path.write_bytes(bytes(data))
    ing_path = tmp_path / "run" / ing.shards[2].path
    data = bytearray(ing_path.read_bytes())
    data[40] ^= 0x01
    ing_path.write_bytes(bytes(data))

    # 2. the augment stage alone must not consume the corrupted segment shard: a clear error naming it and the fix
    with pytest.raises(StageOrderError, match=rf"shard {seg.split('train')[0].path} is missing or does not match "
                                              r"its recorded sha256; run `slimflow segment CONFIG --out"):
        augment_flow(config=cfg, out=out)
    assert read_manifest(layout.stage_dir("augment")).fingerprint == aug.fingerprint  # committed state untouched

    # 3. the whole run recomputes exactly the three damaged shards (same bytes: deterministic) and nothing else
    res = run_flow(config=cfg, out=out, until="augment")
    by = res["tasks"]["by_stage"]
    assert by["ingest"] == {"executed": 1, "cached": 0}  # ingest is one task: its output had a bad shard
    assert by["segment"] == {"executed": 1, "cached": len(seg.shards) - 1}
    assert by["augment"] == {"executed": 1, "cached": len(aug.shards)}  # + the cached POS table
    for stage, before in (("ingest", ing), ("segment", seg), ("augment", aug)):
        now = read_manifest(layout.stage_dir(stage))
        assert [r.sha256 for r in now.shards] == [r.sha256 for r in before.shards], stage
        assert all(shard_ok(out, r) for r in now.shards), stage
    assert sorted(_ids(out, "augment")) == expected_aug and len(set(expected_aug)) == len(expected_aug)


def _stderr_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("slimflow: error:")]
    assert len(err) == 1, err
    return err[0]


def test_a_full_disk_at_commit_is_one_line_and_keeps_the_committed_stage(tmp_path, monkeypatch, capsys):
    cfg = _config_file(tmp_path, n=40)
    out = str(tmp_path / "run")
    assert main(["ingest", cfg, "--out", out]) == 0
    stage = RunLayout(out).stage_dir("ingest")
    before = read_manifest(stage)
    manifest_bytes = open(os.path.join(stage, "manifest.json"), "rb").read()

    rows = _rows(40)
    rows[3] = (rows[3][0] + "新", rows[3][1])
    _write_csv(tmp_path / "train.csv", rows)  # a changed input: ingest runs and must commit a new manifest
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up exactly when the stage commits its manifest
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".manifest.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    capsys.readouterr()
    assert main(["ingest", cfg, "--out", out]) == 1
    line = _stderr_line(capsys)
    assert f"cannot write {os.path.join(stage, 'manifest.json')}: the disk is full" in line
    monkeypatch.undo()
    assert open(os.path.join(stage, "manifest.json"), "rb").read() == manifest_bytes  # previous state intact
    assert all(shard_ok(out, r) for r in before.shards)
    assert not [n for n in os.listdir(stage) if n.endswith(".tmp")]

    assert main(["ingest", cfg, "--out", out]) == 0  # space is back: the rerun commits
    assert read_manifest(stage).fingerprint != before.fingerprint


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_out_that_is_a_file_is_one_line_naming_it(tmp_path, capsys, below):
    cfg = _config_file(tmp_path, n=20)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    out = os.path.join(blocker, below) if below else str(blocker)
    assert main(["ingest", cfg, "--out", out]) == 1
    line = _stderr_line(capsys)
    assert f"({blocker} is a file)" in line and "choose another --out" in line
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", "/abs", ".hidden", "a\\b", "x" * 65, "a\x00b"])
def test_a_run_name_cannot_leave_the_runs_directory(tmp_path, capsys, monkeypatch, name):
    with pytest.raises(ValueError, match="name"):
        Config(name=name, data={"train": "t.csv"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": {"train": "t.csv"}}))
    with pytest.raises(ConfigError, match="name"):
        load_config(path)
    work = tmp_path / "cwd"  # the default --out, ./runs/<name>, is relative to the working directory
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["ingest", str(path)]) == 1  # refused before any write
    assert "invalid config" in _stderr_line(capsys)
    # Where the default --out would have put the run: runs/../escape is ./escape, runs/.. is ./ itself,
    # runs//abs is /abs. Nothing may appear there, nor anywhere under the working directory or the config's.
    target = os.path.abspath(os.path.join("runs", name))
    assert target == str(work) or not os.path.lexists(target), target
    assert not list(work.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "cwd"]
