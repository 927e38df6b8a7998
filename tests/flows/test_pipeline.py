import csv
import json

import pyarrow.parquet as pq
import pytest
from slimflow.flows.config import Config
from slimflow.flows.pipeline import StageOrderError, augment_flow, run_flow, segment_flow
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import read_manifest
from slimflow.storage.shards import read_shard
from slimflow.tasks.datasets import load_rows


def _write(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _zh_config(tmp_path, train_rows):
    rows = load_rows("zh-reviews")
    pos = [r for r in rows if r[1] == "pos"]
    neg = [r for r in rows if r[1] == "neg"]
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    cfg = Config(
        name="zh-small",
        lang="zh",
        data={"train": _write(data / "train.csv", train_rows or (pos[:90] + neg[:90])),
              "dev": _write(data / "dev.csv", pos[100:110] + neg[100:110]),
              "test": _write(data / "test.csv", pos[120:130] + neg[120:130]),
              "unlabelled": _write(data / "unl.csv", [(t,) for t, _ in pos[200:230] + neg[200:230]], ("text",))},
        shards={"rows": 60},
        augment={"n_iter": 4},
        segment={"workers": 1},
    )
    return cfg, pos[:90] + neg[:90]


def _hashes(out, stage):
    return {r.shard_id: r.sha256 for r in read_manifest(RunLayout(out).stage_dir(stage)).shards}


def test_rerun_is_all_cache_and_one_edit_recomputes_only_its_shards(tmp_path):
    cfg, train = _zh_config(tmp_path, None)
    out = str(tmp_path / "run")
    first = run_flow(config=cfg, out=out, until="augment")
    assert first["tasks"]["executed"] == 1 + 6 + 1 + 3  # ingest, 6 segment shards (3 train), pos table, 3 augment
    assert first["rows"]["augmented"] > 0 and first["rows"]["labelled"] == 220
    before = {s: _hashes(out, s) for s in ("ingest", "segment", "augment")}
    table = read_manifest(RunLayout(out).stage_dir("augment")).extra["pos_table"]["sha256"]

    again = run_flow(config=cfg, out=out, until="augment")
    assert again["tasks"]["executed"] == 0 and again["tasks"]["cached"] == 11
    assert {s: _hashes(out, s) for s in before} == before
    assert json.load(open(f"{out}/report.json"))["tasks"]["executed"] == 0

    # Edit one training row (the 70th: second train shard). A token never seen elsewhere keeps the corpus-wide
    # POS table unchanged (count 1 < min_count), so only that row's shards are recomputed.
    train[69] = (train[69][0] + "Ｑ９７", train[69][1])
    _write(cfg.data.train, train)
    edited = run_flow(config=cfg, out=out, until="augment")
    by = edited["tasks"]["by_stage"]
    assert by["ingest"] == {"executed": 1, "cached": 0}
    assert by["segment"] == {"executed": 1, "cached": 5}
    # the POS table is recounted (it reads every train shard) but comes out identical, so of the augment
    # shards only the edited one runs
    assert by["augment"] == {"executed": 2, "cached": 2}
    after = {s: _hashes(out, s) for s in before}
    assert read_manifest(RunLayout(out).stage_dir("augment")).extra["pos_table"]["sha256"] == table
    for stage in ("ingest", "segment", "augment"):
        changed = {k for k in before[stage] if before[stage][k] != after[stage][k]}
        assert changed == {"train-00001"}, stage


def test_corrupted_shard_is_recomputed_not_trusted(tmp_path):
    cfg, _ = _zh_config(tmp_path, None)
    out = str(tmp_path / "run")
    run_flow(config=cfg, out=out, until="segment")
    ref = read_manifest(RunLayout(out).stage_dir("segment")).shards[0]
    path = tmp_path / "run" / ref.path
    path.write_bytes(path.read_bytes()[:100])  # truncated on disk
    res = run_flow(config=cfg, out=out, until="segment")
    assert res["tasks"]["by_stage"]["segment"] == {"executed": 1, "cached": 5}
    assert read_shard(out, ref).num_rows == ref.rows  # recomputed to the same bytes


def test_stage_without_committed_input_refuses_to_run(tmp_path):
    cfg, _ = _zh_config(tmp_path, None)
    out = str(tmp_path / "run")
    run_flow(config=cfg, out=out, until="segment")
    (tmp_path / "run" / "segment" / "manifest.json").unlink()  # killed before the commit
    with pytest.raises(StageOrderError, match="segment stage .* has not completed"):
        augment_flow(config=cfg, out=out)
    segment_flow(config=cfg, out=out)  # redone (its finished shard tasks are cache hits) and committed
    assert read_manifest(RunLayout(out).stage_dir("segment")) is not None
    augment_flow(config=cfg, out=out)


def test_english_path_uses_spacy_pos(tmp_path):
    rows = load_rows("en-reviews")
    fresh = [r for r in rows if r[1] == "fresh"][:40]
    rotten = [r for r in rows if r[1] == "rotten"][:40]
    cfg = Config(name="en-small", lang="en", data={"train": _write(tmp_path / "t.csv", fresh + rotten)},
                 augment={"n_iter": 3}, segment={"workers": 1})
    out = str(tmp_path / "run")
    rep = run_flow(config=cfg, out=out, until="augment")
    assert rep["rows"]["splits"] == {"train": 64, "dev": 8, "test": 8, "unlabelled": 0}
    seg = read_manifest(RunLayout(out).stage_dir("segment"))
    tags = {t for ref in seg.shards for ps in read_shard(out, ref).column("pos").to_pylist() for t in ps}
    assert {"NOUN", "VERB", "ADJ", "DET"} <= tags
    aug = read_manifest(RunLayout(out).stage_dir("augment"))
    table = pq.read_table(f"{out}/{aug.shards[0].path}")
    assert table.num_rows > 0 and set(table.column("source_id").to_pylist()) <= {
        i for ref in seg.split("train") for i in read_shard(out, ref).column("id").to_pylist()}


def test_rerun_one_shard_recomputes_it_and_its_dependents_only(tmp_path):
    from slimflow.flows.pipeline import rerun_stages

    cfg, _ = _zh_config(tmp_path, None)
    out = str(tmp_path / "run")
    run_flow(config=cfg, out=out, until="augment")
    before = {s: _hashes(out, s) for s in ("ingest", "segment", "augment")}

    rep = rerun_stages(out, "augment", ["train-00002"])
    assert rep["tasks"]["by_stage"] == {"augment": {"executed": 1, "cached": 3}}

    # a segment shard feeds the corpus-wide POS table, which feeds every augment shard
    rep = rerun_stages(out, "segment", ["train-00001"])
    assert rep["tasks"]["by_stage"] == {"segment": {"executed": 1, "cached": 5},
                                        "augment": {"executed": 4, "cached": 0}}
    assert {s: _hashes(out, s) for s in before} == before  # deterministic: same bytes again

    with pytest.raises(ValueError, match="no shard train-00099"):
        rerun_stages(out, "segment", ["train-00099"])


def test_user_errors_are_not_retried(tmp_path):
    """A missing column fails the same way every time: one attempt, then the one-line error."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from slimflow.storage.readers import InputError

    path = _write(tmp_path / "t.csv", [("a", "x"), ("b", "y")], header=("body", "label"))
    cfg = Config(name="no-retry", lang="zh", data={"train": path})
    with pytest.raises(InputError, match="column 'text' not found"):
        run_flow(config=cfg, out=str(tmp_path / "run"), until="ingest")
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["ingest-no-retry"])))
    assert [r.run_count for r in runs] == [1]
