"""The transformer student through the pipeline (issue 15): train, export and evaluate stages with a tiny random
BERT as teacher; the report lists it with its size on disk and `slimflow predict`'s code path serves it int8."""

import json
import os
import sys

import pytest
from slimflow.flows.config import Config
from slimflow.flows.pipeline import run_stages
from slimflow.storage.layout import RunLayout

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tasks", "teacher"))
from teacher_fixtures import LABELS, build_seqcls_dir, random_texts  # noqa: E402


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "label": LABELS[i % 2]}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_transformer_student_trains_exports_and_reaches_the_report(tmp_path):
    from slimflow.tasks.students.export import FILES, REDUCED, Predictor, predict_lines

    train, dev, test = (list(dict.fromkeys(random_texts(n, seed=s, lo=1, hi=12))) for n, s in
                        ((60, 0), (16, 1), (16, 2)))
    dev = [t for t in dev if t not in test]
    train = [t for t in train if t not in dev and t not in test]
    cfg = Config(
        name="transformer", lang="en",
        data={"train": _jsonl(tmp_path / "train.jsonl", train), "dev": _jsonl(tmp_path / "dev.jsonl", dev),
              "test": _jsonl(tmp_path / "test.jsonl", test)},
        augment={"n_iter": 1}, segment={"workers": 1},
        teacher={"model": build_seqcls_dir(tmp_path / "tiny-bert"), "fit": "none", "device": "cpu", "dtype": "fp32",
                 "threads": 1, "max_length": 16},
        students=["transformer"],  # student.init: teacher (the default) computes no vectors for it
        transformer={"layers": [1], "epochs": 1, "max_len": 16, "batch_size": 8, "device": "cpu", "threads": 1,
                     "losses": {"kl": 1.0, "hidden_mse": 1.0}},
    )
    out = str(tmp_path / "run")
    run_stages(cfg, out, ["ingest", "segment", "augment", "teacher", "label", "train", "export", "evaluate"])
    layout = RunLayout(out)
    report = json.load(open(layout.report_json))
    s = report["students"]["transformer"]
    assert 0 <= s["distilled_accuracy"] <= 1 and 0 <= s["baseline_accuracy"] <= 1
    export_dir = os.path.join(out, "export", "transformer")
    # the size of the file served: int8 ONNX or bf16 TorchScript, whichever the export measured faster here
    served = json.load(open(os.path.join(export_dir, "student.json")))["serve"]["backend"]
    assert s["backend"] == served and Predictor(export_dir).backend == served
    assert s["size_bytes"] == os.path.getsize(os.path.join(export_dir, FILES[served]))
    md = open(layout.report_md, encoding="utf-8").read()
    assert "size on disk (MB)" in md and f"transformer distilled ({REDUCED[served]})" in md
    result = json.load(open(os.path.join(out, "train", "transformer-distilled", "result.json")))
    assert set(result["history"][0]["train_parts"]) == {"kl", "hidden_mse"}
    assert not [f for f in os.listdir(os.path.join(out, "train")) if f.startswith("vectors")]
    lines = list(predict_lines(export_dir, test[:3]))
    assert len(lines) == 3 and all(ln.split("\t")[1] in LABELS for ln in lines)
