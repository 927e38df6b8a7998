"""Segment + augment speed: slimflow's stages vs the seeds' per-row loop, against jieba's own floor.

Same 5,000 zh review rows, n_iter=10, one process on one core:
  (a) jieba.lcut over every row once: the segmentation floor;
  (b) slimflow's segment + augment stage functions over 2,000-row Parquet shards (real stage code, I/O in);
  (c) the seeds' way (seed 002's apply_data_augmentation): jieba.posseg.cut per row, then a Python loop per
      word per copy doing mask / same-POS / n-gram.
Then (b) on both cores, POS agreement of (b) with jieba.posseg.cut per character, and peak RSS of (b) at 1x
and 4x the data (in fresh subprocesses).  Run: .venv/bin/python bench/augment.py
"""

from __future__ import annotations

import bisect
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from slimflow.storage.schema import INGEST  # noqa: E402
from slimflow.storage.shards import read_shard, write_shard  # noqa: E402
from slimflow.tasks.augment import AugmentParams, augment_shard, build_pos_table  # noqa: E402
from slimflow.tasks.datasets import load_rows  # noqa: E402
from slimflow.tasks.ingest import normalise_text, row_id  # noqa: E402
from slimflow.tasks.segment import segment_shard  # noqa: E402

from bench._common import cores, goal, print_goals, timer, write_results  # noqa: E402

N_ROWS = 5000
N_ITER = 10
SHARD_ROWS = 1250  # 4 shards: an even split over 2 processes


def texts(n: int) -> list[str]:
    rows = load_rows("zh-reviews")
    perm = np.random.default_rng(0).permutation(len(rows))
    out = [normalise_text(rows[i][0]) for i in perm]
    while len(out) < n:  # 4x the data for the memory check: repeat with a suffix so rows stay distinct
        out += [t + f" #{len(out) + i}" for i, t in enumerate(out[: n - len(out)])]
    return out[:n]


def _segment_one(run: str, ref):
    return segment_shard(run, ref, "zh", 1)


def _augment_one(run: str, ref, table: dict):
    return augment_shard(run, ref, table, AugmentParams(n_iter=N_ITER))


def slimflow_stages(run: str, rows: list[str], workers: int, pool=None) -> tuple[int, list]:
    """(b): ingest-shaped shards -> segment_shard -> build_pos_table -> augment_shard, as the flow runs them.

    With a process ``pool``, shards are spread over its processes, as `runner: {kind: process}` (Prefect's
    process pool task runner) or Dask workers run them.
    """
    refs = []
    for i, start in enumerate(range(0, len(rows), SHARD_ROWS)):
        chunk = rows[start : start + SHARD_ROWS]
        t = pa.table({"id": [row_id(x) for x in chunk], "text": chunk, "label": ["pos"] * len(chunk),
                      "source_file": ["bench"] * len(chunk), "source_row": list(range(1, len(chunk) + 1))})
        refs.append(write_shard(t, run, "ingest/train", "train", i, INGEST))
    if pool is None:
        seg = [_segment_one(run, r) for r in refs]
        table = build_pos_table(run, seg, min_count=2)
        aug = [_augment_one(run, r, table) for r in seg]
    else:
        seg = list(pool.map(_segment_one, [run] * len(refs), refs))
        table = build_pos_table(run, seg, min_count=2)
        aug = list(pool.map(_augment_one, [run] * len(seg), seg, [table] * len(seg)))
    return sum(a.rows for a in aug), seg
def seeds_way(rows: list[str]) -> int:
    """(c): per-row posseg, then per-word per-copy Python, as seed 002 (plus Tang et al.'s same-POS step)."""
    import jieba.posseg as pseg

    tagged = [[(p.word, p.flag) for p in pseg.cut(t)] for t in rows]
    counts = Counter(pair for row in tagged for pair in row)
    table: dict[str, tuple[list[str], list[int]]] = {}
    for (w, f), c in counts.items():
        if c >= 2:
            words, cum = table.setdefault(f, ([], []))
            words.append(w)
            cum.append((cum[-1] if cum else 0) + c)
    rng = np.random.default_rng(2021)
    rand = random.Random(2021)
    out = set()
    for row in tagged:
        original = "".join(w for w, _ in row)
        for _ in range(N_ITER):
            words = []
            for w, f in row:
                u = rng.random()
                if u < 0.1:
                    words.append("[UNK]")
                elif u < 0.2 and f in table:
                    cand, cum = table[f]
                    words.append(cand[bisect.bisect_right(cum, rand.random() * cum[-1]) % len(cand)])
                else:
                    words.append(w)
            if rng.random() < 0.25:
                n = int(rng.integers(1, 6))
                n = min(n, len(words))
                s = int(rng.integers(0, len(words) - n + 1))
                words = words[s : s + n]
            text = "".join(words)
            if text != original:
                out.add(text)
    return len(out)


def pos_agreement(rows: list[str], seg_rows: list[tuple[list[str], list[str]]]) -> float:
    import jieba.posseg as pseg

    agree = total = 0
    for text, (words, tags) in zip(rows, seg_rows):
        ours = [t for w, t in zip(words, tags) for _ in w]
        ref = [p.flag for p in pseg.cut(text) for ch in p.word if not ch.isspace()]
        if len(ours) != len(ref):  # cannot happen unless segmentation drops characters
            raise AssertionError(f"character count differs on {text!r}")
        agree += sum(a == b for a, b in zip(ours, ref))
        total += len(ours)
    return agree / total


def peak_rss_child(n: int) -> float:
    """Peak RSS (MiB) of (b) over n rows in a fresh process (one core), so the 1x and 4x runs don't mix."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys, resource, tempfile; sys.path.insert(0, {root!r}); import bench.augment as b; "
            f"d = tempfile.mkdtemp(); b.slimflow_stages(d, b.texts({n}), 1); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import jieba
    import jieba.posseg as pseg

    jieba.setLogLevel(60)
    rows = texts(N_ROWS)
    t: dict[str, float] = {}
    with cores({0}):
        jieba.initialize()
        pseg.lcut("预热")  # warm-up: dictionaries and HMM tables loaded before timing
        with tempfile.TemporaryDirectory() as warm:
            slimflow_stages(warm, rows[:300], 1)
        with timer(t, "a"):
            for x in rows:
                jieba.lcut(x)
        with tempfile.TemporaryDirectory() as run, timer(t, "b"):
            n_aug_b, seg = slimflow_stages(run, rows, 1)
        seg_rows = []
        with tempfile.TemporaryDirectory() as run:  # again, untimed, to read the tags back
            _, seg = slimflow_stages(run, rows, 1)
            for ref in seg:
                tb = read_shard(run, ref, columns=["words", "pos"])
                seg_rows += list(zip(tb.column("words").to_pylist(), tb.column("pos").to_pylist()))
        with timer(t, "c"):
            n_aug_c = seeds_way(rows)
    with cores(set(range(os.cpu_count() or 1))):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver")) as pool:
            with tempfile.TemporaryDirectory() as warm:  # start both processes (jieba loaded) outside the timing
                slimflow_stages(warm, rows[: 2 * SHARD_ROWS], 2, pool)
            with tempfile.TemporaryDirectory() as run, timer(t, "b2"):
                slimflow_stages(run, rows, 2, pool)
    agreement = pos_agreement(rows, seg_rows)
    rss1, rss4 = peak_rss_child(N_ROWS), peak_rss_child(4 * N_ROWS)

    rps = {k: N_ROWS / v for k, v in t.items()}
    print(f"{N_ROWS} zh rows, n_iter={N_ITER}; one core unless noted")
    print(f"{'':48s} {'seconds':>8s} {'rows/s':>8s}")
    for k, name in (("a", "(a) jieba.lcut floor"), ("b", "(b) slimflow segment + augment"),
                    ("c", "(c) seeds' per-row posseg + Python loop"), ("b2", "(b) slimflow, 2 cores (2 processes)")):
        print(f"{name:48s} {t[k]:8.2f} {rps[k]:8.0f}")
    print(f"augmented rows: slimflow {n_aug_b}, seeds' way {n_aug_c}")
    print(f"(b) vs (c): {t['c'] / t['b']:.1f}x faster;  (b) / (a) time: {t['b'] / t['a']:.2f};  "
          f"2-core scaling {t['b'] / t['b2']:.2f}x")
    print(f"POS agreement with jieba.posseg.cut (HMM on), per character: {agreement:.2%}")
    print(f"peak RSS of (b): {rss1:.0f} MiB at {N_ROWS} rows, {rss4:.0f} MiB at {4 * N_ROWS} rows")
    goals = [
        goal("segment+augment speed vs seeds' per-row loop (c/b)", t["c"] / t["b"], 5.0, True),
        goal("segment+augment time over jieba.lcut floor (b/a)", t["b"] / t["a"], 2.0, False),
        goal("POS agreement with jieba.posseg per character", agreement, 0.95, True),
        goal("2-core scaling of segment+augment", t["b"] / t["b2"], 1.7, True),
        goal("peak RSS at 4x data / at 1x data (flat)", rss4 / rss1, 1.25, False),
    ]
    print_goals(goals)
    path = write_results("augment", goals, rows=N_ROWS, n_iter=N_ITER, seconds=t, rows_per_s=rps,
                         augmented_rows={"slimflow": n_aug_b, "seeds_way": n_aug_c},
                         peak_rss_mib={"1x": rss1, "4x": rss4}, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
