"""Benchmark ``fit: finetune`` on a CPU (issue 16): today's recipe against the new CPU defaults, one epoch each.

    python bench/finetune.py [--epochs 1] [--threads N]
    python bench/finetune.py --smoke      # a tiny random BERT on 96 rows: checks the script runs

Both fine-tune the default teacher (multilingual-e5-small + a linear head) on the quick demo's 2,000 labelled
rows (``slimflow demo``'s split: the same dev and test), batch 32, lr 3e-5, seed 0:

- ``before``: the recipe before issue 16: every weight trained (the 96M-row embedding table included), random
  batches padded to their longest row, fp32, a randomly initialised head.
- ``after``: the new CPU defaults: embedding table frozen, the embeddings and the bottom quarter of the encoder's
  layers fixed (``freeze_layers``: 3 of e5-small's 12), length-bucketed batches, autocast in the dtype the GEMM
  probe measured fastest (``dtype: auto``), and the head started from ``fit: head``'s logistic regression on the
  frozen encoder's embeddings of a seeded sample of 500 train and 500 dev rows (``head_init: fit``, LP-FT;
  ``probe_rows``).

Reported: seconds per epoch (training steps, plus the linear probe of ``after`` spread over its epochs; the dev
pass is timed apart), dev / test accuracy of each, the
ratio, and where each lands against ``fit: head`` (0.829 test accuracy on this split, measured before). Goals in
bench/results/finetune.json: after >= 3x faster per epoch, after's test accuracy >= before's - 0.5 points.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
from slimflow.storage.schema import SEGMENT  # noqa: E402
from slimflow.storage.shards import write_shard  # noqa: E402

FIT_HEAD_TEST_ACCURACY = 0.829  # fit: head on the quick demo's split (issue 16)


def read_split(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)]


def write_split(run_dir: str, rows, split: str):
    texts = [t for t, _ in rows]
    table = pa.table({
        "id": [f"{split}-{i:06d}" for i in range(len(rows))], "text": texts, "label": [lab for _, lab in rows],
        "source_file": [f"{split}.csv"] * len(rows), "source_row": list(range(2, len(rows) + 2)),
        "words": [list(t) for t in texts], "pos": [["x"] * len(t) for t in texts],
        "ws": [[False] * len(t) for t in texts],
    })
    return [write_shard(table, run_dir, f"segment/{split}", split, 0, SEGMENT)]


def demo_rows(work: str) -> dict[str, list[tuple[str, str]]]:
    from slimflow.flows.demo import PRESETS, export_data

    data, quick = os.path.join(work, "data"), PRESETS["quick"]
    export_data("zh-reviews", data, quick["labelled"], quick["unlabelled"])  # the quick demo's split
    return {s: read_split(os.path.join(data, f"{s}.csv")) for s in ("train", "dev", "test")}


def smoke_rows() -> dict[str, list[tuple[str, str]]]:
    words = {"pos": ["good", "great", "nice"], "neg": ["bad", "awful", "poor"]}
    rows = [(f"the {words[lab][i % 3]} movie" + " very" * (i % 7), lab)
            for i, lab in enumerate(["pos", "neg"] * 48)]
    return {"train": rows[:64], "dev": rows[64:80], "test": rows[80:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="converted default teacher (default ~/.cache/slimflow)")
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT, 96 rows")
    ap.add_argument("--out", default=None, help="default bench/results/finetune.json (-smoke.json with --smoke)")
    args = ap.parse_args()
    out_path = args.out or str(Path(__file__).parent / "results" /
                               ("finetune-smoke.json" if args.smoke else "finetune.json"))

    import torch
    from slimflow.tasks.teacher.fit import finetune_teacher
    from slimflow.tasks.teacher.model import set_threads

    from bench._common import goal, machine, print_goals

    set_threads(args.threads)
    work = tempfile.mkdtemp(prefix="slimflow-bench-finetune-")
    model, max_length, lr = "default", 128, args.lr
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tasks" / "teacher"))
        from teacher_fixtures import build_seqcls_dir

        model, max_length, lr = build_seqcls_dir(Path(work) / "tiny-bert"), 60, 1e-3
        rows = smoke_rows()
    else:
        rows = demo_rows(work)
    refs = {s: write_split(work, r, s) for s, r in rows.items()}
    labels = sorted({lab for _, lab in rows["train"]})
    recipes = {
        "before": dict(freeze_embeddings=False, freeze_layers=0, length_buckets=False, dtype="fp32",
                       head_init="random"),
        # None: the CPU defaults; head_init fit: LP-FT, its embedding pass and fit counted in the epoch below
        "after": dict(freeze_embeddings=None, freeze_layers=None, length_buckets=True, dtype="auto", head_init="fit",
                      probe_rows=500),
    }
    results = {}
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        meta = finetune_teacher(work, refs["train"], refs["dev"], os.path.join(work, f"teacher-{name}"),
                                labels=labels, model=model, test_refs=refs["test"], epochs=args.epochs, lr=lr,
                                batch_size=args.batch_size, patience=args.epochs, device="cpu",
                                threads=args.threads, max_length=max_length, truncation="head_tail",
                                batch_tokens=4096, cache_dir=args.cache_dir, **recipe)
        epoch_s = [h["train_seconds"] for h in meta["history"]]
        probe = meta.get("linear_probe") or {}
        # the linear probe (LP-FT's first step) is paid once: spread over the epochs run, so 1 epoch pays it all
        per_epoch = (sum(epoch_s) + probe.get("train_seconds", 0.0)) / len(epoch_s)
        results[name] = {"recipe": recipe, "seconds_per_epoch": per_epoch, "epochs": epoch_s,
                         "linear_probe": probe or None,
                         "total_seconds": time.perf_counter() - t0, "dev_accuracy": meta["metrics"]["dev"]["accuracy"],
                         "test_accuracy": meta["metrics"]["test"]["accuracy"], "precision": meta["precision"],
                         "trainable_params": meta["trainable_params"], "params": meta["params"],
                         "history": meta["history"]}
        r = results[name]
        print(f"{name:<7} {r['seconds_per_epoch']:8.1f} s/epoch  dev {r['dev_accuracy']:.4f}  test "
              f"{r['test_accuracy']:.4f}  ({r['trainable_params'] / 1e6:.1f}M trained, {meta['precision']['dtype']})")
    before, after = results["before"], results["after"]
    speedup = before["seconds_per_epoch"] / after["seconds_per_epoch"]
    print(f"after is {speedup:.2f}x faster per epoch; test accuracy vs fit: head ({FIT_HEAD_TEST_ACCURACY}): "
          f"before {100 * (before['test_accuracy'] - FIT_HEAD_TEST_ACCURACY):+.1f}, "
          f"after {100 * (after['test_accuracy'] - FIT_HEAD_TEST_ACCURACY):+.1f} points")
    goals = [goal("after: epoch speed-up over before", speedup, 3.0, True),
             goal("after test accuracy - before's, points", 100 * (after["test_accuracy"] - before["test_accuracy"]),
                  -0.5, True)]
    print_goals(goals)
    report = {"goals": goals, "machine": {**machine(), "torch": torch.__version__,
                                          "torch_threads": torch.get_num_threads(),
                                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                          "load_avg": os.getloadavg()},
              "smoke": args.smoke, "rows": {s: len(r) for s, r in rows.items()}, "epochs": args.epochs,
              "fit_head_test_accuracy": FIT_HEAD_TEST_ACCURACY, "results": results}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(report, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
