import os

import pyarrow as pa
import pytest
from slimflow.storage.manifest import Manifest, commit_manifest, read_manifest
from slimflow.storage.schema import INGEST
from slimflow.storage.shards import write_shard


def _shard(run, i, text):
    t = pa.table({"id": [str(i)], "text": [text], "label": ["a"], "source_file": ["f"], "source_row": [1]})
    return write_shard(t, run, "ingest/train", "train", i, INGEST)


def test_stage_without_manifest_is_not_complete(tmp_path):
    run = str(tmp_path)
    _shard(run, 0, "x")  # shards written, then the process was killed before the commit
    assert read_manifest(os.path.join(run, "ingest")) is None


def test_commit_then_sweep_keeps_only_referenced_shards(tmp_path):
    run = str(tmp_path)
    old = _shard(run, 0, "old")
    commit_manifest(os.path.join(run, "ingest"), Manifest("ingest", "f1", {}, "v", [old]))
    new = _shard(run, 0, "new")
    # before the new commit both versions exist: the committed state is still whole
    assert (tmp_path / old.path).exists() and (tmp_path / new.path).exists()
    commit_manifest(os.path.join(run, "ingest"), Manifest("ingest", "f2", {"p": 1}, "v", [new]))
    m = read_manifest(os.path.join(run, "ingest"))
    assert m.fingerprint == "f2" and m.shards == [new] and m.params == {"p": 1}
    assert not (tmp_path / old.path).exists() and (tmp_path / new.path).exists()


def test_killed_commit_leaves_previous_manifest(tmp_path, monkeypatch):
    run = str(tmp_path)
    a = _shard(run, 0, "a")
    commit_manifest(os.path.join(run, "ingest"), Manifest("ingest", "f1", {}, "v", [a]))
    b = _shard(run, 0, "b")

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        commit_manifest(os.path.join(run, "ingest"), Manifest("ingest", "f2", {}, "v", [b]))
    monkeypatch.undo()
    m = read_manifest(os.path.join(run, "ingest"))
    assert m.fingerprint == "f1" and (tmp_path / a.path).exists()
