"""Ingest: read the inputs, normalise, quarantine bad rows with a reason, split, write Parquet shards.

Nothing valid is dropped and nothing invalid passes silently: every row read ends in exactly one shard or
in ``ingest/rejects.parquet`` with its reason. Row ids are ``sha256(normalised text)[:16]``: stable across
reorderings and reruns, and unique because duplicate texts are quarantined.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from slimflow.storage.fs import atomic_write_bytes, join
from slimflow.storage.hashing import sha256_bytes
from slimflow.storage.readers import InputError, normalise_label, read_rows, shorten
from slimflow.storage.schema import INGEST, REJECTS, SPLITS
from slimflow.storage.shards import ShardRef, table_to_parquet_bytes, write_shard

# Lower number wins when the same text appears twice: the test set is fixed, so a training copy of a
# test text is the one quarantined (otherwise the test set leaks into training).
_PRIORITY = {"test": 0, "dev": 1, "train": 2, "unlabelled": 3}
# U+E000 is slimflow.storage.schema.MASK_PLACEHOLDER: in user text it would reach the teacher as its mask token.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ue000]")
_SPACES = re.compile(r"\s+")
# Below this many training rows (before dev/test are split off) a run can only produce nothing useful: no dev
# rows for early stopping, no test rows to score. A floor against inputs that went wrong, not a recommendation.
MIN_TRAIN_ROWS = 10

log = logging.getLogger(__name__)


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
    max_chars: int = 500_000  # a guard against pathological input, not a model limit (flows/config.py, issue 11)
    shard_rows: int = 2000
    min_train_rows: int = MIN_TRAIN_ROWS


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
    raw = read_rows(path, p.text_column, None if split == "unlabelled" else p.label_column, labels=p.labels)
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
    "reasons": {reason: n}, "warnings": [...]}``; the caller commits the manifest. Inputs that can only
    produce nothing (a label listed twice, an empty file, a training split left with fewer than 2 classes or
    ``min_train_rows`` rows) raise :class:`InputError`; ``rejects.parquet`` is written first, and the message
    names the top reject reasons.
    """
    if p.labels is not None:
        twice = sorted({x for x in p.labels if list(p.labels).count(x) > 1})
        if twice:
            raise InputError(f"data.labels lists {', '.join(map(repr, twice))} more than once "
                             f"({list(p.labels)}); list each class once")
    sources = {"train": p.train, "dev": p.dev, "test": p.test, "unlabelled": p.unlabelled}
    rows: list[_Row] = []
    rejects: list[tuple[_Row, str]] = []
    warnings: list[str] = []
    for split, path in sources.items():
        if path is None:
            continue
        split_rows, problems = _read_split(split, path, p)
        if not split_rows:
            if split == "unlabelled":
                warnings.append(f"{path}: no data rows (data.unlabelled is empty)")
                continue
            fix = "add labelled rows" if split == "train" else f"add rows, or remove data.{split} to split it off train"
            raise InputError(f"{path}: no data rows (only a header, or nothing); {fix}")
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
    _check_train(run_dir, p, rows, rejects, labels, warnings)

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

    rej_bytes = _write_rejects(run_dir, rejects)
    return {
        "shards": [r.to_dict() for r in refs],
        "labels": labels,
        "rows": counts,
        "rejected": len(rejects),
        "reasons": _reasons(rejects),
        "rejects": {"path": "ingest/rejects.parquet", "sha256": sha256_bytes(rej_bytes)},
        "warnings": warnings,
    }


def _reason_kind(why: str) -> str:
    return why.split(" (")[0].split(":")[0]


def _reasons(rejects: list[tuple[_Row, str]]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for _, why in rejects:
        kind = _reason_kind(why)
        reasons[kind] = reasons.get(kind, 0) + 1
    return reasons


# What to do when most training rows were rejected for a reason (its kind's first words).
_FIXES = (
    ("unknown label", "check data.labels against the label column's values"),
    ("missing label", "check data.label_column (only an empty cell is a missing label)"),
    ("exact duplicate of test", "data.test holds the training rows: give a separate test file, or remove data.test "
     "to split one off train"),
    ("exact duplicate of dev", "data.dev holds the training rows: give a separate dev file, or remove data.dev"),
    ("undecodable", "save the file as UTF-8"),
    ("merged rows", "fix the quoting at the lines listed in rejects.parquet"),
    ("unclosed quote", "fix the quoting at the lines listed in rejects.parquet"),
    ("wrong number of fields", "fix the delimiters at the lines listed in rejects.parquet"),
    ("empty", "check data.text_column"),
    ("text longer", "raise data.max_chars"),
    ("text present with conflicting labels", "give each text one label"),
)


def _check_train(run_dir: str, p: IngestParams, rows: list[_Row], rejects: list[tuple[_Row, str]],
                 labels: list[str], warnings: list[str]) -> None:
    """Refuse a training split that can only produce nothing; warn about listed labels that never occur."""
    train = [r for r in rows if r.split == "train"]
    present = sorted({r.label for r in train})
    if len(present) >= 2 and len(train) >= p.min_train_rows:
        for name in labels:
            if name not in present:
                msg = (f"{p.train}: label {name!r} of data.labels occurs in no training row; remove it from "
                       "data.labels, or check data.label_column")
                warnings.append(msg)
                log.warning(msg)
        return
    _write_rejects(run_dir, rejects)
    if len(present) < 2:
        why = (f"the training rows have {len(present)} class(es) {[shorten(x, 30)[1:-1] for x in present[:5]]} "
               "after ingest; a classifier needs at least 2")
    else:
        why = f"only {len(train)} training rows are left after ingest; at least {p.min_train_rows} are needed"
    train_rej = [(r, w) for r, w in rejects if r.split == "train"]
    if not train_rej:
        fix = ("check data.label_column, or list data.labels" if len(present) < 2 else "add labelled rows")
        raise InputError(f"{p.train}: {why}, and no row was rejected; {fix}")
    top = sorted(_reasons(train_rej).items(), key=lambda kv: -kv[1])
    shown = "; ".join(f"{n}x {shorten(k, 200)[1:-1]}" for k, n in top[:3]) + ("; ..." if len(top) > 3 else "")
    fix = next((f for k, f in _FIXES if top[0][0].startswith(k)), "see the reasons in rejects.parquet")
    raise InputError(f"{p.train}: {why}; {len(train_rej)} training rows were rejected ({shown}; see "
                     f"{join(run_dir, 'ingest', 'rejects.parquet')}); {fix}")


def _write_rejects(run_dir: str, rejects: list[tuple[_Row, str]]) -> bytes:
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
    return rej_bytes
