from collections import Counter

import pytest
from slimflow.storage.schema import LABELLED, SEGMENT
from slimflow.storage.shards import CorruptShardError, write_shard
from slimflow.tasks.students.data import NO_LABEL, ShardStream
from slimflow.tasks.students.vocab import Vocab

LABELS = ["neg", "pos"]
VOCAB = Vocab.build([["好", "差"] + [f"w{i}" for i in range(30)]])


def _stream(run_dir, refs, mode="baseline", **kw):
    args = {"batch_size": 7, "max_len": 50, "shuffle_buffer": 13, "seed": 0, **kw}
    return ShardStream(run_dir, refs, mode=mode, vocab=VOCAB, labels=LABELS, **args)


@pytest.mark.parametrize("mode", ["baseline", "distilled"])
def test_every_row_once_per_epoch_with_bounded_memory(make_shards, mode):
    run_dir, refs = make_shards("segment" if mode == "baseline" else "labelled", n_shards=12, rows=25)
    s = _stream(run_dir, refs, mode)
    all_ids = {f"train{k}-{i:05d}" for k in range(12) for i in range(25)}
    orders = []
    for epoch in range(3):
        seen = Counter(r for b in s.epoch(epoch) for r in b.row_ids)
        assert set(seen) == all_ids and set(seen.values()) == {1}
        orders.append([r for b in s.epoch(epoch) for r in b.row_ids])
    # 300 rows went through, but never more than buffer + batch rows were held at once.
    assert 13 <= s.peak_rows <= 13 + 7
    assert orders[0] != orders[1] != orders[2]
    assert orders[1] == [r for b in _stream(run_dir, refs, mode).epoch(1) for r in b.row_ids]  # seeded
    assert orders[1] != [r for b in _stream(run_dir, refs, mode, seed=1).epoch(1) for r in b.row_ids]


def test_batches_pad_to_longest_capped_at_max_len(tmp_path, tables):
    rows = [("a", ["好"] * 3, "pos"), ("b", ["差"] * 9, "neg"), ("c", [], "neg")]
    ref = write_shard(tables.segment(rows), str(tmp_path), "segment/train", "train", 0, SEGMENT)
    (b,) = list(_stream(str(tmp_path), [ref], shuffle=False, max_len=5, batch_size=8).epoch(0))
    assert b.ids.shape == (3, 5) and b.lengths.tolist() == [3, 5, 0]
    assert b.ids[0].tolist() == [VOCAB.stoi["好"]] * 3 + [0, 0] and b.labels.tolist() == [1, 0, 0]
    assert b.logits_t is None


def test_baseline_skips_rows_without_gold(tmp_path, tables):
    rows = [("a", ["好"], "pos"), ("b", ["差"], None)]
    ref = write_shard(tables.segment(rows), str(tmp_path), "segment/train", "train", 0, SEGMENT)
    s = _stream(str(tmp_path), [ref])
    assert [r for b in s.epoch(0) for r in b.row_ids] == ["a"] and s.skipped == 1


def test_distilled_hard_label_is_gold_on_originals_else_teacher(tmp_path, tables):
    rows = [("o", ["好"], "pos"), ("a", ["好"], "pos"), ("u", ["差"], "neg")]
    # teacher says pos, pos, neg; gold "neg" on the original row must win; the augmented row's copied
    # gold is ignored; the unlabelled row has none.
    t = tables.labelled(rows, kinds=["original", "augmented", "unlabelled"], gold=["neg", "neg", None])
    ref = write_shard(t, str(tmp_path), "label/train", "train", 0, LABELLED)
    (b,) = list(_stream(str(tmp_path), [ref], "distilled", shuffle=False).epoch(0))
    assert b.labels.tolist() == [0, 1, 0] and b.gold.tolist() == [0, NO_LABEL, NO_LABEL]
    assert b.logits_t.shape == (3, 2) and b.logits_t.dtype.name == "float32"


def test_unknown_label_and_wrong_logit_count_raise(tmp_path, tables):
    ref = write_shard(tables.segment([("a", ["好"], "meh")]), str(tmp_path), "segment/train", "train", 0, SEGMENT)
    with pytest.raises(ValueError, match="'meh'.*not one of the run's labels"):
        list(_stream(str(tmp_path), [ref]).epoch(0))
    ref = write_shard(tables.labelled([("a", ["好"], "pos")]), str(tmp_path), "label/train", "train", 0, LABELLED)
    s = ShardStream(str(tmp_path), [ref], mode="distilled", vocab=VOCAB, labels=["neg", "pos", "mid"],
                    batch_size=2, max_len=5)
    with pytest.raises(ValueError, match="2 teacher logits for 3 labels"):
        list(s.epoch(0))


def test_corrupt_shard_is_refused(make_shards):
    run_dir, refs = make_shards("segment", n_shards=1, rows=5)
    with open(f"{run_dir}/{refs[0].path}", "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01")
    with pytest.raises(CorruptShardError):
        list(_stream(run_dir, refs).epoch(0))


def test_bad_mode_raises(make_shards):
    run_dir, refs = make_shards("segment", n_shards=1, rows=5)
    with pytest.raises(ValueError, match="baseline, distilled"):
        _stream(run_dir, refs, mode="online")
