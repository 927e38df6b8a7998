"""The report counts, per split, the texts each model read truncated (issue 11): a run through evaluate with the
tiny random BERT as teacher (max_length 16) and a 200,000-character article among the test texts."""

import json
import os
import sys

import pytest
from slimflow.flows.config import Config
from slimflow.flows.pipeline import run_stages
from slimflow.storage.layout import RunLayout

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tasks", "teacher"))
from teacher_fixtures import LABELS, WORDS, build_seqcls_dir, random_texts  # noqa: E402


def _jsonl(path, texts, labels=True):
    rows = [{"text": t, **({"label": LABELS[i % 2]} if labels else {})} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_report_counts_the_texts_each_model_read_truncated(tmp_path, monkeypatch):
    from slimflow.tasks.students.export import Predictor

    # The students' Predictor says for itself how many texts it cuts (tasks/students); here a stand-in that
    # counts texts over 10 words, to see its figure reach the report beside the teacher's.
    monkeypatch.setattr(Predictor, "count_truncated", lambda self, texts: sum(len(t.split()) > 10 for t in texts),
                        raising=False)
    article = " ".join(WORDS * 1500)[:200_000].rsplit(" ", 1)[0]
    train, dev, test = (list(dict.fromkeys(random_texts(n, seed=s, lo=1, hi=24))) for n, s in
                        ((60, 0), (16, 1), (16, 2)))
    test.append(article)
    dev = [t for t in dev if t not in test]  # a text in two splits would be quarantined once
    train = [t for t in train if t not in dev and t not in test]
    cfg = Config(
        name="truncated", lang="en",
        data={"train": _jsonl(tmp_path / "train.jsonl", train), "dev": _jsonl(tmp_path / "dev.jsonl", dev),
              "test": _jsonl(tmp_path / "test.jsonl", test)},
        augment={"n_iter": 1}, segment={"workers": 1},
        teacher={"model": build_seqcls_dir(tmp_path / "tiny-bert"), "fit": "none", "device": "cpu", "dtype": "fp32",
                 "threads": 1, "max_length": 16, "truncation": "head_tail"},
        students=["bow"], student={"epochs": 1, "embed_dim": 8},
    )
    out = str(tmp_path / "run")
    run_stages(cfg, out, ["ingest", "segment", "augment", "teacher", "label", "train", "evaluate"])
    report = json.load(open(RunLayout(out).report_json))

    def over(texts, n):  # the tiny tokenizer reads one token per word; the teacher adds [CLS] and [SEP]
        return sum(len(t.split()) > n for t in texts)

    assert report["truncated"] == {
        "rows": {"train": len(train), "dev": len(dev), "test": len(test)},
        "train": {"teacher": over(train, 14), "bow": over(train, 10)},
        "dev": {"teacher": over(dev, 14), "bow": over(dev, 10)},
        "test": {"teacher": over(test, 14), "bow": over(test, 10)},
    }
    assert 0 < report["truncated"]["test"]["teacher"] < len(test)
    assert (report["teacher"]["max_length"], report["teacher"]["truncation"]) == (16, "head_tail")
    md = open(RunLayout(out).report_md, encoding="utf-8").read()
    assert "Texts read truncated (teacher: over 16 tokens, head_tail" in md
    assert (f"- test ({len(test)} texts): teacher {over(test, 14)}, bow {over(test, 10)}") in md
