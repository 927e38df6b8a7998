"""Streaming batches from Parquet shards: memory is one shard's Arrow columns + the shuffle buffer + a batch.

Per epoch the shard order is shuffled (seeded by (seed, epoch)), rows flow through a shuffle buffer (the
tf.data scheme: emit a random buffered row, put the new one in its place), and batches are padded to their
longest row (capped at max_len). The order is a pure function of (refs, seed, epoch): a resumed training
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from slimflow.storage.shards import ShardRef, read_shard
from slimflow.tasks.students.vocab import Vocab, pad_batch

Mode = Literal["baseline", "distilled"]
MODES = ("baseline", "distilled")
NO_LABEL = -1
_CHUNK_ROWS = 512  # rows converted from Arrow to Python at a time


@dataclass
class Batch:
    ids: np.ndarray  # [B, T] int64, [PAD]-padded
    lengths: np.ndarray  # [B] int64
    labels: np.ndarray  # [B] int64 hard target: gold, else the teacher's label_t (distilled); NO_LABEL: none
    gold: np.ndarray  # [B] int64 gold label or NO_LABEL
    logits_t: np.ndarray | None  # [B, C] float32 teacher logits (distilled mode)
    row_ids: list[str]

    def __len__(self) -> int:
        return len(self.row_ids)


# One buffered row: (id, token ids, hard label, gold label, teacher logits or None)
_Row = tuple[str, list[int], int, int, "np.ndarray | None"]


class ShardStream:
    """Batches over ``refs``; ``mode`` picks the schema: "baseline" reads ``text`` + gold ``label``
    (SEGMENT rows; rows without a gold label are skipped), "distilled" reads LABELLED rows (teacher
    ``logits`` on every row; gold ``label`` used only on ``original`` rows: an augmented copy's source label
    may no longer hold after masking or n-gram sampling)."""

    def __init__(self, run_dir: str, refs: list[ShardRef], *, mode: Mode, vocab: Vocab, labels: list[str],
                 batch_size: int, max_len: int, shuffle: bool = True, shuffle_buffer: int = 10000, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError(f"batch_size and shuffle_buffer must be >= 1, got {batch_size}, {shuffle_buffer}")
        self.run_dir, self.refs, self.mode, self.vocab = run_dir, list(refs), mode, vocab
        self.labels = list(labels)
        self.label_ids = {name: i for i, name in enumerate(self.labels)}
        self.batch_size, self.max_len = batch_size, max_len
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.peak_rows = 0  # most rows held at once (buffer + pending batch): the memory bound, for tests
        self.skipped = 0  # rows without a usable label in the last epoch (baseline mode)

    @property
    def rows_upper_bound(self) -> int:
        return sum(r.rows for r in self.refs)

    def _label_id(self, name: str, ref: ShardRef) -> int:
        try:
            return self.label_ids[name]
        except KeyError:
            raise ValueError(f"label {name!r} in shard {ref.path} is not one of the run's labels "
                             f"{self.labels}; re-run ingest with data.labels listing it") from None

    def _rows(self, ref: ShardRef) -> Iterator[_Row]:
        # A lazy ref (tasks/online.py: labelled by the teacher service on first use) becomes a ShardRef here,
        # so the first epoch reads a shard as soon as it is labelled; anything with `rows` + `sha256` works.
        resolve = getattr(ref, "resolve", None)
        ref = resolve() if resolve is not None else ref
        distilled = self.mode == "distilled"
        # A student reads text, as it will be served (tasks/students/tokens.py): LABELLED rows' teacher text
        # (masked words as the placeholder), SEGMENT rows' own text.
        cols = ["id", "text_t", "label"] + (["kind", "logits", "label_t"] if distilled else [])
        table = read_shard(self.run_dir, ref, columns=None if not distilled else cols)
        if not distilled:
            has_kind = "kind" in table.column_names  # LABELLED shards passed to a baseline: originals only
            text_col = "text_t" if "text_t" in table.column_names else "text"
            table = table.select(["id", text_col, "label"] + (["kind"] if has_kind else []))
            table = table.rename_columns(["id", "text_t", "label"] + (["kind"] if has_kind else []))
        n_classes = len(self.labels)
        for chunk in table.to_batches(max_chunksize=_CHUNK_ROWS):
            d = chunk.to_pydict()
            kinds = d.get("kind") or [None] * chunk.num_rows
            ids, lengths = self.vocab.encode_texts(d["text_t"], self.max_len)  # one pass per chunk
            encoded = [row[:n].tolist() for row, n in zip(ids, lengths)]
            for i in range(chunk.num_rows):
                gold_name = d["label"][i]
                if distilled:
                    logits = np.asarray(d["logits"][i], dtype=np.float32)
                    if logits.shape != (n_classes,):
                        raise ValueError(f"row {d['id'][i]} of {ref.path} has {logits.size} teacher logits for "
                                         f"{n_classes} labels; label the shards with the run's label list")
                    gold = self._label_id(gold_name, ref) if gold_name is not None and kinds[i] == "original" \
                        else NO_LABEL
                    hard = gold if gold != NO_LABEL else self._label_id(d["label_t"][i], ref)
                else:
                    if gold_name is None or kinds[i] not in (None, "original"):
                        self.skipped += 1
                        continue
                    logits, gold = None, self._label_id(gold_name, ref)
                    hard = gold
                yield d["id"][i], encoded[i], hard, gold, logits

    def _collate(self, rows: list[_Row]) -> Batch:
        ids, lengths = pad_batch([r[1] for r in rows])
        logits = np.stack([r[4] for r in rows]) if self.mode == "distilled" else None
        return Batch(ids=ids, lengths=lengths, labels=np.array([r[2] for r in rows], dtype=np.int64),
                     gold=np.array([r[3] for r in rows], dtype=np.int64), logits_t=logits,
                     row_ids=[r[0] for r in rows])

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch; every row appears exactly once."""
        self.skipped = 0
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.refs)) if self.shuffle else range(len(self.refs))
        buffer: list[_Row] = []
        batch: list[_Row] = []

        def held() -> None:
            self.peak_rows = max(self.peak_rows, len(buffer) + len(batch))

        for k in order:
            for row in self._rows(self.refs[k]):
                if not self.shuffle:
                    out = row
                elif len(buffer) < self.shuffle_buffer:
                    buffer.append(row)
                    held()
                    continue
                else:
                    j = int(rng.integers(len(buffer)))
                    out, buffer[j] = buffer[j], row
                batch.append(out)
                held()
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
        # Drain: the buffer's leftovers in random order.
        if buffer:
            for j in rng.permutation(len(buffer)):
                batch.append(buffer[j])
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
            buffer = []
        if batch:
            yield self._collate(batch)
