"""Metrics (accuracy, macro-F1, multi-class MCC) in numpy, a throughput harness, model size.

Used for the teacher and the students alike, so the report compares like with like.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape} vs {p.shape}")
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if t.size else 0.0


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1; a class never true nor predicted scores 0 (sklearn's zero_division=0)."""
    m = confusion(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(m)
    denom = m.sum(0) + m.sum(1)  # (tp + fp) + (tp + fn)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def mcc(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> float:
    """Matthews correlation, multi-class (Gorodkin 2004, R_K):
    (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)); 0 when a factor is 0."""
    m = confusion(y_true, y_pred, num_classes).astype(np.float64)
    t_k, p_k = m.sum(1), m.sum(0)
    c, s = np.trace(m), m.sum()
    denom = np.sqrt((s * s - p_k @ p_k) * (s * s - t_k @ t_k))
    return float((c * s - t_k @ p_k) / denom) if denom > 0 else 0.0


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict[str, float]:
    return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred, num_classes),
            "mcc": mcc(y_true, y_pred, num_classes), "n": int(np.asarray(y_true).size)}


def measure_throughput(predict_fn: Callable[[list[str]], object], texts: Sequence[str], batch_size: int, *,
                       warmup_batches: int = 3, min_seconds: float = 0.0, max_passes: int = 50) -> dict:
    """Texts/s of ``predict_fn(list of raw texts)`` over ``texts`` in batches of ``batch_size``.

    ``predict_fn`` takes raw text, so tokenisation is inside the timing. Warm-up batches run first (lazy
    loads, allocator, onnxruntime's first-run graph work); then whole passes over ``texts`` until
    ``min_seconds`` have elapsed (at least one pass, at most ``max_passes``).
    """
    texts = list(texts)
    if not texts or batch_size < 1:
        raise ValueError(f"need texts and batch_size >= 1, got {len(texts)} texts, batch_size {batch_size}")
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    for b in batches[:warmup_batches]:
        predict_fn(b)
    n, passes = 0, 0
    start = time.perf_counter()
    while True:
        for b in batches:
            predict_fn(b)
        n += len(texts)
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or passes >= max_passes:
            break
    return {"texts_per_s": n / elapsed, "batch_size": batch_size, "texts": n, "seconds": elapsed,
            "ms_per_batch": 1000 * elapsed / (passes * len(batches))}


def count_params(model) -> int:
    """Parameters of a torch module (counted once even when shared)."""
    return sum(p.numel() for p in model.parameters())


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
