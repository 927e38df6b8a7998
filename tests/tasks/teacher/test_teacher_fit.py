"""Teacher fitting: metrics, heads on synthetic embeddings, embed_shard, fit_head -> label, fit: none, finetune."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from slimflow.storage.shards import read_shard, write_shard
from slimflow.tasks.teacher.fit import (
    EMBED,
    adopt_pretrained,
    embed_shard,
    evaluate_teacher,
    finetune_teacher,
    fit_head,
    fit_logreg,
    fit_mlp,
    map_labels,
    record_metrics,
)
from slimflow.tasks.teacher.label import label_shard
from slimflow.tasks.teacher.model import TeacherError, load_teacher
from teacher_fixtures import LABELS, build_seqcls_dir, random_texts, write_segment


def _blobs(n, d=16, k=3, seed=0, sep=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, size=n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y.astype(np.int64)


def test_logreg_and_mlp_heads_separate_blobs():
    x_all, y_all = _blobs(800)
    x, y, xd, yd = x_all[:600], y_all[:600], x_all[600:], y_all[600:]
    import torch

    with torch.no_grad():
        acc = (fit_logreg(x, y, 3, c=1.0)(torch.from_numpy(xd)).argmax(1).numpy() == yd).mean()
        assert acc > 0.95
        mlp = fit_mlp(x, y, xd, yd, 3, epochs=30, patience=5)
        assert (mlp(torch.from_numpy(xd)).argmax(1).numpy() == yd).mean() > 0.95


def _embed_shard(run_dir, x, y, split, names):
    n, d = x.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    t = pa.table({"id": [f"{split}{i}" for i in range(n)], "label": [names[i] for i in y],
                  "embedding": pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1), pa.float32()))})
    return write_shard(t, str(run_dir), "teacher/emb", split, 0, EMBED)


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_fit_head_on_separable_embeddings_then_label(tmp_path, tiny_model_dir, head):
    x, y = _blobs(500, d=32, k=2)  # the tiny encoder is 32-d
    refs = {s: _embed_shard(tmp_path, x[a:b], y[a:b], s, LABELS)
            for s, (a, b) in {"train": (0, 300), "dev": (300, 400), "test": (400, 500)}.items()}
    tdir = str(tmp_path / "teacher")
    meta = fit_head(str(tmp_path), [refs["train"]], [refs["dev"]], tdir, labels=LABELS, model=tiny_model_dir,
                    head=head, test_refs=[refs["test"]])
    assert meta["metrics"]["dev"]["accuracy"] > 0.95 and meta["metrics"]["test"]["accuracy"] > 0.95
    on_disk = json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    assert on_disk["kind"] == "head" and on_disk["labels"] == LABELS and on_disk["head"] == head
    assert len(on_disk["weights_hash"]) == 64
    # the fitted teacher labels real text end to end
    ref = write_segment(tmp_path, random_texts(20))
    out = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "original", tdir, "label/original", device="cpu"))
    assert out.num_rows == 20 and set(out.column("label_t").to_pylist()) <= set(LABELS)
    m = evaluate_teacher(str(tmp_path), [ref], tdir, device="cpu")
    assert 0 <= m["accuracy"] <= 1 and m["n"] == 20
    assert record_metrics(tdir, "test", m)["metrics"]["test"]["n"] == 20


def test_embed_shard_writes_unit_vectors(tmp_path, tiny_model_dir):
    texts = random_texts(30, seed=4)
    ref = write_segment(tmp_path, texts)
    out = embed_shard(str(tmp_path), ref, "teacher/embeddings", model=tiny_model_dir, device="cpu", dtype="fp32",
                      batch_tokens=64)
    t = read_shard(str(tmp_path), out)
    assert t.schema.equals(EMBED) and t.num_rows == 30
    x = np.asarray(t.column("embedding").to_pylist())
    assert x.shape == (30, 32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert t.column("id").to_pylist() == read_shard(str(tmp_path), ref).column("id").to_pylist()


def test_label_map_mismatch_lists_both_sides():
    with pytest.raises(TeacherError) as e:
        map_labels(["neg", "pos"], ["NEGATIVE", "POSITIVE"])
    msg = str(e.value)
    assert "['neg', 'pos']" in msg and "['NEGATIVE', 'POSITIVE']" in msg and "label_map" in msg
    assert map_labels(["neg", "pos"], ["POSITIVE", "NEGATIVE"], {"neg": "NEGATIVE", "pos": "POSITIVE"}) == [1, 0]
    assert map_labels(["Neg", "pos"], ["neg", "POS"]) == [0, 1]  # case-insensitive equal names
    with pytest.raises(TeacherError, match="not task labels"):
        map_labels(["neg", "pos"], ["neg", "pos"], {"neutral": "neg"})
    with pytest.raises(TeacherError, match="same model label"):
        map_labels(["neg", "pos"], ["neg", "pos"], {"pos": "neg"})


def test_adopt_pretrained_maps_and_reorders(tmp_path):
    model_dir = build_seqcls_dir(tmp_path / "m", id2label={0: "POSITIVE", 1: "NEGATIVE"})
    with pytest.raises(TeacherError, match="id2label"):
        adopt_pretrained(str(tmp_path / "t0"), labels=LABELS, model=model_dir)
    meta = adopt_pretrained(str(tmp_path / "t"), labels=LABELS, model=model_dir,
                            label_map={"neg": "NEGATIVE", "pos": "POSITIVE"})
    assert meta["label_index"] == [1, 0]
    teacher = load_teacher(str(tmp_path / "t"), device="cpu", dtype="fp32")
    import torch

    ids, mask = torch.tensor([[2, 5, 3]]), torch.ones(1, 3, dtype=torch.long)
    with torch.inference_mode():
        raw = teacher.model(input_ids=ids, attention_mask=mask).logits[0]
        ours = teacher.logits(ids, mask)[0]
    assert ours.tolist() == [raw[1].item(), raw[0].item()]
    with pytest.raises(TeacherError, match="no classifier"):
        adopt_pretrained(str(tmp_path / "t2"), labels=LABELS, model="default")


def test_finetune_keeps_best_and_saves(tmp_path, tiny_model_dir):
    pos, neg = ["good", "great", "nice"], ["bad", "awful", "poor"]
    rng = np.random.default_rng(0)
    texts = [f"the {rng.choice(pos if i % 2 else neg)} movie" for i in range(64)]
    labels = ["pos" if i % 2 else "neg" for i in range(64)]
    tr = write_segment(tmp_path, texts[:48], labels=labels[:48])
    dv = write_segment(tmp_path, texts[48:], split="dev", labels=labels[48:], rel="segment/dev")
    tdir = str(tmp_path / "teacher")
    meta = finetune_teacher(str(tmp_path), [tr], [dv], tdir, labels=LABELS, model=tiny_model_dir, epochs=3,
                            lr=1e-3, batch_size=8, patience=3, device="cpu", dtype="fp32", test_refs=[dv])
    assert meta["kind"] == "finetune" and len(meta["history"]) >= 1
    assert meta["metrics"]["dev"]["accuracy"] == max(h["accuracy"] for h in meta["history"])
    assert meta["metrics"]["dev"]["accuracy"] > 0.9
    assert (tmp_path / "teacher" / "encoder" / "model.safetensors").is_file()
    out = label_shard(str(tmp_path), dv, "original", tdir, "label/dev", device="cpu", dtype="fp32")
    assert out.rows == 16


def _tree(folder) -> dict:
    from pathlib import Path

    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_teacher_save_killed_midway_leaves_the_previous_teacher_whole(tmp_path, tiny_model_dir, monkeypatch):
    import os

    import slimflow.tasks.teacher.fit as fit
    from slimflow.storage.hashing import sha256_file

    texts = [f"the {w} movie" for w in ["good", "bad"] * 16]
    labels = ["pos", "neg"] * 16
    tr = write_segment(tmp_path, texts[:24], labels=labels[:24])
    dv = write_segment(tmp_path, texts[24:], split="dev", labels=labels[24:], rel="segment/dev")
    tdir = tmp_path / "teacher" / "model"
    kw = dict(labels=LABELS, model=tiny_model_dir, epochs=1, lr=1e-3, batch_size=8, device="cpu", dtype="fp32")
    meta = finetune_teacher(str(tmp_path), [tr], [dv], str(tdir), seed=0, **kw)
    # teacher.json, written last, records every file of the folder: the encoder's and the head
    assert "encoder/model.safetensors" in meta["files"] and "head.safetensors" in meta["files"]
    assert all(sha256_file(str(tdir / n)) == r["sha256"] for n, r in meta["files"].items())
    assert set(meta["files"]) == set(_tree(tdir)) - {"teacher.json"}
    before = _tree(tdir)

    # killed after the new encoder and head are written, before teacher.json (an exception stands in for it)
    def killed(folder, exclude=()):
        assert os.path.isfile(os.path.join(folder, "encoder", "model.safetensors"))
        raise RuntimeError("killed")

    monkeypatch.setattr(fit, "file_hashes", killed)
    with pytest.raises(RuntimeError, match="killed"):
        finetune_teacher(str(tmp_path), [tr], [dv], str(tdir), seed=1, **kw)
    monkeypatch.undo()
    # the killed run's last epoch checkpoint stays beside it for a rerun to resume from (issue 16)
    assert _tree(tdir) == before and sorted(os.listdir(tdir.parent)) == ["model", "model.checkpoint"]

    # what a SIGKILL at that point leaves: a half-built folder beside it; the rerun removes it and swaps in whole
    partial = tdir.parent / "model.incomplete-dead" / "encoder"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    assert load_teacher(str(tdir), device="cpu", dtype="fp32", reuse=False).weights_hash == meta["weights_hash"]
    again = finetune_teacher(str(tmp_path), [tr], [dv], str(tdir), seed=1, **kw)
    assert os.listdir(tdir.parent) == ["model"]
    assert json.loads((tdir / "teacher.json").read_text())["weights_hash"] == again["weights_hash"]
    assert all(sha256_file(str(tdir / n)) == r["sha256"] for n, r in again["files"].items())
    assert label_shard(str(tmp_path), dv, "original", str(tdir), "label/dev", device="cpu", dtype="fp32").rows == 8


def _sentiment_rows(tmp_path, n=64, dev=16):
    pos, neg = ["good", "great", "nice"], ["bad", "awful", "poor"]
    rng = np.random.default_rng(0)
    texts = [" ".join(["the", rng.choice(pos if i % 2 else neg)] + ["movie"] * int(rng.integers(1, 8)))
             for i in range(n)]
    labels = ["pos" if i % 2 else "neg" for i in range(n)]
    tr = write_segment(tmp_path, texts[: n - dev], labels=labels[: n - dev])
    dv = write_segment(tmp_path, texts[n - dev :], split="dev", labels=labels[n - dev :], rel="segment/dev")
    return tr, dv


def test_finetune_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, tiny_model_dir):
    """Stopped after epoch 2 of 3 (its checkpoint written), a rerun trains epoch 3 only and ends with the weights
    of a run never stopped (issue 16); the checkpoint goes once the teacher is saved."""
    tr, dv = _sentiment_rows(tmp_path)
    kw = dict(labels=LABELS, model=tiny_model_dir, epochs=3, lr=1e-3, batch_size=8, patience=3, device="cpu",
              dtype="fp32", progress=False)
    whole = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "whole"), **kw)
    assert not (tmp_path / "whole.checkpoint").exists()

    class Stop(Exception):
        pass

    def stop_after_2(epoch):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "resumed"), on_epoch=stop_after_2, **kw)
    assert (tmp_path / "resumed.checkpoint" / "checkpoint.pt").is_file() and not (tmp_path / "resumed").exists()
    ran = []
    resumed = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "resumed"), on_epoch=ran.append, **kw)
    assert ran == [3]
    assert resumed["weights_hash"] == whole["weights_hash"]
    strip = [{k: v for k, v in h.items() if k != "train_seconds"} for h in whole["history"]]
    assert [{k: v for k, v in h.items() if k != "train_seconds"} for h in resumed["history"]] == strip
    assert not (tmp_path / "resumed.checkpoint").exists()

    # a checkpoint of other settings (here the learning rate) is not resumed from
    with pytest.raises(Stop):
        finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "other"), on_epoch=stop_after_2, **kw)
    ran = []
    finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "other"), on_epoch=ran.append, **{**kw, "lr": 2e-3})
    assert ran == [1, 2, 3]


def test_finetune_on_cpu_freezes_the_embedding_table_by_default(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModel

    tr, dv = _sentiment_rows(tmp_path)
    kw = dict(labels=LABELS, model=tiny_model_dir, epochs=1, lr=1e-2, batch_size=8, device="cpu", dtype="fp32",
              progress=False)
    base = AutoModel.from_pretrained(tiny_model_dir).embeddings.word_embeddings.weight.detach()
    frozen = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "frozen"), **kw)
    trained = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "trained"), freeze_embeddings=False, **kw)
    assert frozen["params"]["freeze_embeddings"] and not trained["params"]["freeze_embeddings"]
    assert frozen["trainable_params"] == trained["trainable_params"] - base.numel()
    key = "embeddings.word_embeddings.weight"
    table = {n: load_file(str(tmp_path / n / "encoder" / "model.safetensors"))[key] for n in ("frozen", "trained")}
    assert torch_equal(table["frozen"], base) and not torch_equal(table["trained"], base)
    assert frozen["precision"] == {"requested": "fp32", "dtype": "fp32", "device": "cpu"}


def test_finetune_starts_its_head_from_the_linear_probe(tmp_path, tiny_model_dir):
    """head_init fit (LP-FT): the head fine-tuning starts from is fit: head's logistic regression on the frozen
    encoder's embeddings (C picked on dev); with a learning rate too small to move anything the saved head is that
    probe, and random init is not."""
    import slimflow.tasks.teacher.fit as fit
    import torch
    from safetensors.torch import load_file
    from slimflow.tasks.teacher.fit import embed_texts, fit_logreg_on_dev
    from slimflow.tasks.teacher.model import load_base_teacher

    tr, dv = _sentiment_rows(tmp_path)
    kw = dict(labels=LABELS, model=tiny_model_dir, epochs=1, lr=1e-30, batch_size=8, device="cpu", dtype="fp32",
              progress=False)
    fitted = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "fit"), **kw)
    rand = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "random"), head_init="random", **kw)
    assert fitted["params"]["head_init"] == "fit" and rand["linear_probe"] is None

    enc = load_base_teacher(tiny_model_dir, device="cpu", dtype="fp32")
    texts, y = fit._read_texts(str(tmp_path), [tr], LABELS)
    dev_texts, yd = fit._read_texts(str(tmp_path), [dv], LABELS)
    with torch.inference_mode():
        x, xd = embed_texts(enc, texts), embed_texts(enc, dev_texts)
    probe, m, c, _ = fit_logreg_on_dev(x, y, xd, yd, len(LABELS))
    assert fitted["linear_probe"]["C"] == c and fitted["linear_probe"]["accuracy"] == m["accuracy"]
    saved = {n: load_file(str(tmp_path / n / "head.safetensors")) for n in ("fit", "random")}
    for k, v in probe.state_dict().items():
        assert torch.allclose(saved["fit"][k], v, atol=1e-5), k
    assert not torch.allclose(saved["random"]["net.0.weight"], probe.state_dict()["net.0.weight"], atol=1e-3)
    with pytest.raises(TeacherError, match="head_init 'zeros' is not one of fit, random"):
        finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "bad"), head_init="zeros", **kw)


def test_finetune_freezes_the_bottom_layers_and_trains_the_rest(tmp_path, tiny_model_dir):
    """freeze_layers 1 of the tiny BERT's 2: the embeddings module and layer 0 come out as the base model's, layer 1
    and the head are trained; freezing every layer is refused with the most that can be."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    tr, dv = _sentiment_rows(tmp_path)
    kw = dict(labels=LABELS, model=tiny_model_dir, epochs=1, lr=1e-2, batch_size=8, device="cpu", dtype="fp32",
              progress=False)
    base = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    meta = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "one"), freeze_layers=1, **kw)
    none = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "none"), freeze_layers=0, **kw)
    saved = load_file(str(tmp_path / "one" / "encoder" / "model.safetensors"))
    below = [k for k in saved if k.startswith(("embeddings.", "encoder.layer.0."))]
    above = [k for k in saved if k.startswith("encoder.layer.1.") and k.endswith("weight")]
    assert below and above
    assert all(torch_equal(saved[k], base[k]) for k in below)
    assert not any(torch_equal(saved[k], base[k]) for k in above)
    assert meta["params"]["freeze_layers"] == 1 and none["params"]["freeze_layers"] == 0
    fixed = sum(v.numel() for k, v in base.items() if k.startswith(("embeddings.", "encoder.layer.0."))
                and "position_ids" not in k and "token_type_ids" not in k)
    word = base["embeddings.word_embeddings.weight"].numel()  # frozen in both (the CPU default)
    assert none["trainable_params"] - meta["trainable_params"] == fixed - word
    with pytest.raises(TeacherError, match="the teacher has 2 layers, so at most 1 can be frozen"):
        finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "all"), freeze_layers=2, **kw)


def test_the_linear_probe_reads_a_seeded_sample(tmp_path, tiny_model_dir):
    """probe_rows caps the rows the probe embeds (train and dev alike): the same sample on every run."""
    import slimflow.tasks.teacher.fit as fit

    tr, dv = _sentiment_rows(tmp_path, n=96, dev=32)
    seen = []
    real = fit.embed_texts
    kw = dict(labels=LABELS, model=tiny_model_dir, epochs=1, lr=1e-30, batch_size=8, device="cpu", dtype="fp32",
              progress=False, probe_rows=20)
    try:
        fit.embed_texts = lambda t, texts, **k: (seen.append(list(texts)), real(t, texts, **k))[1]
        a = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "a"), **kw)
        b = finetune_teacher(str(tmp_path), [tr], [dv], str(tmp_path / "b"), **kw)
    finally:
        fit.embed_texts = real
    texts, _ = fit._read_texts(str(tmp_path), [tr], LABELS)
    assert [len(x) for x in seen] == [20, 20, 20, 20] and seen[:2] == seen[2:]
    assert set(seen[0]) <= set(texts) and len(set(seen[0])) > 1
    assert a["linear_probe"]["rows"] == [20, 20] and a["linear_probe"]["C"] == b["linear_probe"]["C"]


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_length_buckets_pad_less_and_keep_every_row():
    import torch
    from slimflow.tasks.teacher.train_state import bucket_batches, random_batches

    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 120, size=1000).tolist()
    b = bucket_batches(lengths, 32, torch.Generator().manual_seed(0))
    r = random_batches(len(lengths), 32, torch.Generator().manual_seed(0))
    assert sorted(i for batch in b for i in batch) == list(range(1000)) and all(len(x) <= 32 for x in b)

    def waste(batches):
        padded = sum(len(x) * max(lengths[i] for i in x) for x in batches)
        return 1 - sum(lengths) / padded

    assert waste(b) < 0.05 < 0.3 < waste(r)
    assert b != bucket_batches(lengths, 32, torch.Generator().manual_seed(1))  # epochs differ
