"""Static token vectors distilled from the teacher: a student's embedding table that starts from what the
teacher knows of each token (``student.init: teacher``).

model2vec's recipe (``model2vec/distill/``): run each vocabulary token through the teacher on its own,
mean-pool the output states into one vector per token, PCA to the student's width, then weight each vector by
w = a / (a + p(token)) (SIF; p from the corpus's own token counts, not a Zipf estimate). Their ablations gave
PCA +2.8 and frequency weighting +3.1 points. Tang et al. 2019 initialised their BiLSTM from word2vec for the
same reason: a few thousand labelled rows teach a student little about words it rarely sees.

The token's text is what the teacher reads: a word, a character or bigram, or a subword piece (whose id is
fed directly, between the tokenizer's special tokens). No ``query:`` prefix: it would be most of each input.
"""

from __future__ import annotations

import numpy as np
from slimflow.tasks.students.vocab import Vocab

SIF_A = 1e-4  # model2vec's default sif_coefficient
_MAX_TOKEN_PIECES = 16  # a word longer than this many pieces is read by its first ones


def static_vectors(vocab: Vocab, teacher, dim: int, *, batch_tokens: int = 4096, sif: float = SIF_A) -> np.ndarray:
    """[len(vocab), dim] float32 initial embeddings: rows 0 ([PAD]) and 1 ([UNK]) zero, the rest the teacher's
    PCA'd, SIF-weighted vectors, scaled so the mean row norm is sqrt(dim), as for nn.Embedding's N(0, 1) rows.
    ``teacher``: an encoder ``slimflow.tasks.teacher.model.Teacher`` (``load_base_teacher``). Deterministic: the same
    vocabulary and teacher give the same array."""
    from slimflow.tasks.teacher.infer import run_batched

    tokens = list(vocab.itos[2:])
    out = np.zeros((len(vocab), dim), dtype=np.float32)
    if not tokens:
        return out
    ids = _token_inputs(vocab, teacher, tokens)
    hidden = teacher.model.config.hidden_size
    index = {t: i for i, t in enumerate(tokens)}
    emb = run_batched(tokens, lambda ts: [ids[index[t]] for t in ts], teacher.embed, hidden,
                      batch_tokens=batch_tokens, device=teacher.device, pad_id=teacher.pad_id)
    vecs = pca(emb.astype(np.float64), min(dim, hidden, len(tokens)))
    counts = np.asarray(vocab.counts[2:], dtype=np.float64) if vocab.counts else np.ones(len(tokens))
    p = counts / max(counts.sum(), 1.0)
    vecs *= (sif / (sif + p))[:, None]
    norm = np.linalg.norm(vecs, axis=1).mean()
    if norm > 0:
        vecs *= np.sqrt(dim) / norm
    out[2:, : vecs.shape[1]] = vecs
    return out


def pca(x: np.ndarray, k: int) -> np.ndarray:
    """[N, k] projection of the centred rows of ``x`` on their top ``k`` principal axes, each axis signed so its
    largest loading is positive (eigenvectors have no sign of their own: this keeps the result reproducible)."""
    xc = x - x.mean(0)
    w, v = np.linalg.eigh(xc.T @ xc)  # [H, H]: cheap however many tokens there are
    top = v[:, np.argsort(w)[::-1][:k]]
    top *= np.sign(top[np.abs(top).argmax(0), np.arange(top.shape[1])])
    return xc @ top


def _token_inputs(vocab: Vocab, teacher, tokens: list[str]) -> list[list[int]]:
    tok = teacher.tokenizer
    lead, trail = teacher.special_ids()  # e.g. [CLS] ... [SEP], <s> ... </s>
    if vocab.unit == "subword":
        # The piece itself, between the specials: the tokenizer would re-split a piece's text differently.
        return [lead + [tok.convert_tokens_to_ids(t)] + trail for t in tokens]
    enc = tok(tokens, add_special_tokens=False, truncation=True, max_length=_MAX_TOKEN_PIECES,
              return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    return [lead + e + trail for e in enc]
