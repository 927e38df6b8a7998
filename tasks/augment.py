"""Augmentation (Tang et al. 2019, section 3; ERNIE Slim's three strategies), vectorised over a shard.

Per word, exclusively: with p_mask replace it by [UNK] (the teacher sees its mask token), else with p_pos by a
word of the same POS drawn from a corpus-wide table weighted by frequency. Then, per copy, with p_ng keep
only a contiguous span: n in ``ngram`` (Tang et al.) or a random length in [1, len] (ERNIE Slim's
N-sampling). ``n_iter`` copies per row; copies equal to each other or to an original are dropped.

All of a shard's copies are drawn at once with numpy over flat token arrays (no Python loop per word), from a
generator seeded by (seed, the shard's row ids): the same rows and seed give the same output whatever the
worker count or shard order.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from slimflow.storage.fs import atomic_write_bytes, join
from slimflow.storage.schema import AUGMENT, MASK_PLACEHOLDER, POS_TABLE, UNK
from slimflow.storage.shards import CorruptShardError, ShardRef, read_shard, table_to_parquet_bytes, write_shard

OPS = ("mask", "pos", "ngram")


@dataclass(frozen=True)
class AugmentParams:
    n_iter: int = 10
    p_mask: float = 0.1
    p_pos: float = 0.1
    p_ng: float = 0.25
    ngram: tuple[int, int] = (1, 5)
    span: str = "ngram"  # ngram | random
    seed: int = 0
    min_count: int = 2


@dataclass
class PosTable:
    """POS -> candidate words and their cumulative weights (for inverse-CDF sampling)."""

    words: dict[str, list[str]]
    cum: dict[str, np.ndarray]

    @classmethod
    def from_table(cls, table: pa.Table) -> PosTable:
        words: dict[str, list[str]] = {}
        weights: dict[str, list[float]] = {}
        for pos, word, w in zip(*(table.column(c).to_pylist() for c in ("pos", "word", "weight"))):
            words.setdefault(pos, []).append(word)
            weights.setdefault(pos, []).append(w)
        return cls(words, {k: np.cumsum(v) for k, v in weights.items()})


def count_pos_words(words: list[list[str]], pos: list[list[str]]) -> Counter:
    c: Counter = Counter()
    for ws, ps in zip(words, pos):
        c.update(zip(ps, ws))
    return c


def pos_table_from_counts(counts: Counter, min_count: int) -> pa.Table:
    """The substitution table: (pos, word, weight), words seen at least ``min_count`` times.

    Weights are counts rounded down to a power of two. Sampling stays frequency-weighted (to within 2x), and
    the table, which every augment shard depends on, changes far less often when one input row is edited:
    a count moving by one crosses a power of two rarely, and a new word (count 1) is not a candidate.
    """
    rows = sorted((p, w, float(2 ** int(math.log2(c)))) for (p, w), c in counts.items() if c >= min_count)
    return pa.table({"pos": [r[0] for r in rows], "word": [r[1] for r in rows], "weight": [r[2] for r in rows]},
                    schema=POS_TABLE)


def build_pos_table(run_dir: str, refs: list[ShardRef], min_count: int) -> dict:
    """Count (pos, word) over the segmented ``refs`` and write ``augment/pos_table-<sha12>.parquet``."""
    counts: Counter = Counter()
    for ref in refs:
        t = read_shard(run_dir, ref, columns=["words", "pos"])
        counts.update(count_pos_words(t.column("words").to_pylist(), t.column("pos").to_pylist()))
    data = table_to_parquet_bytes(pos_table_from_counts(counts, min_count))
    sha = hashlib.sha256(data).hexdigest()
    rel = f"augment/pos_table-{sha[:12]}.parquet"
    atomic_write_bytes(join(run_dir, rel), data)
    return {"path": rel, "sha256": sha, "rows": sum(1 for c in counts.values() if c >= min_count)}


def shard_seed(seed: int, ids: list[str]) -> np.random.Generator:
    digest = hashlib.sha256("\n".join(ids).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def augment_rows(ids: list[str], labels: list[str | None], words: list[list[str]], pos: list[list[str]],
                 ws: list[list[bool]], table: PosTable, p: AugmentParams) -> pa.Table:
    """Augmented rows (``slimflow.storage.schema.AUGMENT``) for one shard's segmented rows."""
    rng = shard_seed(p.seed, ids)
    n, k = len(ids), p.n_iter
    lengths = np.fromiter((len(w) for w in words), np.int64, n)
    if n == 0 or k == 0 or lengths.sum() == 0:
        return AUGMENT.empty_table()

    # Flat token ids over one shard vocabulary; id 0 is the mask, table words are added up front.
    vocab: dict[str, int] = {"\0mask": 0}
    flat_tok = np.fromiter((vocab.setdefault(w, len(vocab)) for ws_ in words for w in ws_), np.int64)
    pos_names = sorted({q for ps in pos for q in ps})
    pos_index = {q: i for i, q in enumerate(pos_names)}
    flat_pos = np.fromiter((pos_index[q] for ps in pos for q in ps), np.int64)
    flat_ws = np.fromiter((b for bs in ws for b in bs), bool)
    cand = {}
    for q in pos_names:
        if q in table.words:
            cand[pos_index[q]] = (np.array([vocab.setdefault(w, len(vocab)) for w in table.words[q]]), table.cum[q])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    # Copies are laid out row-major: pair j = row * k + copy, so output keeps source order.
    pair_len = np.repeat(lengths, k)
    pair_start_src = np.repeat(starts, k)
    out_start = np.cumsum(pair_len) - pair_len  # where each copy starts in the tiled arrays
    tok_src = np.repeat(pair_start_src - out_start, pair_len) + np.arange(int(pair_len.sum()))
    pair_of_tok = np.repeat(np.arange(n * k), pair_len)
    pos_in_row = tok_src - pair_start_src[pair_of_tok]

    # 1. mask / same-POS substitution, exclusive per word (one uniform per word decides).
    u = rng.random(tok_src.size)
    mask = u < p.p_mask
    sub = ~mask & (u < p.p_mask + p.p_pos)
    out = flat_tok[tok_src].copy()
    tok_pos = flat_pos[tok_src]
    changed_sub = np.zeros(tok_src.size, bool)
    for qi in range(len(pos_names)):  # fixed order: deterministic draws
        where = np.flatnonzero(sub & (tok_pos == qi))
        if where.size == 0 or qi not in cand:
            continue
        cand_ids, cum = cand[qi]
        picks = cand_ids[np.searchsorted(cum, rng.random(where.size) * cum[-1], side="right").clip(0, cum.size - 1)]
        changed_sub[where] = picks != out[where]
        out[where] = picks
    out[mask] = 0

    # 2. n-gram sampling: one (apply?, length, start) draw per copy.
    g = rng.random(n * k) < p.p_ng
    if p.span == "ngram":
        span = rng.integers(p.ngram[0], p.ngram[1] + 1, size=n * k)
    else:  # ERNIE Slim: a span of random length in [1, len]
        span = np.floor(rng.random(n * k) * pair_len).astype(np.int64) + 1
    span = np.minimum(span, pair_len)
    begin = np.floor(rng.random(n * k) * (pair_len - span + 1)).astype(np.int64)
    span = np.where(g, span, pair_len)
    begin = np.where(g, begin, 0)
    keep = (pos_in_row >= begin[pair_of_tok]) & (pos_in_row < (begin + span)[pair_of_tok])

    did_mask = np.bincount(pair_of_tok, weights=mask & keep, minlength=n * k) > 0
    did_pos = np.bincount(pair_of_tok, weights=changed_sub & keep, minlength=n * k) > 0
    did_ng = g & (span < pair_len)
    changed = did_mask | did_pos | did_ng

    # 3. teacher text of every copy (for dedupe), built in Arrow: mask placeholder, spacing kept.
    itos = [""] * len(vocab)
    for w, i in vocab.items():
        itos[i] = w
    teacher_words = [MASK_PLACEHOLDER] + itos[1:]
    teacher_dict = pa.array(teacher_words + [w + " " for w in teacher_words], pa.string())
    n_words = len(teacher_words)

    def join(tok_ids: np.ndarray, ws_flags: np.ndarray, counts: np.ndarray) -> pa.Array:
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        tokens = teacher_dict.take(pa.array(tok_ids + ws_flags * n_words))
        return pc.utf8_rtrim_whitespace(pc.binary_join(pa.ListArray.from_arrays(offsets, tokens), ""))

    text_t = join(out[keep], flat_ws[tok_src][keep], np.bincount(pair_of_tok[keep], minlength=n * k))

    # 4. dedupe against the originals and each other, first copy wins.
    seen = set(join(flat_tok, flat_ws, lengths).to_pylist())
    selected = []
    for j, (t, c) in enumerate(zip(text_t.to_pylist(), changed)):
        if c and t and t not in seen:
            seen.add(t)
            selected.append(j)
    sel = np.array(selected, np.int64)
    rows, copies = sel // k, sel % k
    # 5. student tokens ([UNK] for masks) of the selected copies only.
    is_sel = np.zeros(n * k, bool)
    is_sel[sel] = True
    tok_sel = keep & is_sel[pair_of_tok]
    student_dict = pa.array([UNK] + itos[1:], pa.string())
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.bincount(pair_of_tok[tok_sel], minlength=n * k)[sel])])
                       .astype(np.int32))
    words_col = pa.ListArray.from_arrays(offsets, student_dict.take(pa.array(out[tok_sel])))
    ops = [",".join(o for o, d in zip(OPS, f) if d) for f in zip(did_mask[sel], did_pos[sel], did_ng[sel])]
    return pa.table(
        {
            "id": [f"{ids[r]}-a{c:02d}" for r, c in zip(rows, copies)],
            "source_id": [ids[r] for r in rows],
            "aug_ops": ops,
            "aug_copy": pa.array(copies, pa.int16()),
            "label": [labels[r] for r in rows],
            "text_t": text_t.take(pa.array(sel)),
            "words": words_col,
        },
        schema=AUGMENT,
    )


def load_pos_table(run_dir: str, table_ref: dict) -> PosTable:
    from slimflow.storage.fs import read_bytes
    from slimflow.storage.hashing import sha256_bytes

    data = read_bytes(join(run_dir, table_ref["path"]))
    if sha256_bytes(data) != table_ref["sha256"]:
        # Corrupt, not transient: a retry would read the same bytes.
        raise CorruptShardError(f"{table_ref['path']} does not match its recorded hash; rerun the augment stage")
    import io

    import pyarrow.parquet as pq

    return PosTable.from_table(pq.read_table(io.BytesIO(data)))


def augment_shard(run_dir: str, ref: ShardRef, table_ref: dict, p: AugmentParams) -> ShardRef:
    """Augment one segmented train shard into ``augment/train/``."""
    t = read_shard(run_dir, ref, columns=["id", "label", "words", "pos", "ws"])
    out = augment_rows(t.column("id").to_pylist(), t.column("label").to_pylist(), t.column("words").to_pylist(),
                       t.column("pos").to_pylist(), t.column("ws").to_pylist(), load_pos_table(run_dir, table_ref), p)
    return write_shard(out, run_dir, "augment/train", ref.split, ref.index, AUGMENT,
                       inputs=(ref.sha256, table_ref["sha256"]))
