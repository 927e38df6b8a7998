"""The student vocabulary: tokens -> ids, [PAD] = 0, [UNK] = 1, saved as JSON beside every exported model.

Its ``unit`` says what a token is: ``words`` (the segmented corpus's words) or ``chars`` (characters and
character bigrams, tasks/students/chars.py: a student that serves without a segmenter).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Literal

import numpy as np

from storage.fs import atomic_write_text, read_bytes
from storage.hashing import fingerprint
from storage.schema import PAD, UNK
from storage.shards import ShardRef, read_shard

PAD_ID = 0  # models mask by length, but the embedding's padding_idx keeps [PAD] at zero too
UNK_ID = 1
FORMAT = 1
Unit = Literal["words", "chars"]
UNITS = ("words", "chars")


@dataclass(frozen=True)
class Vocab:
    itos: tuple[str, ...]
    lowercase: bool = False  # en: "Good" and "good" share an id; zh has no case
    unit: Unit = "words"
    stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.itos[:2] != (PAD, UNK):
            raise ValueError(f"a vocabulary must start with {PAD!r}, {UNK!r}; got {list(self.itos[:2])}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown vocabulary unit {self.unit!r}; choose one of: {', '.join(UNITS)}")
        object.__setattr__(self, "stoi", {w: i for i, w in enumerate(self.itos)})
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, word_lists: Iterable[list[str]], *, min_count: int = 1, max_size: int = 50000,
              lowercase: bool = False, unit: Unit = "words") -> Vocab:
        """The ``max_size`` - 2 most frequent tokens seen at least ``min_count`` times (ties by token), over
        the words of each row or, for ``unit="chars"``, the characters and bigrams of its text."""
        if max_size < 3:
            raise ValueError(f"max_size must be >= 3 ([PAD], [UNK] and one word), got {max_size}")
        if unit == "chars":
            from tasks.students.chars import char_string, count_tokens

            counts = count_tokens((char_string(ws) for ws in word_lists), lowercase=lowercase)
        else:
            counts = Counter()
            for words in word_lists:
                counts.update(_fold(words) if lowercase else words)
        for special in (PAD, UNK):
            counts.pop(special, None)  # augmented rows carry [UNK] for masked words: it already has id 1
        # Sorting by (-count, word) makes the vocabulary a pure function of the counts, whatever the row order.
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(itos=(PAD, UNK, *kept[: max_size - 2]), lowercase=lowercase, unit=unit)

    @property
    def chars(self):
        """The compiled encoder of a chars vocabulary (tasks/students/chars.CharEncoder), built on first use:
        a words vocabulary never imports numba."""
        enc = self.__dict__.get("_chars")
        if enc is None:
            if self.unit != "chars":
                raise ValueError("a words vocabulary has no character encoder")
            from tasks.students.chars import CharEncoder

            enc = CharEncoder(self.itos, lowercase=self.lowercase)
            object.__setattr__(self, "_chars", enc)
        return enc

    def encode_texts(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths) of raw texts for a chars vocabulary: ``max_len`` characters each, then their bigrams."""
        return self.chars.encode(texts, max_len)

    def encode_rows(self, word_lists: list[list[str]], max_len: int) -> list[list[int]]:
        """Ids of each row (``encode`` for every row; one compiled pass for a chars vocabulary)."""
        if self.unit == "words":
            return [self.encode(w, max_len) for w in word_lists]
        ids, lengths = self.encode_batch(word_lists, max_len)
        return [row[:n].tolist() for row, n in zip(ids, lengths)]

    def encode(self, words: list[str], max_len: int) -> list[int]:
        """Ids of the first ``max_len`` words; unknown words -> [UNK]. [UNK] in the input stays [UNK].
        For a chars vocabulary: the first ``max_len`` characters of the row's text, then their bigrams."""
        if self.unit == "chars":
            return self.encode_rows([words], max_len)[0]
        words = words[:max_len]
        # map() with a C-level dict.get: ~2x a list comprehension, and encoding is a third of BOW's serving time.
        return list(map(self.stoi.get, _fold(words) if self.lowercase else words, repeat(UNK_ID, len(words))))

    def encode_batch(self, word_lists: list[list[str]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, T] int64 padded with [PAD] to the longest row (>= 1), lengths [B] int64): the same as
        ``pad_batch([encode(w) ...])``, with one lookup pass over the batch's words and no per-row numpy work."""
        if self.unit == "chars":
            from tasks.students.chars import char_string

            return self.chars.encode([char_string(w) for w in word_lists], max_len)
        lengths = np.fromiter((min(len(w), max_len) for w in word_lists), dtype=np.int64, count=len(word_lists))
        flat = list(chain.from_iterable(w[:max_len] for w in word_lists))
        if self.lowercase:
            flat = _fold(flat)
        ids_flat = np.fromiter(map(self.stoi.get, flat, repeat(UNK_ID, len(flat))), dtype=np.int64, count=len(flat))
        width = max(1, int(lengths.max(initial=0)))
        ids = np.full((len(word_lists), width), PAD_ID, dtype=np.int64)
        ids[np.arange(width) < lengths[:, None]] = ids_flat  # row-major fill: row i gets its lengths[i] ids
        return ids, lengths

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "lowercase": self.lowercase, "unit": self.unit,
                           "itos": list(self.itos)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"vocab format {d.get('format')} is not {FORMAT}; rebuild it with train_student")
        return cls(itos=tuple(d["itos"]), lowercase=bool(d["lowercase"]), unit=d.get("unit", "words"))

    def save(self, path: str) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> Vocab:
        return cls.from_json(read_bytes(path).decode("utf-8"))

    @property
    def fingerprint(self) -> str:
        return fingerprint("vocab", self.lowercase, self.unit, list(self.itos))


def _fold(words: list[str]) -> list[str]:
    # Lowercase, but keep the special tokens as they are: "[unk]" must not become a word of its own.
    return [w if w in (UNK, PAD) else w.lower() for w in words]


def pad_batch(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    # T >= 1 even for a batch of empty texts: every model reads position 0 of a length-0 row as [PAD].
    width = max(1, max((len(r) for r in rows), default=0))
    ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))


def build_vocab_from_shards(run_dir: str, refs: list[ShardRef], *, min_count: int = 1, max_size: int = 50000,
                            lowercase: bool = False, unit: Unit = "words") -> Vocab:
    """A vocabulary of ``unit`` tokens over the ``words`` column of ``refs``, read one shard at a time."""

    def word_lists():
        for ref in refs:
            yield from read_shard(run_dir, ref, columns=["words"]).column("words").to_pylist()

    return Vocab.build(word_lists(), min_count=min_count, max_size=max_size, lowercase=lowercase, unit=unit)
