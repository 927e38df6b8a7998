"""Batch-level retries in ``run_batched`` (issue 6): a flaky teacher still labels every row exactly once."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from slimflow.storage.shards import read_shard
from slimflow.tasks.teacher.fit import adopt_pretrained
from slimflow.tasks.teacher.infer import BatchStats, TransientTeacherError, is_transient, run_batched
from slimflow.tasks.teacher.label import label_shard
from teacher_fixtures import LABELS, random_texts, write_segment

CPU = torch.device("cpu")


def _flaky(rate: float, seed: int = 0):
    """A failure hook: each forward attempt fails with probability ``rate`` (seeded, so the test is exact)."""
    rng = random.Random(seed)
    calls: list[int] = []

    def fail(batch_index: int) -> bool:
        calls.append(batch_index)
        return rng.random() < rate

    return fail, calls


def _fake():
    def encode(batch):
        return [[1] + [ord(c) for c in t] + [2] for t in batch]

    def fn(ids, mask):
        return torch.stack([mask.sum(1).float(), ids[:, 1].float()], dim=1)

    return encode, fn


def test_twenty_percent_failing_batches_are_retried_to_exact_output():
    texts = ["y" * k for k in np.random.default_rng(1).integers(0, 30, size=300)]
    encode, fn = _fake()
    plain = run_batched(texts, encode, fn, 2, batch_tokens=64, device=CPU, pad_id=0)
    fail, calls = _flaky(0.2)
    stats = BatchStats()
    out = run_batched(texts, encode, fn, 2, batch_tokens=64, device=CPU, pad_id=0, fail=fail, retries=6,
                      retry_delay=0, stats=stats)
    n_batches = len(stats.batches)
    assert n_batches >= 20  # many batches: task-level retries alone would fail (0.8 ** n_batches)
    assert stats.retries == len(calls) - n_batches > 0  # every failed attempt was retried, none skipped
    np.testing.assert_array_equal(out, plain)  # every row exactly once, in input order


def test_a_batch_that_keeps_failing_propagates_after_the_retries():
    encode, fn = _fake()
    attempts = []

    def fail(batch_index):
        attempts.append(batch_index)
        return batch_index == 2

    with pytest.raises(TransientTeacherError, match="batch 2"):
        run_batched(["a" * k for k in range(1, 40)], encode, fn, 2, batch_tokens=32, device=CPU, pad_id=0,
                    fail=fail, retries=3, retry_delay=0)
    assert attempts.count(2) == 4  # 1 try + 3 retries, then the error surfaces (never swallowed)


@pytest.mark.parametrize("error", [TypeError("bad arg"), ValueError("bad shape"), KeyError("x"),
                                   NotImplementedError("op")])
def test_programming_errors_are_not_retried(error):
    encode, _ = _fake()
    calls = []

    def fn(ids, mask):
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        run_batched(["abc", "de"], encode, fn, 2, batch_tokens=64, device=CPU, pad_id=0, retries=5, retry_delay=0)
    assert len(calls) == 1 and not is_transient(error)


def test_transient_kinds():
    assert is_transient(RuntimeError("CUDA error: launch failure")) and is_transient(OSError(5, "I/O error"))
    assert is_transient(TransientTeacherError("503 from the teacher service"))
    assert not is_transient(RuntimeError("CUDA out of memory"))  # an OOM splits the batch instead
    # a shape mismatch (max_length beyond the model's positions) is deterministic: retrying only repeats it
    assert not is_transient(RuntimeError("The expanded size of the tensor (82) must match the existing size (64)"))


def test_real_fn_failures_are_retried():
    encode, fn = _fake()
    state = {"n": 0}

    def flaky_fn(ids, mask):
        state["n"] += 1
        if state["n"] % 3 == 1:
            raise OSError(104, "connection reset by peer")
        return fn(ids, mask)

    texts = ["z" * k for k in range(1, 30)]
    stats = BatchStats()
    out = run_batched(texts, encode, flaky_fn, 2, batch_tokens=32, device=CPU, pad_id=0, retry_delay=0,
                      stats=stats)
    np.testing.assert_array_equal(out, run_batched(texts, encode, fn, 2, batch_tokens=32, device=CPU, pad_id=0))
    assert stats.retries > 0


def test_label_shard_with_a_flaky_teacher_keeps_every_row_once(tmp_path, tiny_model_dir):
    teacher_dir = str(tmp_path / "teacher")
    adopt_pretrained(teacher_dir, labels=LABELS, model=tiny_model_dir)
    texts = random_texts(120, seed=5)
    ref = write_segment(tmp_path, texts)
    kw = dict(batch_tokens=96, device="cpu", dtype="fp32")
    plain = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "original", teacher_dir, "label/a", **kw))
    fail, calls = _flaky(0.2, seed=3)
    stats = []
    flaky = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "original", teacher_dir, "label/b", **kw,
                                                  fail=fail, retries=6, retry_delay=0, on_stats=stats.append))
    assert len(stats[0].batches) >= 10 and stats[0].retries > 0
    ids = flaky.column("id").to_pylist()
    assert ids == plain.column("id").to_pylist() == read_shard(str(tmp_path), ref).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120
    np.testing.assert_allclose(np.asarray(flaky.column("logits").to_pylist()),
                               np.asarray(plain.column("logits").to_pylist()), atol=1e-6)
