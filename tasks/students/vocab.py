"""The student vocabulary: tokens -> ids, [PAD] = 0, [UNK] = 1, saved as JSON beside every exported model.

Its ``unit`` says what a token is (tasks/students/tokens.py): ``words`` (jieba's words for zh, word characters
and punctuation marks otherwise), ``chars`` (characters and character bigrams, tasks/students/chars.py) or
``subword`` (the teacher's tokenizer's pieces, tasks/students/subword.py; its tokenizer is saved beside the
vocabulary as ``<name>.tokenizer.json``). :meth:`Vocab.encode_texts` is the one way text becomes ids, for
training rows and served text alike.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Literal

import numpy as np
from slimflow.storage.fs import atomic_write_text, exists, read_bytes
from slimflow.storage.hashing import fingerprint, sha256_bytes
from slimflow.storage.schema import PAD, PAD_ID, UNK, UNK_ID
from slimflow.storage.shards import ShardRef, read_shard

# A student reading max_len tokens of a long text needs at most this many characters per token of it: cut there.
_CHARS_PER_TOKEN = 16
FORMAT = 2  # 2: text-based units (lang, subword tokenizer); 1 had words as the segmenter gave them
Unit = Literal["words", "chars", "subword"]
UNITS = ("words", "chars", "subword")


@dataclass(frozen=True)
class Vocab:
    itos: tuple[str, ...]
    lowercase: bool = False  # en: "Good" and "good" share an id; zh has no case
    unit: Unit = "words"
    lang: str = "zh"  # words: zh is segmented with jieba, any other language split at non-word characters
    tokenizer: str | None = field(default=None, repr=False)  # subword: the serialised teacher tokenizer
    # Corpus count of each token (0 for [PAD], [UNK]) when built from counts: static_vectors' SIF weights.
    counts: tuple[int, ...] = field(default=(), repr=False, compare=False)
    stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.itos[:2] != (PAD, UNK):
            raise ValueError(f"a vocabulary must start with {PAD!r}, {UNK!r}; got {list(self.itos[:2])}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown vocabulary unit {self.unit!r}; choose one of: {', '.join(UNITS)}")
        if (self.unit == "subword") != (self.tokenizer is not None):
            raise ValueError("a subword vocabulary needs its tokenizer, and only a subword vocabulary has one")
        object.__setattr__(self, "stoi", {w: i for i, w in enumerate(self.itos)})
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, word_lists: Iterable[list[str]], *, min_count: int = 1, max_size: int = 50000,
              lowercase: bool = False, unit: Unit = "words", lang: str = "zh") -> Vocab:
        """The ``max_size`` - 2 most frequent tokens seen at least ``min_count`` times (ties by token), over
        the given words of each row or, for ``unit="chars"``, the characters and bigrams of its text."""
        if unit == "chars":
            from slimflow.tasks.students.chars import char_string, count_tokens

            counts = count_tokens((char_string(ws) for ws in word_lists), lowercase=lowercase)
        elif unit == "words":
            counts = Counter()
            for words in word_lists:
                counts.update(_fold(words) if lowercase else words)
        else:
            raise ValueError("a subword vocabulary is built from texts: use Vocab.from_texts")
        return cls._from_counts(counts, min_count, max_size, lowercase=lowercase, unit=unit, lang=lang)

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, unit: Unit, lang: str, lowercase: bool = False,
                   min_count: int = 1, max_size: int = 50000, tokenizer: str | None = None) -> Vocab:
        """A vocabulary of ``unit`` tokens counted over raw texts, tokenised by :meth:`encode_texts`' own
        tokeniser (masked words as the placeholder). ``tokenizer``: the teacher's, for ``unit="subword"``."""
        if unit == "subword":
            if tokenizer is None:
                raise ValueError("a subword vocabulary needs the teacher's tokenizer (tokenizer=...)")
            from slimflow.tasks.students.subword import SubwordEncoder

            enc = SubwordEncoder(tokenizer)
            counts_arr = enc.count(texts)
            nz = np.flatnonzero(counts_arr)
            counts = Counter({enc.tok.id_to_token(int(i)): int(counts_arr[i]) for i in nz})
            return cls._from_counts(counts, min_count, max_size, lowercase=False, unit=unit, lang=lang,
                                    tokenizer=tokenizer)
        if unit == "chars":
            from slimflow.tasks.students.chars import count_tokens

            return cls._from_counts(count_tokens(texts, lowercase=lowercase), min_count, max_size,
                                    lowercase=lowercase, unit=unit, lang=lang)
        from slimflow.tasks.students.tokens import word_tokens

        counts = Counter()
        buf: list[str] = []
        for t in chain(texts, [None]):
            if t is not None:
                buf.append(t)
            if len(buf) == 1024 or (t is None and buf):
                for ws in word_tokens(buf, lang, lowercase):
                    counts.update(ws)
                buf = []
        return cls._from_counts(counts, min_count, max_size, lowercase=lowercase, unit=unit, lang=lang)

    @classmethod
    def _from_counts(cls, counts: Counter, min_count: int, max_size: int, **kw) -> Vocab:
        if max_size < 3:
            raise ValueError(f"max_size must be >= 3 ([PAD], [UNK] and one word), got {max_size}")
        for special in (PAD, UNK):
            counts.pop(special, None)  # augmented rows carry [UNK] for masked words: it already has id 1
        # Sorting by (-count, word) makes the vocabulary a pure function of the counts, whatever the row order.
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        kept = kept[: max_size - 2]
        return cls(itos=(PAD, UNK, *kept), counts=(0, 0, *(counts[w] for w in kept)), **kw)

    @property
    def chars(self):
        """The compiled encoder of a chars vocabulary (tasks/students/chars.CharEncoder), built on first use:
        a words vocabulary never imports numba."""
        enc = self.__dict__.get("_chars")
        if enc is None:
            if self.unit != "chars":
                raise ValueError("a words vocabulary has no character encoder")
            from slimflow.tasks.students.chars import CharEncoder

            enc = CharEncoder(self.itos, lowercase=self.lowercase)
            object.__setattr__(self, "_chars", enc)
        return enc

    @property
    def words(self):
        """The compiled encoder of a words vocabulary of a language written with spaces (tasks/students/words.
        WordEncoder: the tokens of word_tokens, ~10x faster), built on first use."""
        enc = self.__dict__.get("_words")
        if enc is None:
            if self.unit != "words" or self.lang == "zh":
                raise ValueError(f"a {self.unit} vocabulary of {self.lang!r} has no compiled word encoder")
            from slimflow.tasks.students.words import WordEncoder

            enc = WordEncoder(self.itos, lowercase=self.lowercase)
            object.__setattr__(self, "_words", enc)
        return enc

    @property
    def subword(self):
        """The tokenizer-backed encoder of a subword vocabulary (tasks/students/subword.SubwordEncoder)."""
        enc = self.__dict__.get("_subword")
        if enc is None:
            if self.unit != "subword":
                raise ValueError(f"a {self.unit} vocabulary has no subword encoder")
            from slimflow.tasks.students.subword import SubwordEncoder

            enc = SubwordEncoder(self.tokenizer, self.itos)
            object.__setattr__(self, "_subword", enc)
        return enc

    def encode_texts(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, T] int64 [PAD]-padded, T >= 1; lengths [B] int64) of raw texts, the first ``max_len``
        tokens of each (chars: ``max_len`` characters, then their bigrams). The one path from text to ids:
        training rows (``text`` / ``text_t``) and served text both come through here."""
        if self.unit == "chars":
            return self.chars.encode(texts, max_len)
        # A long document is tokenised only as far as the student reads it: cut at a whitespace past
        # _CHARS_PER_TOKEN * max_len characters. Every tokeniser here ends a token at whitespace, so the
        # prefix's first max_len tokens are the whole text's; a prefix with fewer is read whole after all.
        limit = _CHARS_PER_TOKEN * max_len
        cut = {i: t.rfind(" ", limit // 2, limit) for i, t in enumerate(texts) if len(t) > limit}
        cut = {i: k for i, k in cut.items() if k > 0}
        if not cut:
            return self._encode_texts(texts, max_len)
        ids, lengths = self._encode_texts([t[: cut[i]] if i in cut else t for i, t in enumerate(texts)], max_len)
        redo = [i for i in cut if lengths[i] < max_len]
        if redo:
            r_ids, r_lengths = self._encode_texts([texts[i] for i in redo], max_len)
            if r_ids.shape[1] > ids.shape[1]:
                ids = np.pad(ids, ((0, 0), (0, r_ids.shape[1] - ids.shape[1])))
            ids[redo] = PAD_ID
            ids[redo, : r_ids.shape[1]] = r_ids
            lengths[redo] = r_lengths
        return ids, lengths

    def _encode_texts(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        if self.unit == "subword":
            return self.subword.encode(texts, max_len)
        if self.lang != "zh":  # the tokens of word_tokens, scanned and looked up in one compiled pass
            return self.words.encode(texts, max_len)
        from slimflow.tasks.students.tokens import word_tokens

        # word_tokens lowercases whole texts (one str.lower() each): the lookup need not fold word by word.
        return self.encode_batch(word_tokens(texts, self.lang, self.lowercase), max_len, folded=True)

    def token_counts(self, texts: list[str]) -> np.ndarray:
        """[B] tokens in each text before ``max_len`` cuts it (chars: characters read), for truncation counts."""
        if self.unit == "chars":
            return np.fromiter((len("".join(t.split())) for t in texts), dtype=np.int64, count=len(texts))
        if self.unit == "subword":
            return self.subword.lengths(texts)
        from slimflow.tasks.students.tokens import word_tokens

        return np.fromiter(map(len, word_tokens(texts, self.lang)), dtype=np.int64, count=len(texts))

    def encode_rows(self, word_lists: list[list[str]], max_len: int) -> list[list[int]]:
        """Ids of each row of given words (``encode`` for every row; one compiled pass for a chars vocabulary)."""
        if self.unit == "words":
            return [self.encode(w, max_len) for w in word_lists]
        ids, lengths = self.encode_batch(word_lists, max_len)
        return [row[:n].tolist() for row, n in zip(ids, lengths)]

    def encode(self, words: list[str], max_len: int) -> list[int]:
        """Ids of the first ``max_len`` words; unknown words -> [UNK]. [UNK] in the input stays [UNK].
        For a chars vocabulary: the first ``max_len`` characters of the row's text, then their bigrams."""
        if self.unit != "words":
            return self.encode_rows([words], max_len)[0]
        words = words[:max_len]
        # map() with a C-level dict.get: ~2x a list comprehension, and encoding is a third of BOW's serving time.
        return list(map(self.stoi.get, _fold(words) if self.lowercase else words, repeat(UNK_ID, len(words))))

    def encode_batch(self, word_lists: list[list[str]], max_len: int,
                     folded: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, T] int64 padded with [PAD] to the longest row (>= 1), lengths [B] int64): the same as
        ``pad_batch([encode(w) ...])``, with one lookup pass over the batch's words and no per-row numpy work.
        chars and subword vocabularies encode the text the words stand for (masked words as the placeholder)."""
        if self.unit != "words":
            from slimflow.tasks.students.chars import char_string

            sep = "" if self.unit == "chars" or self.lang == "zh" else " "
            return self.encode_texts([char_string(w, sep) for w in word_lists], max_len)
        lengths = np.fromiter((min(len(w), max_len) for w in word_lists), dtype=np.int64, count=len(word_lists))
        flat = list(chain.from_iterable(w[:max_len] for w in word_lists))
        if self.lowercase and not folded:
            flat = _fold(flat)
        ids_flat = np.fromiter(map(self.stoi.get, flat, repeat(UNK_ID, len(flat))), dtype=np.int64, count=len(flat))
        width = max(1, int(lengths.max(initial=0)))
        ids = np.full((len(word_lists), width), PAD_ID, dtype=np.int64)
        ids[np.arange(width) < lengths[:, None]] = ids_flat  # row-major fill: row i gets its lengths[i] ids
        return ids, lengths

    def to_json(self) -> str:
        d = {"format": FORMAT, "lowercase": self.lowercase, "unit": self.unit, "lang": self.lang,
             "itos": list(self.itos), "counts": list(self.counts)}
        if self.tokenizer is not None:
            d["tokenizer_sha256"] = sha256_bytes(self.tokenizer.encode("utf-8"))
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, tokenizer: str | None = None) -> Vocab:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"vocab format {d.get('format')} is not {FORMAT}; rebuild it with the train stage "
                             "(`slimflow train CONFIG --out RUN`)")
        if tokenizer is not None and sha256_bytes(tokenizer.encode("utf-8")) != d.get("tokenizer_sha256"):
            raise ValueError("the tokenizer beside this subword vocabulary is not the one it was built with; "
                             "re-export the student")
        return cls(itos=tuple(d["itos"]), lowercase=bool(d["lowercase"]), unit=d["unit"], lang=d["lang"],
                   tokenizer=tokenizer, counts=tuple(d.get("counts") or ()))

    def save(self, path: str) -> None:
        """``path`` (JSON), and for a subword vocabulary its tokenizer beside it (:func:`tokenizer_path`), first."""
        if self.tokenizer is not None:
            atomic_write_text(tokenizer_path(path), self.tokenizer)
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> Vocab:
        text = read_bytes(path).decode("utf-8")
        tok = None
        if json.loads(text).get("unit") == "subword":
            tp = tokenizer_path(path)
            if not exists(tp):
                raise FileNotFoundError(f"{tp} is missing: a subword vocabulary needs its tokenizer beside it")
            tok = read_bytes(tp).decode("utf-8")
        return cls.from_json(text, tokenizer=tok)

    @property
    def fingerprint(self) -> str:
        tok = sha256_bytes(self.tokenizer.encode("utf-8")) if self.tokenizer is not None else None
        return fingerprint("vocab", self.lowercase, self.unit, self.lang, tok, list(self.itos))


def tokenizer_path(vocab_path: str) -> str:
    """Where a subword vocabulary's tokenizer lies: ``vocab.json`` -> ``vocab.tokenizer.json``."""
    stem = vocab_path[: -len(".json")] if vocab_path.endswith(".json") else vocab_path
    return stem + ".tokenizer.json"


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


def build_vocab_from_shards(run_dir: str, refs: list[ShardRef], *, unit: Unit = "words", lang: str = "zh",
                            lowercase: bool = False, min_count: int = 1, max_size: int = 50000,
                            tokenizer: str | None = None) -> Vocab:
    """A vocabulary of ``unit`` tokens over the texts of ``refs`` (``text`` of SEGMENT / INGEST shards,
    ``text_t`` of LABELLED ones), read one shard at a time and tokenised as :meth:`Vocab.encode_texts` reads."""

    def texts():
        for ref in refs:
            table = read_shard(run_dir, ref)
            yield from table.column("text_t" if "text_t" in table.column_names else "text").to_pylist()

    return Vocab.from_texts(texts(), unit=unit, lang=lang, lowercase=lowercase, min_count=min_count,
                            max_size=max_size, tokenizer=tokenizer)
