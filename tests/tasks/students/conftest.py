"""Tiny synthetic shards for the student tests: a sentiment-like task where the label is which of the words
"好" (pos) / "差" (neg) a row holds, plus filler words; teacher logits that agree with it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from slimflow.storage.schema import LABELLED, SEGMENT
from slimflow.storage.shards import write_shard

LABELS = ["neg", "pos"]
FILLER = [f"w{i}" for i in range(30)]


def _rows(n: int, seed: int, prefix: str):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=int(rng.integers(1, 12))))
        words.insert(int(rng.integers(len(words) + 1)), "好" if label else "差")
        out.append((f"{prefix}{i:05d}", words, LABELS[label]))
    return out


def segment_table(rows) -> pa.Table:
    return pa.table({
        "id": [r[0] for r in rows], "text": [" ".join(r[1]) for r in rows], "label": [r[2] for r in rows],
        "source_file": ["synthetic"] * len(rows), "source_row": list(range(1, len(rows) + 1)),
        "words": [r[1] for r in rows], "pos": [["n"] * len(r[1]) for r in rows],
        "ws": [[False] * len(r[1]) for r in rows],
    })


def labelled_table(rows, kinds=None, gold=None) -> pa.Table:
    kinds = kinds or ["original"] * len(rows)
    logits = [[-2.0, 2.0] if r[2] == "pos" else [1.5, -1.5] for r in rows]
    probs = [list(np.exp(x) / np.exp(x).sum()) for x in np.array(logits)]
    return pa.table({
        "id": [r[0] for r in rows], "source_id": [r[0] for r in rows], "kind": kinds,
        "text_t": [" ".join(r[1]) for r in rows], "words": [r[1] for r in rows],
        "label": gold if gold is not None else [r[2] for r in rows],
        "logits": logits, "probs": probs, "label_t": [r[2] for r in rows],
        "confidence": [max(p) for p in probs],
    })


@pytest.fixture
def make_shards(tmp_path):
    """make_shards(schema "segment" | "labelled", n_shards, rows_per_shard, split, seed) -> (run_dir, refs)."""
    run_dir = str(tmp_path / "run")

    def make(schema: str = "segment", n_shards: int = 3, rows: int = 20, split: str = "train", seed: int = 0):
        refs = []
        for k in range(n_shards):
            rs = _rows(rows, seed * 1000 + k, f"{split}{k}-")
            if schema == "segment":
                refs.append(write_shard(segment_table(rs), run_dir, f"segment/{split}", split, k, SEGMENT))
            else:
                refs.append(write_shard(labelled_table(rs), run_dir, f"label/{split}", split, k, LABELLED))
        return run_dir, refs

    return make


@pytest.fixture
def tables():
    """The table builders, for tests that need rows the fixture above does not make."""
    from types import SimpleNamespace

    return SimpleNamespace(rows=_rows, segment=segment_table, labelled=labelled_table, labels=LABELS)
