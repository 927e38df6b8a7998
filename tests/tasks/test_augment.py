import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slimflow.storage.schema import MASK_PLACEHOLDER, SEGMENT, UNK
from slimflow.storage.shards import CorruptShardError, write_shard
from slimflow.tasks.augment import (
    AugmentParams,
    PosTable,
    augment_rows,
    augment_shard,
    build_pos_table,
    count_pos_words,
    pos_table_from_counts,
)

POS = ["n", "v", "a", "d"]
WORDS = {p: [f"{p}{i}" for i in range(8)] for p in POS}


def _corpus(n_rows, seed=0, min_len=3, max_len=20):
    rng = np.random.default_rng(seed)
    words, pos = [], []
    for _ in range(n_rows):
        ln = rng.integers(min_len, max_len + 1)
        ps = [POS[i] for i in rng.integers(0, len(POS), ln)]
        words.append([WORDS[p][rng.integers(0, 8)] for p in ps])
        pos.append(ps)
    ids = [f"r{i:05d}" for i in range(n_rows)]
    return ids, words, pos, [[False] * len(w) for w in words]


def _aug(ids, words, pos, ws, **kw):
    table = PosTable.from_table(pos_table_from_counts(count_pos_words(words, pos), 1))
    return augment_rows(ids, ["x"] * len(ids), words, pos, ws, table, AugmentParams(**kw)).to_pylist()


def test_masking_rate_within_tolerance():
    ids, words, pos, ws = _corpus(400)
    rows = _aug(ids, words, pos, ws, n_iter=5, p_mask=0.1, p_pos=0.0, p_ng=0.0)
    n_tokens = sum(len(r["words"]) for r in rows)
    n_unk = sum(r["words"].count(UNK) for r in rows)
    # copies with no mask are dropped as duplicates of the original; count them back in as unmasked tokens
    kept_sources = {(r["source_id"], r["aug_copy"]) for r in rows}
    dropped = sum(len(words[int(i[1:])]) for i in ids for _ in range(5)) - n_tokens
    assert len(kept_sources) == len(rows)
    rate = n_unk / (n_tokens + dropped)
    assert abs(rate - 0.1) < 0.01
    assert all(r["aug_ops"] == "mask" for r in rows)


def test_teacher_text_has_placeholder_where_student_has_unk():
    ids, words, pos, ws = _corpus(50)
    for r in _aug(ids, words, pos, ws, n_iter=3, p_mask=0.3, p_pos=0.0, p_ng=0.0):
        assert r["text_t"].count(MASK_PLACEHOLDER) == r["words"].count(UNK)
        assert r["text_t"] == "".join(MASK_PLACEHOLDER if w == UNK else w for w in r["words"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), p_pos=st.floats(0.05, 1.0))
def test_same_pos_substitution_keeps_the_pos_sequence(seed, p_pos):
    ids, words, pos, ws = _corpus(30, seed=seed)
    tag_of = {w: p for p in POS for w in WORDS[p]}
    rows = _aug(ids, words, pos, ws, n_iter=3, p_mask=0.0, p_pos=p_pos, p_ng=0.0, seed=seed)
    for r in rows:
        src = int(r["source_id"][1:])
        assert [tag_of[w] for w in r["words"]] == pos[src]
        assert r["aug_ops"] == "pos" and r["words"] != words[src]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lo=st.integers(1, 4), extra=st.integers(0, 3),
       span=st.sampled_from(["ngram", "random"]))
def test_ngram_sample_is_a_contiguous_run_of_the_source(seed, lo, extra, span):
    ids, words, pos, ws = _corpus(30, seed=seed)
    rows = _aug(ids, words, pos, ws, n_iter=4, p_mask=0.0, p_pos=0.0, p_ng=1.0, ngram=(lo, lo + extra),
                span=span, seed=seed)
    assert rows
    for r in rows:
        src, got = words[int(r["source_id"][1:])], r["words"]
        assert any(src[i : i + len(got)] == got for i in range(len(src) - len(got) + 1))
        assert len(got) < len(src)
        if span == "ngram":
            assert lo <= len(got) <= lo + extra


def test_no_duplicates_against_each_other_or_the_originals():
    ids, words, pos, ws = _corpus(200, min_len=1, max_len=4)
    rows = _aug(ids, words, pos, ws, n_iter=10, p_ng=0.5)
    texts = [r["text_t"] for r in rows]
    assert len(texts) == len(set(texts))
    assert not set(texts) & {"".join(w) for w in words}
    assert len({r["id"] for r in rows}) == len(rows)


def test_deterministic_for_same_rows_and_seed_and_sensitive_to_seed():
    ids, words, pos, ws = _corpus(100)
    a = _aug(ids, words, pos, ws, seed=3)
    assert a == _aug(ids, words, pos, ws, seed=3)
    assert a != _aug(ids, words, pos, ws, seed=4)


def _seg_shard(run, index, ids, words, pos, ws):
    t = pa.table({"id": ids, "text": ["".join(w) for w in words], "label": ["x"] * len(ids),
                  "source_file": ["f"] * len(ids), "source_row": list(range(1, len(ids) + 1)),
                  "words": words, "pos": pos, "ws": ws})
    return write_shard(t, run, "segment/train", "train", index, SEGMENT)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_shard_output_independent_of_processing_order(tmp_path, order):
    """Workers may take shards in any order: each shard's output depends only on its rows and the seed."""
    run = str(tmp_path)
    ids, words, pos, ws = _corpus(120)
    refs = [_seg_shard(run, 0, ids[:60], words[:60], pos[:60], ws[:60]),
            _seg_shard(run, 1, ids[60:], words[60:], pos[60:], ws[60:])]
    table = build_pos_table(run, refs, min_count=1)
    outs = {i: augment_shard(run, refs[i], table, AugmentParams()) for i in order}
    baseline = {i: augment_shard(run, refs[i], table, AugmentParams()) for i in (0, 1)}
    assert outs == baseline


def test_a_changed_pos_table_is_a_corrupt_shard_not_a_retry(tmp_path):
    """A POS table whose bytes no longer match its hash fails as corrupt (not retried as transient)."""
    run = str(tmp_path)
    ids, words, pos, ws = _corpus(40)
    ref = _seg_shard(run, 0, ids, words, pos, ws)
    table = build_pos_table(run, [ref], min_count=1)
    path = tmp_path / table["path"]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CorruptShardError, match="rerun the augment stage"):
        augment_shard(run, ref, table, AugmentParams())
