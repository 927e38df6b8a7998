"""Batching engine: token budget, length buckets, order, forced OOM splits (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimflow.tasks.teacher.infer import BatchStats, collate, plan_batches, run_batched


@pytest.mark.parametrize("n,budget", [(1, 8), (50, 64), (500, 256), (300, 1000)])
def test_plan_batches_budget_and_buckets(n, budget):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, 40, size=n).tolist()
    lengths[0] = 300  # over the budget on its own for small budgets: gets a batch of its own
    batches = plan_batches(lengths, budget)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(n))  # every row exactly once
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) * width <= budget or len(b) == 1
    # length buckets: batches are contiguous ranges of the sorted lengths
    for prev, nxt in zip(batches, batches[1:]):
        assert max(lengths[i] for i in prev) <= min(lengths[i] for i in nxt)


def test_plan_batches_rejects_bad_budget():
    with pytest.raises(ValueError, match="batch_tokens"):
        plan_batches([1, 2], 0)


def test_collate_pads_right():
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def _fake(texts):
    # one token per character (+2 specials); output = (token count, first id)
    def encode(batch):
        return [[1] + [ord(c) for c in t] + [2] for t in batch]

    def fn(ids, mask):
        return torch.stack([mask.sum(1).float(), ids[:, 1].float()], dim=1)

    return encode, fn


@pytest.mark.parametrize("window_rows", [7, 512])
def test_run_batched_keeps_input_order(window_rows):
    rng = np.random.default_rng(0)
    texts = ["x" * int(k) for k in rng.integers(0, 30, size=200)]
    encode, fn = _fake(texts)
    stats = BatchStats()
    out = run_batched(texts, encode, fn, 2, batch_tokens=64, device=torch.device("cpu"), pad_id=0,
                      window_rows=window_rows, stats=stats)
    assert out[:, 0].tolist() == [len(t) + 2 for t in texts]
    assert stats.rows == 200 and stats.oom_splits == 0
    assert all(r * w <= 64 or r == 1 for r, w in stats.batches)
    assert sum(r for r, _ in stats.batches) == 200
    assert 0 <= stats.pad_waste < 0.2


def test_run_batched_splits_on_oom_down_to_one_row():
    texts = [("ab" * k)[: k + 1] for k in range(40)]
    encode, fn = _fake(texts)
    plain = run_batched(texts, encode, fn, 2, batch_tokens=400, device=torch.device("cpu"), pad_id=0)
    stats = BatchStats()
    forced = run_batched(texts, encode, fn, 2, batch_tokens=400, device=torch.device("cpu"), pad_id=0,
                         oom=lambda rows, width: rows > 1, stats=stats)
    assert stats.oom_splits > 0
    assert all(r == 1 for r, _ in stats.batches)  # every forward that ran was a single row
    assert sum(r for r, _ in stats.batches) == len(texts)
    np.testing.assert_array_equal(plain, forced)


def test_run_batched_single_row_oom_is_a_clear_error():
    encode, fn = _fake(["abc"])
    with pytest.raises(RuntimeError, match="single row"):
        run_batched(["abc"], encode, fn, 2, batch_tokens=64, device=torch.device("cpu"), pad_id=0,
                    oom=lambda rows, width: True)


def test_run_batched_reraises_producer_and_model_errors():
    def bad_encode(batch):
        raise ValueError("tokenizer broke")

    _, fn = _fake([])
    with pytest.raises(ValueError, match="tokenizer broke"):
        run_batched(["a"] * 5, bad_encode, fn, 2, batch_tokens=64, device=torch.device("cpu"), pad_id=0)
    encode, _ = _fake([])

    def bad_fn(ids, mask):
        raise RuntimeError("shape mismatch")  # not an OOM: never split, never swallowed

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batched(["a"] * 5, encode, bad_fn, 2, batch_tokens=64, device=torch.device("cpu"), pad_id=0)


def test_run_batched_empty():
    encode, fn = _fake([])
    assert run_batched([], encode, fn, 3, batch_tokens=8, device=torch.device("cpu"), pad_id=0).shape == (0, 3)
