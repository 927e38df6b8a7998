"""label_shard end to end on a tiny random BERT: schema, order, mask mapping, budget, forced OOM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimflow.storage.schema import LABELLED, MASK_PLACEHOLDER
from slimflow.storage.shards import ShardRef, read_shard
from slimflow.tasks.teacher.fit import adopt_pretrained
from slimflow.tasks.teacher.label import assign_devices, label_shard
from slimflow.tasks.teacher.model import load_teacher
from teacher_fixtures import LABELS, random_texts, write_augment, write_segment


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("teacher"))
    adopt_pretrained(d, labels=LABELS, model=tiny_model_dir)
    return d


def _direct_logits(model_dir, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return np.stack([model(**tok(t, return_tensors="pt")).logits[0].numpy() for t in texts])


def test_label_original_shard(tmp_path, teacher_dir, tiny_model_dir):
    texts = random_texts(60, seed=1)
    ref = write_segment(tmp_path, texts)
    stats = []
    out_ref = label_shard(str(tmp_path), ref, "original", teacher_dir, "label/original", batch_tokens=128,
                          device="cpu", dtype="fp32", on_stats=stats.append)
    assert out_ref.rows == 60 and out_ref.split == ref.split and out_ref.index == ref.index
    assert ref.sha256 in out_ref.inputs
    t = read_shard(str(tmp_path), out_ref)
    assert t.schema.equals(LABELLED)
    src = read_shard(str(tmp_path), ref)
    assert t.column("id").to_pylist() == src.column("id").to_pylist()  # input order, each row once
    assert t.column("source_id").to_pylist() == src.column("id").to_pylist()
    assert t.column("text_t").to_pylist() == texts
    assert set(t.column("kind").to_pylist()) == {"original"}
    logits = np.asarray(t.column("logits").to_pylist())
    probs = np.asarray(t.column("probs").to_pylist())
    np.testing.assert_allclose(logits, _direct_logits(tiny_model_dir, texts), atol=1e-4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert t.column("label_t").to_pylist() == [LABELS[i] for i in logits.argmax(1)]
    np.testing.assert_allclose(t.column("confidence").to_numpy(), probs.max(1), atol=1e-6)
    (s,) = stats
    assert all(r * w <= 128 or r == 1 for r, w in s.batches)  # token budget
    assert sum(r for r, _ in s.batches) == 60


def test_forced_oom_splits_and_matches(tmp_path, teacher_dir):
    texts = random_texts(40, seed=2)
    ref = write_segment(tmp_path, texts)
    plain = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "original", teacher_dir, "label/a",
                                                  batch_tokens=512, device="cpu", dtype="fp32"))
    stats = []
    forced = read_shard(str(tmp_path), label_shard(
        str(tmp_path), ref, "original", teacher_dir, "label/b", batch_tokens=512, device="cpu", dtype="fp32",
        oom=lambda rows, width: rows > 3, on_stats=stats.append))
    assert stats[0].oom_splits > 0
    assert max(r for r, _ in stats[0].batches) <= 3
    assert forced.column("id").to_pylist() == plain.column("id").to_pylist()
    np.testing.assert_allclose(np.asarray(forced.column("logits").to_pylist()),
                               np.asarray(plain.column("logits").to_pylist()), atol=1e-5)
    assert forced.column("label_t").to_pylist() == plain.column("label_t").to_pylist()


def test_augmented_rows_see_the_mask_token(tmp_path, teacher_dir):
    teacher = load_teacher(teacher_dir, device="cpu", dtype="fp32")
    mask_id = teacher.tokenizer.mask_token_id
    (ids,) = teacher.encode([f"good {MASK_PLACEHOLDER} movie"])
    assert ids[2] == mask_id and ids.count(mask_id) == 1
    texts = [f"the {MASK_PLACEHOLDER} movie", "very good", f"{MASK_PLACEHOLDER} {MASK_PLACEHOLDER} food"]
    ref = write_augment(tmp_path, texts)
    t = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "augmented", teacher_dir, "label/augmented",
                                              device="cpu", dtype="fp32"))
    assert t.column("source_id").to_pylist() == ["s0000", "s0001", "s0002"]
    assert t.column("id").to_pylist() == ["s0000-a00", "s0001-a00", "s0002-a00"]
    assert t.column("text_t").to_pylist() == texts
    assert set(t.column("kind").to_pylist()) == {"augmented"}


def test_unlabelled_and_empty_shards(tmp_path, teacher_dir):
    ref = write_segment(tmp_path, ["good movie", "bad book"], split="unlabelled", labels=[None, None],
                        rel="segment/unlabelled")
    t = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "unlabelled", teacher_dir, "label/unlabelled",
                                              device="cpu", dtype="fp32"))
    assert t.column("label").to_pylist() == [None, None] and t.num_rows == 2
    empty = write_segment(tmp_path, [], index=1)
    assert label_shard(str(tmp_path), empty, "original", teacher_dir, "label/e", device="cpu").rows == 0


def test_bf16_labels_agree_with_fp32(tmp_path, teacher_dir):
    texts = random_texts(50, seed=3)
    ref = write_segment(tmp_path, texts)
    a = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "original", teacher_dir, "label/a",
                                              device="cpu", dtype="fp32"))
    b = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "original", teacher_dir, "label/b",
                                              device="cpu", dtype="bf16"))
    np.testing.assert_allclose(np.asarray(a.column("logits").to_pylist()), np.asarray(b.column("logits").to_pylist()),
                               atol=0.1)


def test_wrong_kind_is_a_clear_error(tmp_path, teacher_dir):
    ref = write_segment(tmp_path, ["good"])
    with pytest.raises(ValueError, match="text_t"):
        label_shard(str(tmp_path), ref, "augmented", teacher_dir, "label/x", device="cpu")


def test_resident_teachers_one_per_device_are_not_reloaded_between_shards(tmp_path, teacher_dir, monkeypatch):
    """Two labelling "devices" (CPU standing in for cuda:0 and cuda:1, as assign_devices plans them) take shards
    in turn: each keeps its own teacher, so each loads once however the shards interleave (issue 16)."""
    from slimflow.tasks.teacher import model

    real_resolve, real_load = model.resolve_device, model._load_teacher
    monkeypatch.setattr(model, "resolve_device", lambda d: torch.device("cpu") if d.startswith("cuda") else
                        real_resolve(d))
    loads = []
    monkeypatch.setattr(model, "_load_teacher", lambda *a: loads.append(a[2]) or real_load(*a))
    model.release_teachers()
    refs = [write_segment(tmp_path, random_texts(10, seed=i), index=i) for i in range(6)]
    plan = assign_devices(refs, ["cuda:0", "cuda:1"])
    order = [(d, r) for pair in zip(plan["cuda:0"], plan["cuda:1"], strict=True) for d, r in zip(("cuda:0", "cuda:1"),
                                                                                                  pair, strict=True)]
    outs = [label_shard(str(tmp_path), r, "original", teacher_dir, f"label/{d[-1]}", device=d, dtype="fp32")
            for d, r in order]
    assert sorted(loads) == ["cuda:0", "cuda:1"]  # one load per device, none between shards
    assert [o.rows for o in outs] == [10] * 6
    a = model.load_teacher(teacher_dir, device="cuda:0", dtype="fp32")
    assert a is not model.load_teacher(teacher_dir, device="cuda:1", dtype="fp32") and len(loads) == 2
    # a new setting on one device replaces that device's teacher only
    model.load_teacher(teacher_dir, device="cuda:1", dtype="bf16")
    assert loads == ["cuda:0", "cuda:1", "cuda:1"] and model.load_teacher(teacher_dir, device="cuda:0",
                                                                          dtype="fp32") is a
    model.release_teachers()


def test_assign_devices_round_robin():
    refs = [ShardRef("train", i, f"p{i}", 1, 1, "h") for i in range(5)]
    plan = assign_devices(refs[::-1], ["cuda:0", "cuda:1"])
    assert [r.index for r in plan["cuda:0"]] == [0, 2, 4] and [r.index for r in plan["cuda:1"]] == [1, 3]
