import csv

import pyarrow.parquet as pq
import pytest
from slimflow.storage.readers import InputError
from slimflow.storage.shards import ShardRef, read_shard
from slimflow.tasks.ingest import IngestParams, ingest, normalise_text, row_id


def _csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _all_rows(run, res):
    out = []
    for d in res["shards"]:
        out += read_shard(run, ShardRef.from_dict(d)).to_pylist()
    return out


def test_planted_bad_rows_are_quarantined_with_reasons(tmp_path):
    good = [(f"好评第{i}条", "pos") for i in range(30)] + [(f"差评第{i}条", "neg") for i in range(30)]
    bad = [("", "pos"), ("   ", "neg"), ("没有标签", ""), ("未知标签", "meh"), ("x" * 101, "pos"),
           ("好评第1条", "pos"),  # exact duplicate
           ("冲突文本", "pos"), ("冲突文本", "neg")]  # one text, two labels
    train = _csv(tmp_path / "train.csv", good + bad)
    with open(train, "ab") as f:
        f.write(b"\xff\xfe broken bytes,pos\n")
    dev = _csv(tmp_path / "dev.csv", [("开发集一", "pos"), ("开发集二", "neg")])
    test = _csv(tmp_path / "test.csv", [("测试集一", "pos"), ("测试集二", "neg"), ("差评第3条", "neg")])
    unl = _csv(tmp_path / "unl.csv", [("无标注一",), ("",), ("测试集一",)], header=("text",))
    run = str(tmp_path / "run")
    res = ingest(run, IngestParams(train=train, dev=dev, test=test, unlabelled=unl, max_chars=100, shard_rows=16,
                                   labels=("neg", "pos")))
    rej = pq.read_table(f"{run}/ingest/rejects.parquet").to_pylist()
    reasons = [r["reason"] for r in rej]
    assert sum("empty" in r for r in reasons) == 3
    assert any(r == "missing label" for r in reasons)
    assert any(r.startswith("unknown label 'meh'") for r in reasons)
    assert any(r.startswith("text longer than data.max_chars") for r in reasons)
    assert any(r.startswith("undecodable bytes") for r in reasons)
    assert sum("conflicting labels" in r for r in reasons) == 2
    dups = [r for r in rej if r["reason"].startswith("exact duplicate")]
    # the train copy of a test text is the one quarantined (no leak), and the unlabelled copy too
    assert {(r["split"], r["text"]) for r in dups} == {("train", "好评第1条"), ("train", "差评第3条"),
                                                      ("unlabelled", "测试集一")}
    rows = _all_rows(run, res)
    texts = [r["text"] for r in rows]
    assert len(texts) == len(set(texts))
    # every valid row is in a shard: 60 good - 1 moved to test + dev 2 + test 3 + unlabelled 1
    assert len(rows) == 59 + 2 + 3 + 1
    assert res["rows"] == {"train": 59, "dev": 2, "test": 3, "unlabelled": 1}
    assert res["rejected"] == len(rej) == 12
    assert all(r["id"] == row_id(r["text"]) for r in rows)
    assert res["labels"] == ["neg", "pos"]
    assert [d["rows"] for d in res["shards"] if d["split"] == "train"] == [16, 16, 16, 11]


def test_split_is_stratified_seeded_and_stable_under_edits(tmp_path):
    rows = [(f"正面{i}", "pos") for i in range(100)] + [(f"负面{i}", "neg") for i in range(50)]
    p = IngestParams(train=_csv(tmp_path / "t.csv", rows), dev_fraction=0.1, test_fraction=0.2)
    res = ingest(str(tmp_path / "a"), p)
    assert res["rows"] == {"train": 105, "dev": 15, "test": 30, "unlabelled": 0}
    labels_by_split = {}
    for d in res["shards"]:
        labels_by_split.setdefault(d["split"], []).extend(
            read_shard(str(tmp_path / "a"), ShardRef.from_dict(d)).column("label").to_pylist())
    assert labels_by_split["test"].count("pos") == 20 and labels_by_split["test"].count("neg") == 10
    assert labels_by_split["dev"].count("pos") == 10 and labels_by_split["dev"].count("neg") == 5
    by_split = {}
    for d in res["shards"]:
        by_split.setdefault(d["split"], []).extend(read_shard(str(tmp_path / "a"), ShardRef.from_dict(d))
                                                   .column("source_row").to_pylist())
    rows[7] = ("正面7 改过了", "pos")  # edit one row's text in place
    res2 = ingest(str(tmp_path / "b"), IngestParams(**{**p.__dict__, "train": _csv(tmp_path / "t.csv", rows)}))
    by_split2 = {}
    for d in res2["shards"]:
        by_split2.setdefault(d["split"], []).extend(read_shard(str(tmp_path / "b"), ShardRef.from_dict(d))
                                                    .column("source_row").to_pylist())
    assert by_split == by_split2


def test_one_class_is_a_clear_error(tmp_path):
    p = IngestParams(train=_csv(tmp_path / "t.csv", [("a", "x"), ("b", "x")]))
    with pytest.raises(InputError, match="1 class"):
        ingest(str(tmp_path / "run"), p)


def test_configured_labels_and_numeric_label_forms(tmp_path):
    rows = [("a", "1"), ("b", "1.0"), ("c", "0"), ("d", "2")]
    p = IngestParams(train=_csv(tmp_path / "t.csv", rows), dev=_csv(tmp_path / "d.csv", [("e", "0")]),
                     test=_csv(tmp_path / "s.csv", [("f", "1")]), labels=("0", "1"), min_train_rows=1)
    res = ingest(str(tmp_path / "run"), p)
    assert res["labels"] == ["0", "1"] and res["rows"]["train"] == 3 and res["rejected"] == 1


@pytest.mark.parametrize("raw,want", [(" a\r\nb\tc ", "a b c"), ("\ufeffx", "x"), ("a\x00b\x1fc", "a b c"),
                                      ("e\u0301", "\u00e9")])
def test_normalise_text(raw, want):
    assert normalise_text(raw) == want
