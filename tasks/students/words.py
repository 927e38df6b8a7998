"""The ``words`` unit of languages written with spaces, tokenised and looked up in one compiled loop.

Why: on English reviews the BOW student spent ~80% of its serving time in ``re.findall`` and one dict lookup per
word (a Python object per token); that capped it near 500x the teacher once the teacher ran in bf16
(bench/students.py). Here a batch is one array of code points, scanned by numba: no Python object per token.

The tokens are exactly those of tasks/students/tokens.word_tokens for these languages: maximal runs of word
characters (Python's ``\\w``: ``str.isalnum()`` or ``_``), and every other non-space character alone
(tests/tasks/students/test_student_tokens.py compares the two on every code point class). A masked word's
placeholder (a private-use character) is a token of its own that no vocabulary holds, so it reads as ``[UNK]``.
Only the first ``max_len`` tokens of a text are scanned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit
from slimflow.storage.schema import PAD, UNK, UNK_ID

N_CODEPOINTS = 0x110000
SPACE, WORD, OTHER = 0, 1, 2
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW = np.uint64(0xFFFFFFFF)
_CLASSES: np.ndarray | None = None


def char_classes() -> np.ndarray:
    """[0x110000] uint8: SPACE (``str.isspace``), WORD (``\\w``) or OTHER, per code point (built once, ~0.1 s)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = np.fromiter(
            (SPACE if chr(c).isspace() else WORD if chr(c).isalnum() or c == 0x5F else OTHER
             for c in range(N_CODEPOINTS)), dtype=np.uint8, count=N_CODEPOINTS)
    return _CLASSES


class WordEncoder:
    """Compiled lookup of the words of a vocabulary (``itos``: [PAD], [UNK], then words).

    An open-addressing hash table (linear probing, load <= 1/4) keyed by 96 bits of two independent hashes of
    each word's code points, key and id side by side in one 16-byte slot: a probe reads one cache line and
    nothing else (confirming a hit against the word's own characters cost half the lookup's time). Another
    word answering for a vocabulary word needs a 96-bit collision: ~vocabulary size / 2**96 per token, under
    1e-23. Two vocabulary words that collide are refused when the table is built.
    """

    def __init__(self, itos: Sequence[str], lowercase: bool = False):
        self.lowercase = lowercase
        words = [(i, w) for i, w in enumerate(itos) if w not in (PAD, UNK)]
        cps = [np.frombuffer(w.encode("utf-32-le"), dtype=np.uint32) for _, w in words]
        offsets = np.zeros(len(itos) + 1, dtype=np.int64)  # word i's code points: flat[offsets[i]:offsets[i+1]]
        lens = np.zeros(len(itos), dtype=np.int64)
        for (i, _), c in zip(words, cps):
            lens[i] = len(c)
        offsets[1:] = np.cumsum(lens)
        flat = np.concatenate(cps) if cps else np.zeros(0, dtype=np.uint32)
        self.bits = max(4, int(np.ceil(np.log2(max(1, len(words)) * 4))))
        self.table = _build_table(np.asarray([i for i, _ in words], dtype=np.int64), offsets, flat, self.bits)
        if len(self.table) == 0:
            raise ValueError("two words of the vocabulary share a 96-bit key; report this as a bug")
        self.classes = char_classes()

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, T] int64, [PAD]-padded, T >= 1; lengths [B] int64): the first ``max_len`` words of each text."""
        if self.lowercase:
            texts = [t.lower() for t in texts]  # whole texts, as word_tokens does (lower() can change lengths)
        cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        return _encode(cps, lens, max_len, self.classes, self.table, self.bits)

    def lookup(self, word: str) -> int:
        """The id of one word (for tests and debugging; encode does the same in bulk)."""
        c = np.frombuffer(word.encode("utf-32-le"), dtype=np.uint32)
        return int(_lookup(c, 0, len(c), self.table, self.bits))


# ----------------------------------------------------------------------------------------- compiled kernels
@njit(cache=True)
def _hash(cps, a, b):
    # Two independent 64-bit hashes of the code points cps[a:b] and their count (FNV-1a; a multiply-add chain
    # with a final mix), computed side by side: the CPU runs the two chains in parallel.
    h = np.uint64(0xCBF29CE484222325)
    g = np.uint64(0x84222325CBF29CE4)
    for j in range(a, b):
        c = np.uint64(cps[j])
        h = (h ^ c) * np.uint64(0x100000001B3)
        g = (g + c) * np.uint64(0xC6A4A7935BD1E995)
    n = np.uint64(b - a)
    return (h ^ n) * np.uint64(0x9E3779B97F4A7C15), ((g ^ (g >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)) ^ n


@njit(cache=True)
def _lookup(cps, a, b, table, bits):
    # A slot is (h, top 32 bits of g | id); an id of 2**64 - 1 marks an empty slot.
    h, g = _hash(cps, a, b)
    g = g & ~_LOW
    mask = (1 << bits) - 1
    s = np.int64(h >> np.uint64(64 - bits))
    while table[s, 1] != _EMPTY:
        if table[s, 0] == h and (table[s, 1] & ~_LOW) == g:
            return np.int64(table[s, 1] & _LOW)
        s = (s + 1) & mask
    return UNK_ID


@njit(cache=True)
def _build_table(ids, offsets, wcps, bits):
    table = np.zeros((1 << bits, 2), dtype=np.uint64)
    table[:, 1] = _EMPTY
    mask = (1 << bits) - 1
    for i in ids:
        h, g = _hash(wcps, offsets[i], offsets[i + 1])
        s = np.int64(h >> np.uint64(64 - bits))
        while table[s, 1] != _EMPTY:
            if table[s, 0] == h and (table[s, 1] & ~_LOW) == (g & ~_LOW):
                return table[:0]  # two words with one 96-bit key: the caller raises
            s = (s + 1) & mask
        table[s, 0] = h
        table[s, 1] = (g & ~_LOW) | np.uint64(i)
    return table


@njit(cache=True)
def _encode(cps, lens, max_len, classes, table, bits):
    b = lens.shape[0]
    ids = np.zeros((b, max(1, max_len)), dtype=np.int64)
    lengths = np.zeros(b, dtype=np.int64)
    start = 0
    for r in range(b):
        end = start + lens[r]
        j, k = start, 0
        while j < end and k < max_len:
            c = classes[cps[j]]
            if c == 0:  # SPACE
                j += 1
                continue
            a = j
            j += 1
            if c == 1:  # WORD: the whole run
                while j < end and classes[cps[j]] == 1:
                    j += 1
            ids[r, k] = _lookup(cps, a, j, table, bits)
            k += 1
        lengths[r] = k
        start = end
    width = 1
    for r in range(b):
        width = max(width, lengths[r])
    return np.ascontiguousarray(ids[:, :width]), lengths
