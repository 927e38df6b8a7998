"""Character + character-bigram tokens: the student unit that needs no segmenter (``student.char_students``).

Why: a student that reads words must segment every text it serves, and on this CPU segmentation (jieba-rs)
costs more than the BOW student itself, capping it near 450x the teacher's speed (bench/students.py). Chinese
characters and their bigrams carry most of what the words do for a bag of words, and a whole batch is looked
up in one compiled loop (numba): no Python object per token.

Tokens of one text: its non-whitespace characters (the first ``max_chars``), then the bigram of every
adjacent pair of those characters. The training rows (segmented ``words``, masked words as ``[UNK]``) and the
raw text a served model sees go through the same :meth:`CharEncoder.encode`, so both read identical ids.
A masked word becomes the placeholder character, which maps to ``[UNK]``, as does every bigram touching it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from numba import njit
from slimflow.storage.schema import MASK_PLACEHOLDER, PAD, UNK, UNK_ID

N_CODEPOINTS = 0x110000
_PLACEHOLDER = ord(MASK_PLACEHOLDER)
BMP = 0x10000  # dense tables cover the Basic Multilingual Plane (256 KB: they stay in cache); the rest is rare
# Python's str.isspace() code points (all in the BMP): dropped before tokenising, as the segmenters drop
# whitespace tokens.
_SPACE = np.zeros(BMP, dtype=bool)
_SPACE[[c for c in range(BMP) if chr(c).isspace()]] = True


def char_string(words: Sequence[str], sep: str = "") -> str:
    """The text a segmented row stands for, masked words as the placeholder character (``sep`` between words:
    "" for zh and for characters, whose tokens skip whitespace anyway; " " for languages written with spaces)."""
    return sep.join(MASK_PLACEHOLDER if w == UNK else w for w in words)


def count_tokens(texts: Iterable[str], lowercase: bool = False) -> Counter[str]:
    """Counts of every character and bigram token of ``texts`` (no truncation; placeholder tokens skipped)."""
    counts: Counter[str] = Counter()
    for text in texts:
        s = "".join((text.lower() if lowercase else text).split())
        counts.update(s)
        counts.update(s[i : i + 2] for i in range(len(s) - 1))
    counts.pop(MASK_PLACEHOLDER, None)
    for tok in [t for t in counts if MASK_PLACEHOLDER in t]:
        del counts[tok]
    return counts


class CharEncoder:
    """Compiled lookup of char/bigram tokens for a vocabulary (``itos``: [PAD], [UNK], then tokens).

    BMP characters go through a dense code point -> id table (256 KB: it stays in cache); characters beyond
    it and every bigram through an open-addressing hash table (linear probing, load <= 1/4).
    """

    def __init__(self, itos: Sequence[str], lowercase: bool = False):
        self.lowercase = lowercase
        self.unigram = np.full(BMP, UNK_ID, dtype=np.int32)
        keys, vals = [], []
        for i, tok in enumerate(itos):
            if tok in (PAD, UNK):
                continue
            if len(tok) == 1 and ord(tok) < BMP:
                self.unigram[ord(tok)] = i
            elif len(tok) in (1, 2):
                keys.append(_key(tok))
                vals.append(i)
            else:
                raise ValueError(f"token {tok!r} of a chars vocabulary is neither a character nor a bigram")
        self.unigram[_PLACEHOLDER] = UNK_ID
        self.bits = max(4, int(np.ceil(np.log2(max(1, len(keys)) * 4))))
        self.keys, self.vals = _build_table(np.asarray(keys, dtype=np.int64), np.asarray(vals, dtype=np.int64),
                                            self.bits)

    def lookup(self, tok: str) -> int:
        """The id of one token (for tests and debugging; encode does the same in bulk)."""
        if len(tok) == 1 and ord(tok) < BMP:
            return int(self.unigram[ord(tok)])
        return int(_probe(self.keys, self.vals, self.bits, _key(tok)))

    def encode(self, texts: Sequence[str], max_chars: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, T] int64, [PAD]-padded, T >= 1; lengths [B] int64): each row's characters in order, then
        its bigrams. ``max_chars`` non-whitespace characters per text are read."""
        if self.lowercase:
            texts = [t.lower() for t in texts]  # per text, as count_tokens does (lower() can change lengths)
        cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        return _encode(cps, lens, max_chars, self.unigram, _SPACE, self.keys, self.vals, self.bits)


def _key(tok: str) -> int:
    # A character beyond the BMP: its code point; a bigram: (first + 1) * 0x110000 + second (never a code point).
    if len(tok) == 1:
        return ord(tok)
    return (ord(tok[0]) + 1) * N_CODEPOINTS + ord(tok[1])


# ----------------------------------------------------------------------------------------- compiled kernels
@njit(cache=True)
def _slot(key, bits):
    # Fibonacci hashing: the top bits of key * 2^64 / phi.
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits))


@njit(cache=True)
def _probe(keys, vals, bits, key):
    mask = (1 << bits) - 1
    s = _slot(key, bits)
    while keys[s] != -1:
        if keys[s] == key:
            return vals[s]
        s = (s + 1) & mask
    return UNK_ID


@njit(cache=True)
def _build_table(src_keys, src_vals, bits):
    keys = np.full(1 << bits, -1, dtype=np.int64)
    vals = np.full(1 << bits, UNK_ID, dtype=np.int64)
    mask = (1 << bits) - 1
    for i in range(src_keys.shape[0]):
        s = _slot(src_keys[i], bits)
        while keys[s] != -1 and keys[s] != src_keys[i]:
            s = (s + 1) & mask
        keys[s] = src_keys[i]
        vals[s] = src_vals[i]
    return keys, vals


@njit(cache=True)
def _encode(cps, lens, max_chars, unigram, space, keys, vals, bits):
    b = lens.shape[0]
    bmp = unigram.shape[0]
    n = np.zeros(b, dtype=np.int64)
    start = 0
    for r in range(b):  # pass 1: characters kept per row, for the width
        c = 0
        for j in range(start, start + lens[r]):
            if c == max_chars:
                break
            cp = cps[j]
            if cp < bmp and space[cp]:
                continue
            c += 1
        n[r] = c
        start += lens[r]
    lengths = np.maximum(2 * n - 1, 0)
    width = 1
    for r in range(b):
        width = max(width, lengths[r])
    ids = np.zeros((b, width), dtype=np.int64)
    start = 0
    for r in range(b):  # pass 2: unigram k at column k, the bigram ending at k at column n + k - 1
        k = 0
        prev = 0
        for j in range(start, start + lens[r]):
            if k == n[r]:
                break
            cp = np.int64(cps[j])
            if cp < bmp and space[cp]:
                continue
            ids[r, k] = unigram[cp] if cp < bmp else _probe(keys, vals, bits, cp)
            if k > 0:
                ids[r, n[r] + k - 1] = _probe(keys, vals, bits, (prev + 1) * N_CODEPOINTS + cp)  # as _key
            prev = cp
            k += 1
        start += lens[r]
    return ids, lengths
