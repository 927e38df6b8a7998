"""Benchmark the transformer student (issue 15): 4 teacher layers over the trimmed vocabulary, five ways to distil.

    python bench/transformer_student.py [--epochs 3] [--max-len 64] [--threads N] [--work DIR]
    python bench/transformer_student.py --smoke     # a tiny random BERT on random texts: checks the script runs

On the quick demo's data (2,000 labelled reviews, 10,000 unlabelled, n_iter 1) with the default teacher
(multilingual-e5-small + logistic-regression head), the pipeline runs up to the label stage; then, from the same
init (teacher layers 2, 5, 8, 11, its fitted head as the classifier), one transformer student per recipe:

    logits                           kl on the teacher's logits
    logits+pkd                       + pkd (mean-pooled states at the mapped layers, weight 100: PKD's beta)
    logits+hidden_mse                + hidden_mse (TinyBERT: embeddings and mapped layers' outputs)
    logits+hidden_mse+attention_mse  + attention_mse (TinyBERT: pre-softmax scores)
    theseus                          BERT-of-Theseus module replacement, kl only

Two phases, so that the five fit the issue's 45 minutes on a 2-core CPU:

1. compare: each recipe trains ``--compare-epochs`` (1) on the first ``--compare-shards`` (1) label shards (the
   quick demo's 2,000 original rows), and the winner is the best on dev (never on test);
2. final: the winner trains ``--epochs`` (3) on every label shard (``--train-shards`` to cut it), and the goals
   are judged on that student.

Every student is exported (ONNX fp32 + int8, bf16 TorchScript) and measured as served: test accuracy and macro-F1
of each, texts/s at batch 32 with raw text in (tokenisation included, each timing in a fresh process), int8/fp32
and bf16/fp32 agreement, size on disk, and which of int8 and bf16 the export measured faster (``served``). The
teacher is measured in the same run the same way (the evaluate stage's harness), and once more reading only the
pieces the student reads (its first max_len), which tells the shorter budget's cost apart from distillation's.
Goals: the issue's acceptance lines. A shorter max_len than the config default (64, not 128) keeps it within the
time on a 2-core CPU without AMX; the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = {
    "logits": {"losses": {"kl": 1.0}},
    "logits+pkd": {"losses": {"kl": 1.0, "pkd": 100.0}},
    "logits+hidden_mse": {"losses": {"kl": 1.0, "hidden_mse": 1.0}},
    "logits+hidden_mse+attention_mse": {"losses": {"kl": 1.0, "hidden_mse": 1.0, "attention_mse": 1.0}},
    "theseus": {"losses": {"kl": 1.0}, "method": "theseus"},
}
# Each student is served three ways (the export's three files); the goals are judged on fp32 and int8, the
# issue's two. bf16 TorchScript is what `slimflow predict` serves where the export measured it faster than int8.
BACKENDS = {"fp32": "onnx", "int8": "onnx_int8", "bf16": "torchscript_bf16"}


def prepare_run(work: str, smoke: bool):
    """(config, run_dir) with the label stage done: the quick demo, or (smoke) random texts and a tiny BERT."""
    from slimflow.flows.config import Config, load_config
    from slimflow.flows.pipeline import run_stages

    run = os.path.join(work, "run")
    if smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tasks" / "teacher"))
        from teacher_fixtures import LABELS, build_seqcls_dir, random_texts

        def jsonl(name, texts):
            path = Path(work) / name
            path.write_text("".join(json.dumps({"text": t, "label": LABELS[("good" in t) + 0]}) + "\n"
                                    for t in texts), encoding="utf-8")
            return str(path)

        texts = list(dict.fromkeys(random_texts(260, seed=0, lo=2, hi=12)))
        config = Config(name="transformer-smoke", lang="en",
                        data={"train": jsonl("train.jsonl", texts[:180]), "dev": jsonl("dev.jsonl", texts[180:220]),
                              "test": jsonl("test.jsonl", texts[220:])},
                        augment={"n_iter": 1}, segment={"workers": 1},
                        teacher={"model": build_seqcls_dir(Path(work) / "tiny-bert"), "fit": "none",
                                 "device": "cpu", "dtype": "fp32", "max_length": 32})
    else:
        from slimflow.flows.demo import write_demo_config

        config = load_config(write_demo_config(os.path.join(work, "demo"), "quick"))
    from slimflow.storage.layout import RunLayout
    from slimflow.storage.manifest import read_manifest

    # A --work directory from an earlier run keeps its stages: the label manifest (written last) says they are
    # done, and no Prefect server need start (on a loaded machine its startup alone can time out).
    if read_manifest(RunLayout(run).stage_dir("label")) is None:
        run_stages(config, run, ["ingest", "segment", "augment", "teacher", "label"])
    return config, run


def test_texts(run: str, refs) -> tuple[list[str], list[str]]:
    from slimflow.storage.shards import read_shard

    texts, labels = [], []
    for r in refs:
        t = read_shard(run, r)
        texts += t.column("text").to_pylist()
        labels += t.column("label").to_pylist()
    return texts, labels


def served(export_dir: str, backend: str, texts: list[str], speed_texts: list[str]) -> dict:
    """Run in a fresh process: predictions on ``texts`` and texts/s on ``speed_texts`` (batch 32, raw text in)."""
    from slimflow.tasks.evaluate import speed
    from slimflow.tasks.students.export import Predictor

    p = Predictor(export_dir, backend=backend)
    probs = p.predict_proba(texts)
    return {"pred": [p.labels[k] for k in probs.argmax(-1)], **speed(p.predict_proba, speed_texts)}


def _partial(args, train_refs, label_shards) -> str | None:
    """What this run left out of the bench's full protocol, said in the results (None: nothing)."""
    left = []
    if len(train_refs) < len(label_shards):
        left.append(f"training read the first {len(train_refs)} of {len(label_shards)} label shards "
                    f"({sum(r.rows for r in train_refs):,} of {sum(r.rows for r in label_shards):,} rows)")
    if set(args.recipes.split(",")) != set(RECIPES):
        left.append(f"only the recipes {args.recipes} compared")
    return "; ".join(left) or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="the winner's epochs on every label shard")
    ap.add_argument("--compare-epochs", type=int, default=1, help="each recipe's epochs in the comparison")
    ap.add_argument("--compare-shards", type=int, default=1,
                    help="label shards each recipe trains on in the comparison (the first is the original rows)")
    ap.add_argument("--max-len", type=int, default=64, help="subword pieces per text (config default 128)")
    ap.add_argument("--width", type=float, default=1.0,
                    help="share of each layer's heads and FFN neurons kept (transformer.width; 1: none pruned)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: all cores)")
    ap.add_argument("--train-shards", type=int, default=None,
                    help="the winner trains on the first N label shards only (a partial run; recorded)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of: " + ", ".join(RECIPES))
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT on random texts: the plumbing only")
    args = ap.parse_args()
    if args.smoke:
        args.max_len = min(args.max_len, 30)  # the tiny BERT has 64 positions

    from slimflow.flows.config import TransformerConfig
    from slimflow.storage.layout import RunLayout
    from slimflow.storage.manifest import read_manifest
    from slimflow.tasks.evaluate import SPEED_TEXTS, isolated, teacher_speed
    from slimflow.tasks.students.evaluate import classification_metrics, size_on_disk
    from slimflow.tasks.students.export import FILES, export_student
    from slimflow.tasks.students.subword import tokenizer_json
    from slimflow.tasks.students.train import train_student
    from slimflow.tasks.students.vocab import build_vocab_from_shards
    from slimflow.tasks.teacher.model import resolve_base

    from bench._common import goal, print_goals, write_results

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    work = args.work or tmp.name
    os.makedirs(work, exist_ok=True)
    config, run = prepare_run(work, args.smoke)
    prefix_s = time.perf_counter() - t_start
    layout = RunLayout(run)
    seg, lab = read_manifest(layout.stage_dir("segment")), read_manifest(layout.stage_dir("label"))
    labels = lab.extra["labels"]
    train_refs = lab.shards[: args.train_shards] if args.train_shards else lab.shards
    teacher_dir = layout.path("teacher", "model")
    base = resolve_base(config.teacher.model, config.teacher.cache_dir)
    # The corpus the pipeline's vocabulary task reads (train + unlabelled), no size cap: every piece kept.
    vocab = build_vocab_from_shards(run, [r for r in seg.shards if r.split in ("train", "unlabelled")],
                                    unit="subword", lang=config.lang, max_size=10**7,
                                    tokenizer=tokenizer_json(base.path))
    texts, gold = test_texts(run, seg.split("test"))
    step = max(1, len(texts) // SPEED_TEXTS)
    speed_texts = texts[::step][:SPEED_TEXTS]

    # The teacher: the label stage labels no test rows, so it labels the test texts here; its speed is the
    # evaluate stage's measurement (a fresh process, raw text in, batch 32).
    from slimflow.tasks.teacher.label import label_texts
    from slimflow.tasks.teacher.model import load_teacher

    t = config.teacher
    import numpy as np

    lab_id = {x: i for i, x in enumerate(labels)}

    def test_metrics(**kw):
        """(the teacher loaded with ``kw``, its accuracy / macro-F1 / MCC on the test texts)."""
        tt = load_teacher(teacher_dir, device="cpu", dtype=t.dtype, threads=t.threads, cache_dir=t.cache_dir, **kw)
        pred = label_texts(tt, texts, batch_tokens=t.batch_tokens).argmax(-1)
        return tt, classification_metrics([lab_id[g] for g in gold], [lab_id[tt.labels[k]] for k in pred],
                                          len(labels))

    teacher, t_metrics = test_metrics()
    t_speed = teacher_speed(run, {"device": "cpu", "dtype": t.dtype, "threads": t.threads, "cache_dir": t.cache_dir,
                                  "batch_tokens": t.batch_tokens, "trust_remote_code": t.trust_remote_code},
                            speed_texts)
    # What the student's shorter budget alone costs: the same teacher reading the pieces the student reads (its
    # first max_len of the text, head truncation like the student's; specials and e5's prefix on top).
    extra = teacher.token_counts([""])[0]  # the specials and the prefix of an empty text
    cut, cut_metrics = test_metrics(max_length=args.max_len + extra, truncation="head", reuse=False)
    at_student_len = {"max_length": cut.max_length, "truncation": "head", "texts_cut": cut.count_truncated(texts),
                      **cut_metrics}
    del cut
    weights_file = os.path.join(base.path, "model.safetensors")
    teacher_row = {"accuracy": t_metrics["accuracy"], "macro_f1": t_metrics["macro_f1"], "qps": t_speed["qps"],
                   "size_bytes": size_on_disk(weights_file) if os.path.exists(weights_file) else t_speed["size_bytes"],
                   "folder_bytes": size_on_disk(base.path), "params": t_speed["params"],
                   "dtype": t_speed.get("dtype"), "at_student_max_len": at_student_len}
    del teacher

    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(base.path).num_hidden_layers
    layers = [1] if args.smoke else [2, 5, 8, 11]
    common = TransformerConfig(layers=layers, max_len=args.max_len, width=args.width, patience=1,
                               threads=args.threads).model_dump(mode="json")
    common.update(cache_dir=t.cache_dir, trust_remote_code=t.trust_remote_code)
    compare_refs = lab.shards[: args.compare_shards]

    def student(name: str, refs, epochs: int, out_dir: str, export_dir: str) -> dict:
        """Train recipe ``name`` on ``refs`` (resumed from ``out_dir`` when done before), export, measure."""
        settings = {**common, **RECIPES[name], "epochs": epochs}
        t0 = time.perf_counter()
        res = train_student(run, kind="transformer", mode="distilled", train_refs=refs,
                            dev_refs=seg.split("dev"), vocab=vocab, labels=labels, out_dir=out_dir,
                            transformer=settings, teacher_dir=teacher_dir, progress=True)
        train_s = time.perf_counter() - t0
        meta = export_student(out_dir, export_dir, lang=config.lang)
        row = {"train_rows": sum(r.rows for r in refs), "epochs": epochs, "train_seconds": train_s,
               "best_dev_accuracy": res["best_dev_accuracy"], "epochs_run": res["epochs_run"],
               "train_parts": res["history"][-1]["train_parts"],
               "int8_weights": meta.get("int8"),  # the measured int8 choices (tasks/students/export.py)
               "served": meta.get("serve")}  # int8 ONNX or bf16 TorchScript: what `slimflow predict` serves
        for key, backend in BACKENDS.items():
            r = isolated(served, export_dir, backend, texts, speed_texts)
            m = classification_metrics([lab_id[g] for g in gold], [lab_id[p] for p in r["pred"]], len(labels))
            row[key] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "qps": r["qps"],
                        "qps_batch1": r["qps_batch1"], "pred": r["pred"]}
        for k in ("int8", "bf16"):
            row[f"{k}_agreement"] = float(np.mean([a == b for a, b in zip(row["fp32"]["pred"], row[k]["pred"])]))
        row["size_bytes"] = {**{k: size_on_disk(os.path.join(export_dir, FILES[b])) for k, b in BACKENDS.items()},
                             "tokenizer": size_on_disk(os.path.join(export_dir, "vocab.tokenizer.json")),
                             "folder": size_on_disk(export_dir)}
        for k in BACKENDS:
            del row[k]["pred"]
        print(f"{name} ({row['train_rows']:,} rows x {epochs} epochs): dev {res['best_dev_accuracy']:.4f} "
              f"test fp32 {row['fp32']['accuracy']:.4f} int8 {row['int8']['accuracy']:.4f} "
              f"bf16 {row['bf16']['accuracy']:.4f} "
              f"({train_s:.0f} s training)", flush=True)
        return row

    # 1. compare: every recipe from the same init on the same rows; the winner is chosen on dev
    rows: dict[str, dict] = {}
    for name in args.recipes.split(","):
        rows[name] = student(name, compare_refs, args.compare_epochs, os.path.join(work, "students", "compare", name),
                             os.path.join(work, "export", "compare", name))
    ranked = sorted(rows, key=lambda n: rows[n]["best_dev_accuracy"], reverse=True)
    best, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    # 2. final: the winner on every label shard, for --epochs
    final = student(best, train_refs, args.epochs, os.path.join(work, "students", best),
                    os.path.join(work, "export", best))

    def table_row(name: str, row: dict) -> None:
        for k in BACKENDS:
            r = row[k]
            print(f"{name + ' ' + k:48s} {row['best_dev_accuracy']:6.4f} {r['accuracy']:8.4f} {r['macro_f1']:8.4f} "
                  f"{r['qps']:9.1f} {r['qps'] / teacher_row['qps']:9.1f} {row['size_bytes'][k] / 1e6:8.1f}")

    print(f"\n{'model':48s} {'dev':>6s} {'test acc':>8s} {'macro-F1':>8s} {'texts/s':>9s} {'x teacher':>9s} "
          f"{'size MB':>8s}")
    print(f"{'teacher (' + base.name + ')':48s} {'':6s} {teacher_row['accuracy']:8.4f} {teacher_row['macro_f1']:8.4f} "
          f"{teacher_row['qps']:9.1f} {1:9.1f} {teacher_row['size_bytes'] / 1e6:8.1f}")
    a = teacher_row["at_student_max_len"]
    print(f"{'teacher reading the student ' + str(args.max_len) + ' pieces':48s} {'':6s} {a['accuracy']:8.4f} "
          f"{a['macro_f1']:8.4f}   ({a['texts_cut']} of {len(texts)} test texts cut)")
    for name, row in rows.items():
        table_row(f"{name} ({row['train_rows']:,} x {row['epochs']})", row)
    table_row(f"{best} ({final['train_rows']:,} x {final['epochs']})", final)
    b = final
    winner = {"recipe": best, "chosen_on": "dev accuracy in the comparison",
              "dev_accuracy": rows[best]["best_dev_accuracy"], "runner_up": second,
              "margin_dev_points": (100 * (rows[best]["best_dev_accuracy"] - rows[second]["best_dev_accuracy"])
                                    if second else None),
              "margin_test_points_int8": (100 * (rows[best]["int8"]["accuracy"] - rows[second]["int8"]["accuracy"])
                                          if second else None),
              "final_int8_accuracy": b["int8"]["accuracy"], "final_fp32_accuracy": b["fp32"]["accuracy"]}
    print(f"\nwinner on dev: {best}" + (f", {winner['margin_dev_points']:+.2f} dev points over {second} "
                                        f"({winner['margin_test_points_int8']:+.2f} on test, int8)" if second else "")
          + f"; trained on all {b['train_rows']:,} rows: test {b['int8']['accuracy']:.4f} int8")
    goals = [
        goal(f"best 4-layer student int8 test accuracy ({best}) >= teacher - 0.005", b["int8"]["accuracy"],
             round(teacher_row["accuracy"] - 0.005, 4), True),
        goal("its fp32 texts/s / teacher texts/s (batch 32, raw text)", b["fp32"]["qps"] / teacher_row["qps"], 3.0,
             True),
        goal("its int8 texts/s / teacher texts/s (batch 32, raw text)", b["int8"]["qps"] / teacher_row["qps"], 6.0,
             True),
        goal("int8 predictions agreeing with fp32 (test texts)", b["int8_agreement"], 0.99, True),
        goal("int8 model file / teacher weights file (size on disk)",
             b["size_bytes"]["int8"] / teacher_row["size_bytes"], round(1 / 15, 4), False),
    ]
    print_goals(goals)
    name = "transformer_student-smoke" if args.smoke else "transformer_student"
    path = write_results(
        name, goals, teacher=teacher_row, students=rows, final=final, winner=winner,
        settings={"compare_epochs": args.compare_epochs, "compare_rows": sum(r.rows for r in compare_refs),
                  "epochs": args.epochs, "max_len": args.max_len, "width": args.width, "layers": layers,
                  "teacher_layers": n_layers,
                  "config_defaults": {"epochs": 3, "max_len": 128}, "recipes": {k: RECIPES[k] for k in rows},
                  "train_rows": sum(r.rows for r in train_refs), "label_rows": sum(r.rows for r in lab.shards),
                  "train_shards": [r.path for r in train_refs], "test_texts": len(texts),
                  "speed_texts": len(speed_texts), "vocab_pieces": len(vocab), "smoke": args.smoke},
        notes=notes(args.max_len),
        seconds={"prepare_through_label": prefix_s, "total": time.perf_counter() - t_start},
        **({"partial": partial} if (partial := _partial(args, train_refs, lab.shards)) else {}))
    print(f"\nwrote {path}")
    if not args.smoke:
        print(f"wrote {plot(path)}")
    tmp.cleanup()


def notes(max_len: int) -> str:
    budget = (f"max_len {max_len}, the config default" if max_len == 128 else
              f"max_len {max_len} rather than the config default 128 (shorter: to finish within the issue's 45 "
              "minutes on a 2-core CPU)")
    return ("students: the comparison (each recipe on compare_rows for compare_epochs, same init); final: the dev "
            f"winner on train_rows for epochs, on which the goals are judged. {budget}; teacher.at_student_max_len "
            "is the teacher reading only the pieces the student reads (what the shorter budget alone costs). Size "
            "on disk: the served model file against the teacher's weights file; the export folder also holds the "
            "teacher's whole tokenizer (tokenizer.json, ~17 MB for e5), recorded as size_bytes.tokenizer / folder.")


def plot(results_path: str) -> str:
    """Test accuracy against served texts/s (log scale) of the teacher and every student of a results file, each
    file the export wrote (fp32, int8, bf16) a marker of its own; written beside it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(results_path, encoding="utf-8"))
    t = res["teacher"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(t["qps"], t["accuracy"], s=60, color="black")
    ax.annotate(f"teacher ({t.get('dtype')})", (t["qps"], t["accuracy"]), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
    markers = {"fp32": "o", "int8": "s", "bf16": "^"}
    rows = [(f"{k} (compare)", r, "tab:grey") for k, r in res["students"].items()]
    rows.append((f"{res['winner']['recipe']} (final)", res["final"], "tab:blue"))
    for name, r, color in rows:
        for k, m in markers.items():
            if k in r:
                ax.scatter(r[k]["qps"], r[k]["accuracy"], marker=m, color=color, s=30)
        best = max((k for k in markers if k in r), key=lambda k: r[k]["qps"])
        ax.annotate(name, (r[best]["qps"], r[best]["accuracy"]), textcoords="offset points", xytext=(5, -3),
                    fontsize=6, color=color)
    for k, m in markers.items():
        ax.scatter([], [], marker=m, color="tab:blue", label=f"student, {k}")
    ax.set_xscale("log")
    ax.set_xlabel("texts/s at batch 32, raw text in (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"transformer students against the teacher ({res['machine']['cpu']}, max_len "
                 f"{res['settings']['max_len']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower center")
    fig.tight_layout()
    out = os.path.splitext(results_path)[0] + ".png"
    fig.savefig(out)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
