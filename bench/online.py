"""Online vs offline distillation of the BiLSTM on the quick-demo data (issue 6).

Data: bundled zh reviews (2,000 labelled, fixed dev/test), augment n_iter 1 and the unlabelled rows subsampled
to --unlabelled (default 1,000) so the bench stays under ~10 min on 2 cores. The pipeline runs up to the
teacher stage (default teacher: e5-small frozen + logreg head); then the same BiLSTM is trained twice:
offline (label_shard over every input shard, then train_student) and online (a `slimflow.tasks.service` subprocess
answering an OnlineLabeller while train_student runs). Goal: test accuracies within one point.

    .venv/bin/python bench/online.py [--out DIR] [--unlabelled N]     # writes bench/results/online.json
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import goal, print_goals, teacher_service, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="run directory (default: a temporary one)")
    ap.add_argument("--unlabelled", type=int, default=1000, help="unlabelled rows kept (subsample)")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import httpx
    import yaml
    from slimflow.flows.config import load_config
    from slimflow.flows.pipeline import run_flow
    from slimflow.flows.stage_specs import label_inputs
    from slimflow.storage.fs import join
    from slimflow.storage.layout import RunLayout
    from slimflow.storage.manifest import read_manifest
    from slimflow.tasks.datasets import export_dataset
    from slimflow.tasks.online import OnlineLabeller, TeacherClient
    from slimflow.tasks.students.train import evaluate_student, train_student
    from slimflow.tasks.students.vocab import build_vocab_from_shards
    from slimflow.tasks.teacher.label import label_shard

    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench-online-"))
    data = join(out, "data")
    files = export_dataset("zh-reviews", data, labelled=2000)
    with open(files["unlabelled"], encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with open(files["unlabelled"], "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows[: args.unlabelled + 1])
    print(f"data: 2000 labelled, unlabelled subsampled to {args.unlabelled} rows, augment n_iter 1 (bench budget)")
    cfg_path = join(out, "bench.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump({"name": "bench-online", "lang": "zh", "data": {k: files[k] for k in
                        ("train", "dev", "test", "unlabelled")}, "augment": {"n_iter": 1},
                        "shards": {"rows": 1000}, "students": ["bilstm"], "teacher": {"threads": 2}}, f)
    config = load_config(cfg_path)
    t0 = time.perf_counter()
    run_flow(config=config, out=out, until="teacher")
    print(f"pipeline up to the teacher: {time.perf_counter() - t0:.0f} s")
    layout = RunLayout(out)
    seg, aug, teacher = (read_manifest(layout.stage_dir(s)) for s in ("segment", "augment", "teacher"))
    weights, labels = teacher.extra["teacher"]["weights_hash"], teacher.extra["labels"]
    inputs = label_inputs(seg, aug)
    n_texts = sum(r.rows for _, r in inputs)
    vocab = build_vocab_from_shards(out, [r for r in seg.shards if r.split in ("train", "unlabelled")])
    common = dict(kind="bilstm", mode="distilled", dev_refs=seg.split("dev"), vocab=vocab, labels=labels,
                  epochs=args.epochs, patience=args.epochs, progress=False)
    tdir = join(out, "teacher", "model")

    t0 = time.perf_counter()
    off_refs = [label_shard(out, r, kind, tdir, f"bench-offline/{kind}", device="cpu", threads=2) for kind, r in inputs]
    off_label_s = time.perf_counter() - t0
    off = train_student(out, train_refs=off_refs, out_dir=join(out, "bench-train-offline"), **common)
    off_s = time.perf_counter() - t0

    with teacher_service(tdir, 8571, ROOT, device="cpu", threads=2) as (url, _):
        t0 = time.perf_counter()
        with TeacherClient(url, concurrency=4, server_batch_size=64) as client, \
                OnlineLabeller(out, inputs, client, weights_hash=weights, labels=labels) as labeller:
            on = train_student(out, train_refs=labeller.refs(), out_dir=join(out, "bench-train-online"), **common)
            waited = labeller.waited_s
        on_s = time.perf_counter() - t0
        stats = httpx.get(f"{url}/v1/stats").json()
    test = seg.split("test")
    acc_off = evaluate_student(out, test, join(out, "bench-train-offline"))["accuracy"]
    acc_on = evaluate_student(out, test, join(out, "bench-train-online"))["accuracy"]
    print(f"\n{'':28s} {'wall s':>8s} {'test acc':>9s}")
    print(f"{'offline (label, then train)':28s} {off_s:8.1f} {acc_off:9.4f}   (labelling {off_label_s:.1f} s)")
    print(f"{'online (service + train)':28s} {on_s:8.1f} {acc_on:9.4f}   (training waited {waited:.1f} s on shards)")
    print(f"online / offline wall time: {on_s / off_s:.2f}x over {n_texts} teacher texts, {args.epochs} epochs")
    print(f"service: mean batch {stats['mean_batch_texts']:.1f} texts ({stats['mean_batch_requests']:.2f} requests), "
          f"{stats['texts_per_s_busy']:.1f} texts/s while busy, {stats['oom_splits']} OOM splits")
    goals = [goal("|online - offline| test accuracy, points (<= 1)", abs(acc_on - acc_off) * 100, 1.0, False)]
    print_goals(goals)
    path = write_results("online", goals, texts=n_texts, epochs=args.epochs, unlabelled_subsample=args.unlabelled,
                         offline={"wall_s": off_s, "label_s": off_label_s, "test_accuracy": acc_off,
                                  "dev_accuracy": off["best_dev_accuracy"]},
                         online={"wall_s": on_s, "waited_s": waited, "test_accuracy": acc_on,
                                 "dev_accuracy": on["best_dev_accuracy"]},
                         ratio_online_offline=on_s / off_s, service=stats,
                         note="shared 2-core machine: other work ran alongside; timings are indicative")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
