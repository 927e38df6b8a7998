"""Static token vectors distilled from a (tiny, random, built-here) teacher: student.init: teacher."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "teacher"))
from slimflow.storage.schema import LABELLED, SEGMENT  # noqa: E402
from slimflow.storage.shards import write_shard  # noqa: E402
from slimflow.tasks.students.static import pca, static_vectors  # noqa: E402
from slimflow.tasks.students.vocab import Vocab, build_vocab_from_shards  # noqa: E402
from teacher_fixtures import WORDS, build_seqcls_dir  # noqa: E402

LABELS = ["neg", "pos"]
POS, NEG = ["good", "great", "nice", "fine"], ["bad", "awful", "poor", "sad"]
FILL = [w for w in WORDS if w not in POS + NEG]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from slimflow.tasks.teacher.model import load_base_teacher

    path = build_seqcls_dir(tmp_path_factory.mktemp("tiny") / "bert", seed=1)
    return load_base_teacher(path, device="cpu", dtype="fp32", threads=1)


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(rng.integers(2))
        words = list(rng.choice(FILL, size=int(rng.integers(2, 8)))) + [str(rng.choice(POS if y else NEG))]
        rng.shuffle(words)
        out.append((f"r{seed}-{i:04d}", " ".join(words), LABELS[y]))
    return out


def _shards(run_dir):
    import pyarrow as pa

    train, dev = _rows(120, 0), _rows(60, 1)
    lab = pa.table({
        "id": [r[0] for r in train], "source_id": [r[0] for r in train], "kind": ["original"] * len(train),
        "text_t": [r[1] for r in train], "words": [r[1].split() for r in train], "label": [r[2] for r in train],
        "logits": [[-1.0, 1.0] if r[2] == "pos" else [1.0, -1.0] for r in train],
        "probs": [[0.1, 0.9] if r[2] == "pos" else [0.9, 0.1] for r in train],
        "label_t": [r[2] for r in train], "confidence": [0.9] * len(train),
    })
    seg = pa.table({
        "id": [r[0] for r in dev], "text": [r[1] for r in dev], "label": [r[2] for r in dev],
        "source_file": ["d.csv"] * len(dev), "source_row": list(range(1, len(dev) + 1)),
        "words": [r[1].split() for r in dev], "pos": [["x"] * len(r[1].split()) for r in dev],
        "ws": [[True] * len(r[1].split()) for r in dev],
    })
    return ([write_shard(lab, run_dir, "label/original", "original", 0, LABELLED)],
            [write_shard(seg, run_dir, "segment/dev", "dev", 0, SEGMENT)])


@pytest.mark.parametrize("unit", ["words", "chars"])
def test_static_vectors_are_deterministic_pca_of_the_teacher_sif_weighted(encoder, unit):
    vocab = Vocab.from_texts([" ".join(WORDS)] * 3 + ["good good good"], unit=unit, lang="en", lowercase=True)
    a = static_vectors(vocab, encoder, 8)
    b = static_vectors(vocab, encoder, 8)
    assert a.dtype == np.float32 and a.shape == (len(vocab), 8)
    assert np.array_equal(a, b)  # the same vocabulary and teacher: the same table
    assert not a[:2].any()  # [PAD], [UNK]
    assert np.linalg.norm(a[2:], axis=1).mean() == pytest.approx(np.sqrt(8), rel=1e-4)
    # SIF: the most frequent token is shrunk against the rarest, relative to their unweighted PCA norms.
    raw = pca(_teacher_vectors(vocab, encoder), 8)
    ratio = np.linalg.norm(a[2:], axis=1) / np.linalg.norm(raw, axis=1)
    counts = np.asarray(vocab.counts[2:])
    assert ratio[counts.argmax()] < ratio[counts.argmin()]


def _teacher_vectors(vocab, encoder):
    # The same teacher reading, done here one token at a time with the plain forward pass.
    tok = encoder.tokenizer
    rows = []
    with torch.inference_mode():
        for t in vocab.itos[2:]:
            ids = tok(t, add_special_tokens=True)["input_ids"]
            x = torch.tensor([ids])
            rows.append(encoder.embed(x, torch.ones_like(x)).numpy()[0])
    return np.asarray(rows, dtype=np.float64)


def test_pca_matches_numpy_svd_up_to_sign():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    got = pca(x, 3)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    want = u[:, :3] * s[:3]
    assert np.allclose(np.abs(got), np.abs(want), atol=1e-8)


def test_teacher_init_is_used_and_changes_the_first_epoch(encoder, tmp_path):
    from slimflow.tasks.students.train import train_student

    run_dir = str(tmp_path / "run")
    train, dev = _shards(run_dir)
    vocab = build_vocab_from_shards(run_dir, train, unit="words", lang="en", lowercase=True)
    vecs = static_vectors(vocab, encoder, 16)
    args = dict(kind="bow", mode="distilled", train_refs=train, dev_refs=dev, vocab=vocab, labels=LABELS,
                embed_dim=16, hidden=8, epochs=1, batch_size=16, seed=0, threads=1)
    rand = train_student(run_dir, out_dir=str(tmp_path / "random"), **args)
    init = train_student(run_dir, out_dir=str(tmp_path / "teacher"), init_vectors=vecs, **args)
    assert init["params"]["init"].startswith("vectors:") and rand["params"]["init"] == "random"
    assert rand["history"][0]["dev_accuracy"] != init["history"][0]["dev_accuracy"]
    # The trained table moved a little from the vectors it started at (one epoch of Adam at 1e-3).
    w = torch.load(tmp_path / "teacher" / "best.pt", weights_only=True)["model"]["embed.weight"].numpy()
    assert np.corrcoef(w[2:].ravel(), vecs[2:].ravel())[0, 1] > 0.9 and not np.array_equal(w, vecs)
    with pytest.raises(ValueError, match="init_vectors has shape"):
        train_student(run_dir, out_dir=str(tmp_path / "bad"), init_vectors=vecs[:, :4], **args)
