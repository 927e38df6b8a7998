"""The ``subword`` unit: the teacher's own fast tokenizer, its vocabulary trimmed to the corpus's pieces.

The tokenizer runs whole (Hugging Face ``tokenizers``, Rust, one call per batch); only the student's
embedding table is trimmed. A piece the corpus never showed maps to ``[UNK]``, as does a masked word: the
placeholder is swapped for the tokenizer's own unknown token first (the default teacher's vocabulary holds the
placeholder's private-use character as a piece of its own, so it would otherwise be read as a word).
The default teacher's 250,002 pieces become the few tens of thousands a corpus uses (TextPruner cut XLM-R
the same way, DESIGN.md): a table of tens of thousands of rows, not 250,000.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
from slimflow.storage.schema import MASK_PLACEHOLDER, PAD, PAD_ID, UNK, UNK_ID


class SubwordEncoder:
    """Texts -> student ids through a serialised ``tokenizers.Tokenizer`` (``tokenizer_json``) and the student
    vocabulary ``itos`` ([PAD], [UNK], then teacher pieces)."""

    def __init__(self, tokenizer_json: str, itos: Sequence[str] = (PAD, UNK)):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.no_truncation()
        self.tok.no_padding()
        self.unk_text = _unknown_token(self.tok, tokenizer_json)
        self.special_ids = np.asarray(sorted(self.tok.get_added_tokens_decoder()), dtype=np.int64)
        n = self.tok.get_vocab_size(with_added_tokens=True)
        self.table = np.full(n, UNK_ID, dtype=np.int64)  # teacher id -> student id
        for i, piece in enumerate(itos):
            if i < 2:
                continue
            tid = self.tok.token_to_id(piece)
            if tid is None:
                raise ValueError(f"piece {piece!r} of a subword vocabulary is not in its tokenizer; rebuild the "
                                 "vocabulary with the tokenizer it was made from")
            self.table[tid] = i

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """The teacher's piece ids of each text, no special tokens, masked words as its unknown id."""
        texts = [t.replace(MASK_PLACEHOLDER, self.unk_text) if MASK_PLACEHOLDER in t else t for t in texts]
        # encode_batch_fast skips the offsets: ~3x encode_batch here (23k vs 8k English reviews/s).
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def count(self, texts: Iterable[str], chunk: int = 1024) -> np.ndarray:
        """[teacher vocab size] int64 counts of each piece over ``texts`` (special tokens not counted)."""
        counts = np.zeros(len(self.table), dtype=np.int64)
        buf: list[str] = []

        def flush() -> None:
            ids = [i for row in self.pieces(buf) for i in row]
            counts[:] += np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(counts))[: len(counts)]

        for t in texts:
            buf.append(t)
            if len(buf) == chunk:
                flush()
                buf = []
        if buf:
            flush()
        counts[self.special_ids] = 0
        return counts

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, T] int64 [PAD]-padded, T >= 1; lengths [B] int64) of the first ``max_len`` pieces."""
        rows = self.pieces(texts)
        lengths = np.fromiter((min(len(r), max_len) for r in rows), dtype=np.int64, count=len(rows))
        width = max(1, int(lengths.max(initial=0)))
        ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        flat = np.fromiter((i for r in rows for i in r[:max_len]), dtype=np.int64, count=int(lengths.sum()))
        ids[np.arange(width) < lengths[:, None]] = self.table[flat]
        return ids, lengths

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """[B] untruncated piece counts (how many texts a ``max_len`` cuts)."""
        return np.fromiter(map(len, self.pieces(texts)), dtype=np.int64, count=len(texts))


def _unknown_token(tok, tokenizer_json: str) -> str:
    model = json.loads(tokenizer_json).get("model", {})
    unk = model.get("unk_token")
    if unk is None and model.get("unk_id") is not None:  # Unigram keeps the id, not the string
        unk = tok.id_to_token(int(model["unk_id"]))
    if unk is None or tok.token_to_id(unk) is None:
        raise ValueError("the teacher's tokenizer has no unknown token, so a masked word has no piece to become; "
                         "use student unit words or chars with this teacher")
    return unk


def tokenizer_json(model_path: str, trust_remote_code: bool = False) -> str:
    """The serialised fast tokenizer of a teacher directory (``tokenizer.json``, or converted from the slow
    files by transformers)."""
    import os

    path = os.path.join(model_path, "tokenizer.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, use_fast=True, trust_remote_code=trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"the tokenizer of {model_path} has no fast (Rust) version; the subword unit needs one")
    return tok.backend_tokenizer.to_str()
