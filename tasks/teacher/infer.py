"""Batched teacher inference over one shard's texts: length buckets, a token budget, overlap, OOM splits.

How a shard runs (``run_batched``):

1. Rows are ordered by character length and cut into windows of ``window_rows``.
2. A background thread tokenises one window at a time, sorts it by true token length and cuts it into
   batches of at most ``batch_tokens`` = rows x padded length (one over-long row alone may exceed it: it is
   already truncated to ``max_length``). It pads them (pinned memory on CUDA) into a queue of two, so
   tokenising and padding the next batches overlaps the model's forward pass on the current one.
3. The main thread copies each batch to the device (``non_blocking`` from pinned memory), runs it under
   ``torch.inference_mode`` and scatters the float32 outputs back to the rows' input positions.
4. An out-of-memory error splits the batch in half and retries each half (down to one row), logging it.
5. A transient failure (``is_transient``: ``TransientTeacherError``, ``OSError`` -- connection resets and
   timeouts included -- or a device fault: a ``RuntimeError`` naming CUDA / cuDNN / cuBLAS / NCCL / HIP / MPS)
   retries the same batch up to ``retries`` times with exponential backoff, then propagates.
   Task-level retries alone cannot carry a shard of many batches through a flaky teacher: with a 20 % batch
   failure rate, all of 10 batches succeed only 0.8**10 = 11 % of the time per attempt (issue 6).
   Programming and configuration errors propagate at once: retrying them only repeats them (``TypeError``,
   ``ValueError``, ``KeyError``, ``IndexError``, ``AssertionError``, and other ``RuntimeError`` s such as a
   shape mismatch from a ``max_length`` beyond the model's positions).

Sorting by length keeps padding small (bench/label.py reports the waste); the budget keeps activation
memory flat whatever the lengths, so one setting fits short tweets and long reviews.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

OomHook = Callable[[int, int], bool]  # (rows, padded_len) -> True to simulate an out-of-memory error
FailHook = Callable[[int], bool]  # (batch_index) -> True to simulate a transient failure of that attempt

# A remote or flaky teacher (a network blip, a pre-empted device) recovers within a second or two; three
# retries at 0.5 s, 1 s, 2 s bound the wait on a truly broken batch to ~3.5 s before the error surfaces.
BATCH_RETRIES = 3
RETRY_DELAY_S = 0.5


class TransientTeacherError(RuntimeError):
    """A teacher forward that may succeed when retried (raise it from a custom ``fn`` to ask for a retry)."""


def is_transient(e: BaseException) -> bool:
    """Whether a failed forward is worth retrying as is: not an OOM (that splits) nor a programming error."""
    if is_oom(e):
        return False
    if isinstance(e, TransientTeacherError | OSError):
        return True
    return type(e) is RuntimeError and _DEVICE_FAULT.search(str(e)) is not None


# torch reports device faults (a lost GPU, an NCCL timeout, a driver hiccup) as a plain RuntimeError.
_DEVICE_FAULT = re.compile(r"CUDA error|cuDNN|CUBLAS|cuBLAS|NCCL|HIP error|MPS backend|device-side", re.IGNORECASE)


@dataclass
class BatchStats:
    """What a run did: the forward passes, padding, OOM splits. Filled in by ``run_batched``."""

    rows: int = 0
    batches: list[tuple[int, int]] = field(default_factory=list)  # (rows, padded_len) per forward that ran
    real_tokens: int = 0
    padded_tokens: int = 0
    oom_splits: int = 0
    retries: int = 0  # failed forward attempts that were retried
    seconds: float = 0.0

    @property
    def pad_waste(self) -> float:
        """Share of the tokens fed to the model that were padding."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_waste: float = 0.1) -> list[list[int]]:
    """Indices grouped into batches: sorted by length (stable), each with rows x max length <= budget.

    A batch also closes early once it holds a quarter of the budget and the next row would push its
    padding above ``max_waste``: big batches spanning a wide length range waste more than they gain.
    A row longer than the budget gets a batch of its own.
    """
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be > 0, got {batch_tokens}")
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = cur_sum = 0
    for i in order.tolist():
        n = int(lengths[i])
        new_max = max(cur_max, n)
        if cur:
            padded = (len(cur) + 1) * new_max
            wasteful = len(cur) * cur_max * 4 >= batch_tokens and 1 - (cur_sum + n) / padded > max_waste
            if padded > batch_tokens or wasteful:
                batches.append(cur)
                cur, cur_sum, new_max = [], 0, n
        cur.append(i)
        cur_max, cur_sum = new_max, cur_sum + n
    if cur:
        batches.append(cur)
    return batches


def collate(seqs: Sequence[Sequence[int]], pad_id: int, pin: bool = False):
    """Right-padded ``input_ids`` and ``attention_mask`` (int64 tensors), pinned when ``pin``."""
    import torch

    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    if pin:
        ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
    return ids_t, mask_t


def is_oom(e: BaseException) -> bool:
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(e, oom_type)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e)
    )


class _Producer(threading.Thread):
    """Tokenises and pads batches ahead of the model; a bounded queue keeps it one or two batches ahead."""

    def __init__(self, texts, encode, order, window_rows, batch_tokens, pad_id, pin, depth=2):
        super().__init__(name="teacher-batches", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.args = (texts, encode, order, window_rows, batch_tokens, pad_id, pin)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        texts, encode, order, window_rows, batch_tokens, pad_id, pin = self.args
        try:
            for start in range(0, len(order), window_rows):
                window = order[start : start + window_rows]
                ids = encode([texts[i] for i in window])
                for b in plan_batches([len(s) for s in ids], batch_tokens):
                    rows = np.asarray([window[j] for j in b], dtype=np.int64)
                    input_ids, mask = collate([ids[j] for j in b], pad_id, pin)
                    if not self._put((rows, input_ids, mask)):
                        return
            self._put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)


def run_batched(texts: Sequence[str], encode: Callable[[list[str]], list[list[int]]],
                fn: Callable, out_dim: int, *, batch_tokens: int, device, pad_id: int,
                window_rows: int = 512, pin: bool | None = None, oom: OomHook | None = None,
                fail: FailHook | None = None, retries: int = BATCH_RETRIES, retry_delay: float = RETRY_DELAY_S,
                stats: BatchStats | None = None) -> np.ndarray:
    """``fn(input_ids, attention_mask) -> [B, out_dim]`` over all ``texts``; float32 rows in input order.

    ``encode`` turns texts into token id lists. ``oom`` lets a test force out-of-memory errors; ``fail`` forces
    transient failures (``TransientTeacherError``), retried like real ones: up to ``retries`` times per batch,
    ``retry_delay`` seconds doubling each time, then the last error propagates.
    """
    if retries < 0 or retry_delay < 0:
        raise ValueError(f"retries and retry_delay must be >= 0, got {retries} and {retry_delay}")
    retry = _Retry(fail, retries, retry_delay)

    stats = stats if stats is not None else BatchStats()
    n = len(texts)
    out = np.zeros((n, out_dim), dtype=np.float32)
    done = np.zeros(n, dtype=bool)
    if n == 0:
        return out
    pin = device.type == "cuda" if pin is None else pin
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=n), kind="stable").tolist()
    t0 = time.perf_counter()
    producer = _Producer(texts, encode, order, window_rows, batch_tokens, pad_id, pin)
    producer.start()
    try:
        batch_index = 0
        while True:
            item = producer.q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            rows, input_ids, mask = item
            y = _forward_split(fn, input_ids, mask, device, oom, stats, retry, batch_index)
            batch_index += 1
            if done[rows].any():
                raise AssertionError("a row was scheduled twice")
            out[rows] = y
            done[rows] = True
            stats.real_tokens += int(mask.sum())
    finally:
        producer.stop.set()
        producer.join(timeout=5)
    if not done.all():
        raise AssertionError(f"{int((~done).sum())} rows were never run")
    stats.rows += n
    stats.seconds += time.perf_counter() - t0
    return out


@dataclass(frozen=True)
class _Retry:
    fail: FailHook | None
    retries: int
    delay: float


def _forward(fn, input_ids, mask, device, oom: OomHook | None, stats: BatchStats, retry: _Retry,
             batch_index: int) -> np.ndarray:
    """One batch's forward, retried on transient errors; OOM and programming errors propagate at once."""
    import torch

    rows, width = input_ids.shape
    for attempt in range(retry.retries + 1):
        try:
            if oom is not None and oom(rows, width):
                raise RuntimeError(f"out of memory (injected for a batch of {rows} x {width})")
            if retry.fail is not None and retry.fail(batch_index):
                raise TransientTeacherError(f"teacher failure (injected for batch {batch_index})")
            x = input_ids.to(device, non_blocking=True)
            m = mask.to(device, non_blocking=True)
            with torch.inference_mode():
                return fn(x, m).float().cpu().numpy()
        except Exception as e:
            if attempt == retry.retries or not is_transient(e):
                raise
            stats.retries += 1
            wait = retry.delay * 2**attempt
            log.warning("teacher batch %d (%d x %d) failed (%s: %s); retry %d of %d in %.1f s", batch_index, rows,
                        width, type(e).__name__, e, attempt + 1, retry.retries, wait)
            if wait:
                time.sleep(wait)  # backoff for a flaky device or service, not synchronisation
    raise AssertionError("unreachable")


def _forward_split(fn, input_ids, mask, device, oom: OomHook | None, stats: BatchStats, retry: _Retry,
                   batch_index: int) -> np.ndarray:
    import torch

    rows, width = input_ids.shape
    try:
        y = _forward(fn, input_ids, mask, device, oom, stats, retry, batch_index)
    except Exception as e:
        if not is_oom(e):
            raise
        if rows == 1:
            raise RuntimeError(
                f"teacher ran out of memory on a single row of {width} tokens; lower teacher.max_length, "
                "use dtype bf16/fp16 or a smaller teacher"
            ) from e
        stats.oom_splits += 1
        log.warning("teacher out of memory on a batch of %d x %d tokens: splitting it in half", rows, width)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = rows // 2
        parts = []
        for sl in (slice(0, half), slice(half, rows)):
            m_part = mask[sl]
            w = int(m_part.sum(1).max())  # the half may need less padding than the whole
            parts.append(_forward_split(fn, input_ids[sl, :w], m_part[:, :w], device, oom, stats, retry,
                                        batch_index))
        return np.concatenate(parts)
    stats.batches.append((rows, width))
    stats.padded_tokens += rows * width
    return y
