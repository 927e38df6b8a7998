"""How accurate the default teacher (frozen e5 + head) is on zh-reviews, and how much of that is the split.

    python bench/teacher_accuracy.py [--splits 16] [--out bench/results/teacher_accuracy.json]

1. The export's own split (``slimflow data export zh-reviews``: 2,000 train, 1,000 dev, 1,000 test, seed 0),
   fitted exactly as the teacher stage fits it (logistic regression, C picked on dev; and the MLP head).
2. The same recipe on ``--splits`` other random 2,000 / 1,000 / 1,000 splits of a fixed pool of 6,000
   labelled reviews (the export's 4,000 labelled rows + 2,000 of its unlabelled ones drawn at random, whose
   labels the dataset has), and on 3,000-row train splits of that pool: how much the test figure moves with the split
   alone, and what a bigger labelled budget buys.

Every text is embedded once (fp32, the label stage's batching); heads are fitted on those embeddings.
Accuracy, not speed: nothing here is timed against a baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TARGET = 0.84  # issue 3: the default teacher's test accuracy on zh-reviews trained on its train split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=16, help="random re-splits of the pool (default 16)")
    ap.add_argument("--extra", type=int, default=2000, help="unlabelled rows added to the pool (default 2000)")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--cache-dir", default=None, help="converted default teacher (default ~/.cache/slimflow)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "teacher_accuracy.json"))
    args = ap.parse_args()

    import torch
    from slimflow.tasks.datasets import load_rows, split_rows
    from slimflow.tasks.students.evaluate import classification_metrics
    from slimflow.tasks.teacher.fit import embed_texts, fit_logreg_on_dev, fit_mlp, predict_head
    from slimflow.tasks.teacher.model import load_base_teacher

    t_start = time.perf_counter()
    splits = split_rows(load_rows("zh-reviews"), 2000, 1000, 1000, seed=0)  # `slimflow data export`'s defaults
    labels = sorted({lab for _, lab in splits["train"]})
    # The unlabelled split is in file order (every pos review before every neg one): sample it, or the
    # pool would gain 2,000 positives and the re-split test sets would not be like the export's.
    unl = splits["unlabelled"]
    extra = [unl[i] for i in sorted(np.random.default_rng(0).choice(len(unl), args.extra, replace=False))]
    pool = splits["train"] + splits["dev"] + splits["test"] + extra
    official = {"train": np.arange(0, 2000), "dev": np.arange(2000, 3000), "test": np.arange(3000, 4000)}

    teacher = load_base_teacher("default", cache_dir=args.cache_dir, device="cpu", dtype="fp32")
    t0 = time.perf_counter()
    x = embed_texts(teacher, [t for t, _ in pool], batch_tokens=args.batch_tokens)
    y = np.asarray([labels.index(lab) for _, lab in pool], dtype=np.int64)
    print(f"embedded {len(pool)} reviews in {time.perf_counter() - t0:.0f} s", flush=True)

    def run_logreg(idx) -> dict:
        h, dev_m, c, _ = fit_logreg_on_dev(x[idx["train"]], y[idx["train"]], x[idx["dev"]], y[idx["dev"]],
                                           len(labels))
        test_m = classification_metrics(y[idx["test"]], predict_head(h, x[idx["test"]]), len(labels))
        return {"C": c, "dev_accuracy": dev_m["accuracy"], "test_accuracy": test_m["accuracy"],
                "test_macro_f1": test_m["macro_f1"]}

    # 1. the export's split, as the teacher stage fits it
    torch.manual_seed(0)
    export_logreg = run_logreg(official)
    mlp = fit_mlp(x[official["train"]], y[official["train"]], x[official["dev"]], y[official["dev"]], len(labels))
    mlp_dev = classification_metrics(y[official["dev"]], predict_head(mlp, x[official["dev"]]), len(labels))
    mlp_test = classification_metrics(y[official["test"]], predict_head(mlp, x[official["test"]]), len(labels))
    export_mlp = {"dev_accuracy": mlp_dev["accuracy"], **{f"test_{k}": v for k, v in mlp_test.items()}}
    print(f"export split: logreg dev {export_logreg['dev_accuracy']:.3f} test {export_logreg['test_accuracy']:.3f}"
          f" (C={export_logreg['C']}); mlp dev {export_mlp['dev_accuracy']:.3f} test {export_mlp['test_accuracy']:.3f}",
          flush=True)

    # 2. re-splits of the pool: the same recipe, 2,000 and 3,000 train rows
    resplits = {}
    for n_train in (2000, 3000):
        accs = []
        for s in range(1, args.splits + 1):
            p = np.random.default_rng(s).permutation(len(pool))
            idx = {"test": p[:1000], "dev": p[1000:2000], "train": p[2000 : 2000 + n_train]}
            accs.append(run_logreg(idx)["test_accuracy"])
        a = np.asarray(accs)
        resplits[str(n_train)] = {"test_accuracy": accs, "mean": float(a.mean()), "sd": float(a.std(ddof=1)),
                                  "min": float(a.min()), "max": float(a.max()),
                                  "share_at_or_above_target": float((a >= TARGET).mean())}
        print(f"{args.splits} re-splits, {n_train} train rows: test accuracy {a.mean():.3f} +- {a.std(ddof=1):.3f}"
              f" (min {a.min():.3f}, max {a.max():.3f}; {int((a >= TARGET).sum())} of {len(a)} >= {TARGET})",
              flush=True)

    report = {
        "goals": [{"name": "zh_test_accuracy_export_split", "value": export_logreg["test_accuracy"],
                   "target": TARGET, "higher_is_better": True}],
        "export_split": {"logreg": export_logreg, "mlp": export_mlp},
        "resplits": resplits,
        "pool_rows": len(pool),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
