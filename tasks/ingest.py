"""Ingest: read the inputs, normalise, quarantine bad rows with a reason, split, write Parquet shards.

Nothing valid is dropped and nothing invalid passes silently: every row read ends in exactly one shard or
in ``ingest/rejects.parquet`` with its reason. Row ids are ``sha256(normalised text)[:16]``: stable across
reorderings and reruns, and unique because duplicate texts are quarantined.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from storage.fs import atomic_write_bytes, join
from storage.hashing import sha256_bytes
from storage.readers import InputError, normalise_label, read_rows
from storage.schema import INGEST, REJECTS, SPLITS
from storage.shards import ShardRef, table_to_parquet_bytes, write_shard

# Lower number wins when the same text appears twice: the test set is fixed, so a training copy of a
# test text is the one quarantined (otherwise the test set leaks into training).
_PRIORITY = {"test": 0, "dev": 1, "train": 2, "unlabelled": 3}
# U+E000 is storage.schema.MASK_PLACEHOLDER: in user text it would reach the teacher as its mask token.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ue000]")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class IngestParams:
    train: str
    dev: str | None = None
    test: str | None = None
    unlabelled: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] | None = None
    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    max_chars: int = 5000
    shard_rows: int = 2000


def normalise_text(text: str) -> str:
    """NFC, a leading BOM dropped, control characters, line breaks and the mask placeholder as spaces, runs of
    space folded."""
    text = unicodedata.normalize("NFC", text).lstrip("\ufeff")
    return _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()


def row_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class _Row:
    split: str
    file: str
    row: int
    raw_text: str | None
    raw_label: object
    text: str = ""
    label: str | None = None


def _read_split(split: str, path: str, p: IngestParams) -> tuple[list[_Row], list[str | None]]:
    raw = read_rows(path, p.text_column, None if split == "unlabelled" else p.label_column)
    return [_Row(split, path, r, t, lab) for t, lab, r in zip(raw.text, raw.label, raw.row)], raw.problem


def _split_train(rows: list[_Row], labels: list[str], p: IngestParams) -> None:
    """Stratified, seeded dev/test split of the valid train rows, in place (sets ``row.split``).

    Positions, not texts, are permuted: editing a row's text in place keeps every row in its split.
    """
    for li, name in enumerate(labels):
        idx = [i for i, r in enumerate(rows) if r.label == name]
        perm = np.random.default_rng([p.split_seed, li]).permutation(len(idx))
        n_test = round(len(idx) * p.test_fraction)
        n_dev = round(len(idx) * p.dev_fraction)
        for k, j in enumerate(perm[: n_test + n_dev]):
            rows[idx[j]].split = "test" if k < n_test else "dev"


def ingest(run_dir: str, p: IngestParams) -> dict:
    """Read, validate, split and shard the inputs under ``run_dir/ingest``.

    Returns ``{"shards": [ShardRef dicts], "labels": [...], "rows": {split: n}, "rejected": n,
    "reasons": {reason: n}}``; the caller commits the manifest.
    """
    sources = {"train": p.train, "dev": p.dev, "test": p.test, "unlabelled": p.unlabelled}
    rows: list[_Row] = []
    rejects: list[tuple[_Row, str]] = []
    for split, path in sources.items():
        if path is None:
            continue
        split_rows, problems = _read_split(split, path, p)
        for r, problem in zip(split_rows, problems):
            if problem:
                rejects.append((r, problem))
            else:
                rows.append(r)

    # 1. per-row checks: text and label
    labelled: list[_Row] = []
    for r in rows:
        r.text = normalise_text(r.raw_text) if isinstance(r.raw_text, str) else ""
        if not r.text:
            rejects.append((r, "empty or whitespace-only text"))
            continue
        if len(r.text) > p.max_chars:
            rejects.append((r, f"text longer than data.max_chars ({len(r.text)} > {p.max_chars})"))
            continue
        if r.split != "unlabelled":
            r.label = normalise_label(r.raw_label)
            if r.label is None:
                rejects.append((r, "missing label"))
                continue
        labelled.append(r)
    rows = labelled

    # 2. label set: configured, or inferred from train
    if p.labels:
        labels = list(p.labels)
    else:
        labels = sorted({r.label for r in rows if r.split == "train"})
    if len(labels) < 2:
        raise InputError(f"{p.train}: the training rows have {len(labels)} class(es) {labels}; a classifier "
                         "needs at least 2. Check data.label_column, or list data.labels.")
    known = set(labels)
    kept: list[_Row] = []
    for r in rows:
        if r.split != "unlabelled" and r.label not in known:
            rejects.append((r, f"unknown label {r.label!r} (labels: {', '.join(labels)})"))
        else:
            kept.append(r)
    rows = kept

    # 3. duplicates and conflicts, across every split
    by_text: dict[str, list[_Row]] = {}
    for r in sorted(rows, key=lambda r: (_PRIORITY[r.split], r.file, r.row)):
        by_text.setdefault(r.text, []).append(r)
    rows = []
    for group in by_text.values():
        names = sorted({r.label for r in group if r.label is not None})
        if len(names) > 1:
            where = "; ".join(f"{r.label} ({r.file}:{r.row})" for r in group if r.label is not None)
            rejects.extend((r, f"text present with conflicting labels: {where}") for r in group)
            continue
        first = group[0]
        rows.append(first)
        rejects.extend((r, f"exact duplicate of {first.split} row {first.file}:{first.row}") for r in group[1:])
    rows.sort(key=lambda r: (_PRIORITY[r.split], r.file, r.row))

    # 4. split train into dev/test where those were not given
    if p.dev is None or p.test is None:
        train = [r for r in rows if r.split == "train"]
        frac_dev = p.dev_fraction if p.dev is None else 0.0
        frac_test = p.test_fraction if p.test is None else 0.0
        _split_train(train, labels, IngestParams(**{**p.__dict__, "dev_fraction": frac_dev,
                                                    "test_fraction": frac_test}))

    # 5. shards, in input order within each split
    refs: list[ShardRef] = []
    counts: dict[str, int] = {}
    for split in SPLITS:
        split_rows = [r for r in rows if r.split == split]
        split_rows.sort(key=lambda r: (r.file, r.row))
        counts[split] = len(split_rows)
        for index, start in enumerate(range(0, len(split_rows), p.shard_rows)):
            chunk = split_rows[start : start + p.shard_rows]
            table = pa.table(
                {
                    "id": [row_id(r.text) for r in chunk],
                    "text": [r.text for r in chunk],
                    "label": [r.label for r in chunk],
                    "source_file": [r.file for r in chunk],
                    "source_row": [r.row for r in chunk],
                },
                schema=INGEST,
            )
            refs.append(write_shard(table, run_dir, f"ingest/{split}", split, index, INGEST))

    rejects.sort(key=lambda x: (_PRIORITY[x[0].split], x[0].file, x[0].row))
    rej = pa.table(
        {
            "split": [r.split for r, _ in rejects],
            "source_file": [r.file for r, _ in rejects],
            "source_row": [r.row for r, _ in rejects],
            "text": [r.raw_text if isinstance(r.raw_text, str) else None for r, _ in rejects],
            "label": [None if r.raw_label is None else str(r.raw_label) for r, _ in rejects],
            "reason": [why for _, why in rejects],
        },
        schema=REJECTS,
    )
    rej_bytes = table_to_parquet_bytes(rej)
    atomic_write_bytes(join(run_dir, "ingest", "rejects.parquet"), rej_bytes)
    reasons: dict[str, int] = {}
    for _, why in rejects:
        kind = why.split(" (")[0].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "shards": [r.to_dict() for r in refs],
        "labels": labels,
        "rows": counts,
        "rejected": len(rejects),
        "reasons": reasons,
        "rejects": {"path": "ingest/rejects.parquet", "sha256": sha256_bytes(rej_bytes)},
    }
