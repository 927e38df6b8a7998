"""Long documents are data, not errors (issue 11): a 200,000-character article goes through ingest, segment,
label, train, export and predict (the stage functions, with the tiny random BERT as teacher); a 10 MB text is
quarantined with a reason. Every model truncates the article to its own budget, and says how many it cut."""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent / "teacher"))
from slimflow.storage.shards import read_shard  # noqa: E402
from slimflow.tasks.ingest import IngestParams, ingest  # noqa: E402
from teacher_fixtures import LABELS, WORDS, build_seqcls_dir, random_texts  # noqa: E402

ARTICLE_CHARS = 200_000


def _article() -> str:
    words, n, i = [], 0, 0
    while n < ARTICLE_CHARS:
        w = WORDS[i % len(WORDS)]
        words.append(w)
        n += len(w) + 1
        i += 1
    return " ".join(words)[:ARTICLE_CHARS].rstrip()


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A run directory with the article in train and in test, ingested and segmented (en)."""
    from slimflow.tasks.segment import segment_shard

    root = tmp_path_factory.mktemp("long")
    article = _article()
    short = random_texts(40, seed=1)
    rows = [{"text": t, "label": LABELS[i % 2]} for i, t in enumerate(dict.fromkeys(short))]
    rows.append({"text": article, "label": "pos"})
    rows.append({"text": "x" * 10_000_000, "label": "neg"})  # 10 MB: pathological
    test_rows = [{"text": article + " sad", "label": "neg"}, {"text": "good movie", "label": "pos"}]
    dev_rows = [{"text": t, "label": LABELS[i % 2]} for i, t in enumerate(random_texts(6, seed=2, lo=21, hi=30))]
    paths = {}
    for split, split_rows in (("train", rows), ("dev", dev_rows), ("test", test_rows)):
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in split_rows), encoding="utf-8")
    run = str(root / "run")
    res = ingest(run, IngestParams(**{s: str(p) for s, p in paths.items()}, labels=tuple(LABELS)))
    from slimflow.storage.shards import ShardRef

    refs = [ShardRef.from_dict(d) for d in res["shards"]]
    seg = {r.split: segment_shard(run, r, "en", workers=1) for r in refs}
    return {"root": root, "run": run, "ingest": res, "seg": seg, "article": article}


def test_the_article_is_kept_and_the_ten_megabyte_text_quarantined(long_run):
    run = long_run["run"]
    rej = pq.read_table(f"{run}/ingest/rejects.parquet").to_pylist()
    assert [(r["split"], r["reason"]) for r in rej] == [
        ("train", "text longer than data.max_chars (10000000 > 500000)")]
    texts = {t: r.split for r in long_run["seg"].values()
             for t in read_shard(run, r, columns=["text"]).column("text").to_pylist()}
    assert texts[long_run["article"]] == "train" and texts[long_run["article"] + " sad"] == "test"
    assert len(long_run["article"]) == ARTICLE_CHARS
    words = read_shard(run, long_run["seg"]["train"], columns=["text", "words"]).to_pylist()
    assert max(len(r["words"]) for r in words) == len(long_run["article"].split())  # segmented whole


def test_the_article_is_labelled_trained_on_and_predicted(long_run, tmp_path):
    from slimflow.tasks.students.export import Predictor, export_student
    from slimflow.tasks.students.train import train_student
    from slimflow.tasks.students.vocab import build_vocab_from_shards
    from slimflow.tasks.teacher.fit import adopt_pretrained
    from slimflow.tasks.teacher.label import label_shard

    run, seg, article = long_run["run"], long_run["seg"], long_run["article"]
    teacher = str(tmp_path / "teacher")
    adopt_pretrained(teacher, labels=LABELS, model=build_seqcls_dir(tmp_path / "tiny-bert"), truncation="head_tail")
    labelled = label_shard(run, seg["train"], "original", teacher, "label/original", device="cpu", dtype="fp32",
                           batch_tokens=512)
    rows = read_shard(run, labelled, columns=["text_t", "logits"]).to_pylist()
    assert len(rows) == seg["train"].rows and any(r["text_t"] == article for r in rows)
    assert all(len(r["logits"]) == 2 for r in rows)

    vocab = build_vocab_from_shards(run, [seg["train"]])
    train_dir = tmp_path / "bow"
    res = train_student(run, kind="bow", mode="distilled", train_refs=[labelled], dev_refs=[seg["dev"]], vocab=vocab,
                        labels=LABELS, out_dir=str(train_dir), embed_dim=8, epochs=1, batch_size=8, max_len=64)
    assert res["epochs_run"] == 1
    export_student(str(train_dir), str(tmp_path / "export"), lang="en")
    labels, probs = Predictor(str(tmp_path / "export")).predict([article, "good movie"])
    conf = probs.max(-1)
    assert set(labels) <= set(LABELS) and all(0.5 <= c <= 1 for c in conf)


def test_the_evaluate_figures_count_the_article_as_truncated(long_run, tmp_path):
    from slimflow.tasks.evaluate import teacher_truncated
    from slimflow.tasks.teacher.fit import adopt_pretrained

    run = long_run["run"]
    teacher_dir = Path(run) / "teacher" / "model"
    adopt_pretrained(str(teacher_dir), labels=LABELS, model=build_seqcls_dir(tmp_path / "tiny-bert"))
    splits = {s: [long_run["seg"][s]] for s in ("train", "dev", "test")}
    got = teacher_truncated(run, {"threads": None, "cache_dir": None}, splits)
    rows = {s: r.rows for s, r in long_run["seg"].items() if s != "unlabelled"}
    assert got["rows"] == rows and got["max_length"] == 64  # the tiny BERT's 64 positions cap max_length 128
    # random_texts has at most 20 words (22 tokens): only the article (in train, and in test) is over 64 tokens
    assert got["truncated"] == {"train": 1, "dev": 0, "test": 1}
