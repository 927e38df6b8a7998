"""The Python API (issue 14), used as a notebook would: no YAML on disk, no shelling out."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
from slimflow.storage.schema import SEGMENT
from slimflow.storage.shards import write_shard
from slimflow.tasks.students.export import export_student
from slimflow.tasks.students.train import train_student
from slimflow.tasks.students.vocab import Vocab

import slimflow
from tests.flows.test_pipeline import _zh_config


def test_run_until_augment_returns_the_report_and_resumes(tmp_path):
    cfg, train_rows = _zh_config(tmp_path, None)
    config = slimflow.Config(**cfg.model_dump())  # constructible in Python, not only from a file
    out = tmp_path / "run"
    report = slimflow.run(config, out, until="augment")
    assert isinstance(report, slimflow.Report) and report.out == str(out)
    assert report.rows["splits"]["train"] == len(train_rows) and report.rows["augmented"] > 0
    assert set(report.timing) == {"ingest", "segment", "augment"} and report.tasks["executed"] > 0
    assert report.students == {}  # no student trained yet
    assert report == slimflow.Report.load(out)  # the same numbers as report.json
    again = slimflow.run(config, out, until="augment")
    assert again.tasks["executed"] == 0 and again.rows == report.rows  # rerunning resumes


def test_run_refuses_an_unknown_stage(tmp_path):
    cfg, _ = _zh_config(tmp_path, None)
    try:
        slimflow.run(cfg, tmp_path / "run", until="agument")
    except ValueError as e:
        assert "agument" in str(e) and "augment" in str(e)
    else:
        raise AssertionError("an unknown stage was accepted")
    assert not (tmp_path / "run").exists()


def test_load_student_predicts_what_slimflow_predict_prints(tmp_path):
    rows = [("很好用", "pos"), ("太差了", "neg"), ("好", "pos"), ("差", "neg")] * 3
    words = [list(t) for t, _ in rows]
    table = {"id": [str(i) for i in range(len(rows))], "text": [t for t, _ in rows], "label": [lab for _, lab in rows],
             "source_file": ["t"] * len(rows), "source_row": list(range(len(rows))), "words": words,
             "pos": [["x"] * len(w) for w in words], "ws": [[False] * len(w) for w in words]}
    ref = write_shard(pa.table(table), str(tmp_path), "segment/train", "train", 0, SEGMENT)
    train_student(str(tmp_path), kind="bow", mode="baseline", train_refs=[ref], dev_refs=[ref],
                  vocab=Vocab.build(words), labels=["neg", "pos"], out_dir=str(tmp_path / "bow"), embed_dim=8,
                  hidden=8, epochs=3, max_len=16, threads=1)
    export_student(str(tmp_path / "bow"), str(tmp_path / "export"), lang="zh")

    texts = ["很好", "太差了", "还行吧", ""]
    labels, probs = slimflow.load_student(tmp_path / "export").predict(texts)
    assert probs.shape == (4, 2) and np.allclose(probs.sum(-1), 1, atol=1e-5)
    cli = subprocess.run([sys.executable, "-m", "slimflow.flows.cli", "predict", str(tmp_path / "export")],
                         input="\n".join(texts) + "\n", capture_output=True, text=True, check=True)
    printed = [line.split("\t") for line in cli.stdout.splitlines()]
    assert [p[1] for p in printed] == labels
    np.testing.assert_allclose([float(p[2]) for p in printed], probs.max(-1), atol=1e-4)


def test_config_from_yaml_resolves_data_paths_against_the_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "my.yaml").write_text("lang: en\ndata: {train: train.csv}\nstudents: [bow]\n")
    config = slimflow.Config.from_yaml(tmp_path / "cfg" / "my.yaml")
    assert config.lang == "en" and config.students == ["bow"]
    assert config.data.train == str((tmp_path / "cfg" / "train.csv").resolve())
