"""Bad input, as a new user would give it (issue 12): each case either ends with every source line in exactly one
shard or in rejects.parquet with a reason (counted against an oracle that reads the file line by line), or is
refused with one line that names the file (or the config key), where, and the fix.

Every input is built here. The ingest stage function is called directly; one case goes through
``slimflow ingest`` in a subprocess, for the CLI's promise of one line on stderr and no traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from slimflow.flows.config import ConfigError, load_config
from slimflow.storage.readers import InputError
from slimflow.storage.shards import ShardRef, read_shard
from slimflow.tasks.ingest import IngestParams, ingest

N = 40  # data rows per built file: over MIN_TRAIN_ROWS, both classes


def _rows(n: int = N, labels=("neg", "pos")) -> list[tuple[str, str]]:
    return [(f"review number {i} says {'bad' if i % 2 == 0 else 'good'}", labels[i % 2]) for i in range(n)]


def _csv_text(rows, sep=",", header=("text", "label"), end="\n") -> str:
    return end.join([sep.join(header)] + [sep.join(r) for r in rows]) + end


def _source_lines(data: bytes) -> list[int]:
    """The oracle: numbers of the non-blank lines after the header, read line by line (CR, LF or CRLF)."""
    text = data.decode("utf-8", errors="replace")
    lines = io.StringIO(text, newline="").readlines()
    return [i for i, line in enumerate(lines, start=1) if i > 1 and line.strip("\r\n")]


# Each case: name -> (file name, bytes or a builder(path), IngestParams overrides, expectation). An expectation is
# {"rejected": {line: reason regex}} (the rest of the lines must be in shards) or {"error": [regexes]}.
def _merged():
    lines = _csv_text(_rows()).splitlines(keepends=True)
    lines[6] = '"' + lines[6]  # a stray quote opens a field at line 7 ...
    lines[8] = lines[8].replace(",", '",')  # ... that line 9 closes: 3 lines read as one row by any CSV reader
    return "".join(lines).encode()


def _unclosed():
    lines = _csv_text(_rows()).splitlines(keepends=True)
    lines[38] = '"' + lines[38]  # line 39 opens a quote that never closes: lines 39-41
    return "".join(lines).encode()


def _parquet_list_text(path):
    pq.write_table(pa.table({"text": [["a", "b"]] * N, "label": [lab for _, lab in _rows()]}), path)


def _one_bad_line():
    data = _csv_text(_rows(200)).encode()
    lines = data.split(b"\n")
    lines[50] = lines[50].replace(b"review", b"r\xe9view")  # one line of Latin-1 among 200 UTF-8 ones
    return b"\n".join(lines)


ROWS_ZH = [(f"第{i}条评论{'很差' if i % 2 == 0 else '很好'}", "差评" if i % 2 == 0 else "好评") for i in range(N)]

CASES = {
    "merged rows": ("t.csv", _merged(), {}, {"rejected": {
        k: r"merged rows: the '\"' at line 7 opens a quoted field that runs to line 9" for k in (7, 8, 9)}}),
    "unclosed quote": ("t.csv", _unclosed(), {}, {"rejected": {
        k: r"unclosed quote: the '\"' at line 39 is never closed .* line 41" for k in (39, 40, 41)}}),
    "CR-only line ends": ("t.csv", _csv_text(_rows(), end="\r").encode(), {}, {"rejected": {}}),
    "CRLF and a BOM": ("t.csv", b"\xef\xbb\xbf" + _csv_text(_rows(), end="\r\n").encode(), {}, {"rejected": {}}),
    "ragged TSV": ("t.tsv", _csv_text(_rows(), sep="\t").replace("says good\tpos\n", "says\tgood\tpos\n", 1)
                   .encode(), {}, {"rejected": {3: r"wrong number of fields: line 3 has 3 fields, the header 2; "
                                                 r"TSV has no quoting"}}),
    "unquoted comma in CSV": ("t.csv", _csv_text(_rows()).replace("number 4 says", "number 4, says").encode(), {},
                              {"rejected": {6: r"line 6 has 3 fields, the header 2; quote a text that holds ','"}}),
    "one non-UTF-8 line among 200": ("t.csv", _one_bad_line(), {}, {"rejected": {51: r"undecodable bytes"}}),
    "classes named None and null": ("t.csv", _csv_text(_rows(labels=("None", "null"))).encode(), {},
                                    {"rejected": {}, "labels": ["None", "null"]}),
    "a listed label never occurs": ("t.csv", _csv_text(_rows()).encode(), {"labels": ("neg", "pos", "meh")}, {
        "rejected": {}, "warning": r"label 'meh' of data.labels occurs in no training row"}),
    "labels that match no row": ("t.csv", _csv_text(_rows()).encode(), {"labels": ("yes", "no")}, {"error": [
        r"t\.csv: the training rows have 0 class", r"40 training rows were rejected \(20x unknown label 'neg'; "
        r"20x unknown label 'pos'", r"rejects\.parquet\); check data\.labels"]}),
    "a label listed twice": ("t.csv", _csv_text(_rows()).encode(), {"labels": ("pos", "pos")}, {"error": [
        r"data\.labels lists 'pos' more than once", r"list each class once"]}),
    "too few rows": ("t.csv", _csv_text(_rows(6)).encode(), {}, {"error": [
        r"t\.csv: only 6 training rows are left after ingest; at least 10 are needed"]}),
    "header only": ("t.csv", b"text,label\n", {}, {"error": [r"t\.csv: no data rows", "add labelled rows"]}),
    "GBK bytes": ("t.csv", _csv_text(ROWS_ZH).encode("gbk"), {}, {"error": [
        r"t\.csv: not UTF-8: 40 rows", r"the first at byte 11 \(line 2\)", "looks like GBK", "iconv -f GB18030"]}),
    "Latin-1 bytes": ("t.csv", _csv_text([(f"caf\u00e9 {t}", lab) for t, lab in _rows()]).encode("latin-1"), {},
                      {"error": [r"t\.csv: not UTF-8", r"byte 14 \(line 2\)", "Latin-1"]}),
    "UTF-16 with a BOM": ("t.csv", _csv_text(_rows()).encode("utf-16"), {}, {"error": [
        r"t\.csv: the file is UTF-16-LE \(byte order mark at byte 0\)", "save it as UTF-8"]}),
    "UTF-16 without a BOM": ("t.tsv", _csv_text(_rows(), sep="\t").encode("utf-16-be"), {}, {"error": [
        r"t\.tsv: the file looks like UTF-16-BE"]}),
    "a list-typed Parquet text column": ("t.parquet", _parquet_list_text, {}, {"error": [
        r"t\.parquet: column 'text' holds list<element: string> values, not text; set data\.text_column"]}),
    "a directory as the file": ("t.csv", "dir", {}, {"error": [r"t\.csv: is a directory"]}),
}


def _shard_lines(run: str, res: dict) -> list[int]:
    return [r for d in res["shards"] for r in read_shard(run, ShardRef.from_dict(d)).column("source_row").to_pylist()]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_quarantined_line_by_line_or_refused_in_one_line(tmp_path, case):
    name, data, overrides, want = CASES[case]
    path = tmp_path / name
    if data == "dir":
        path.mkdir()
    elif callable(data):
        data(path)
    else:
        path.write_bytes(data)
    run = str(tmp_path / "run")
    params = IngestParams(train=str(path), **overrides)
    if "error" in want:
        with pytest.raises(InputError) as e:
            ingest(run, params)
        msg = str(e.value)
        assert "\n" not in msg and "\r" not in msg and len(msg) < 600, msg
        for pattern in want["error"]:
            assert re.search(pattern, msg), (pattern, msg)
        if "rejects.parquet" in msg:  # written before the error, so the user can see why
            assert pq.read_table(os.path.join(run, "ingest", "rejects.parquet")).num_rows > 0
        return
    res = ingest(run, params)
    rejected = pq.read_table(os.path.join(run, "ingest", "rejects.parquet")).to_pylist()
    kept = _shard_lines(run, res)
    expected = _source_lines(path.read_bytes())
    assert sorted(kept + [r["source_row"] for r in rejected]) == expected  # every source line exactly once
    assert {r["source_row"]: r["reason"] for r in rejected}.keys() == want["rejected"].keys()
    for r in rejected:
        assert re.search(want["rejected"][r["source_row"]], r["reason"]), r["reason"]
        assert r["source_file"] == str(path) and "\n" not in r["reason"]
    if "labels" in want:
        assert res["labels"] == want["labels"]
    if "warning" in want:
        assert any(re.search(want["warning"], w) for w in res["warnings"]), res["warnings"]
    else:
        assert res["warnings"] == []


def test_a_test_file_that_holds_every_train_row_is_refused_naming_the_reason(tmp_path):
    data = _csv_text(_rows()).encode()
    (tmp_path / "train.csv").write_bytes(data)
    (tmp_path / "test.csv").write_bytes(data)
    with pytest.raises(InputError) as e:
        ingest(str(tmp_path / "run"), IngestParams(train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv")))
    msg = str(e.value)
    assert re.search(r"train\.csv: the training rows have 0 class.* 40 training rows were rejected \(40x exact "
                     r"duplicate of test row .*test\.csv; see .*rejects\.parquet\); data\.test holds the training rows",
                     msg), msg


def test_merged_rows_in_jsonl_are_not_a_thing_but_a_broken_line_is_quarantined(tmp_path):
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in _rows()]
    lines[4] = lines[4][:-3]  # a truncated line
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    res = ingest(str(tmp_path / "run"), IngestParams(train=str(path)))
    rejected = pq.read_table(tmp_path / "run" / "ingest" / "rejects.parquet").to_pylist()
    assert [(r["source_row"], r["reason"]) for r in rejected] == [(5, "line is not valid JSON")]
    assert sorted(_shard_lines(str(tmp_path / "run"), res)) == [i for i in range(1, N + 1) if i != 5]


# --- the config -----------------------------------------------------------------------------------------------

def _config(tmp_path, text: str | bytes) -> Path:
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize("text,patterns", [
    ("data: [train.csv]\n", [r"c\.yaml: `data` must be a mapping", r"data: \{train: train\.csv\}"]),
    ("data: {train: t.csv, labels: [pos, pos]}\n", [r"data\.labels: .*lists 'pos' more than once"]),
    ("data: {train: sub}\n", [r"data\.train is a directory \(.*sub\); name a file in it"]),
    ("name: r\u00e9\ndata: {train: t.csv}\n".encode("latin-1"), [r"c\.yaml is not UTF-8 \(byte 7 is 0xe9\)"]),
    ("data: {train: t.csv\n", [r"c\.yaml is not valid YAML at line 2"]),
    ("data: {train: t.csv}\nteacher: {modle: x}\nshards: {rows: 0}\n",
     [r"invalid config .*c\.yaml: ", r"teacher\.modle: unknown key \(check the spelling; valid keys in teacher: model,",
      r"shards\.rows: Input should be greater than 0"]),
])
def test_config_errors_are_one_line_naming_the_key_and_the_fix(tmp_path, text, patterns):
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg, msg
    for pattern in patterns:
        assert re.search(pattern, msg), (pattern, msg)


def test_a_tilde_in_a_data_path_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(_config(tmp_path, "data: {train: ~/data/train.csv}\n"))
    assert cfg.data.train == str(tmp_path / "home" / "data" / "train.csv")


# --- the CLI: one line on stderr, no traceback ------------------------------------------------------------------

def test_slimflow_ingest_on_bad_input_prints_one_error_line_and_no_traceback(tmp_path):
    (tmp_path / "train.csv").write_bytes(_csv_text(_rows()).encode())
    cfg = _config(tmp_path, yaml.safe_dump({"name": "bad", "data": {"train": "train.csv", "labels": ["yes", "no"]}}))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    p = subprocess.run([sys.executable, "-m", "slimflow.flows.cli", "ingest", str(cfg), "--out", str(tmp_path / "run")],
                       capture_output=True, env=env, timeout=600, cwd=Path(__file__).parents[2])
    stderr = p.stderr.decode("utf-8")  # bytes: text mode would turn the bar's \r into line breaks
    assert p.returncode == 1, stderr[-3000:]
    # One line: the stage's progress bar redraws itself within it (\r) and clears itself; Prefect's INFO lines
    # are off the console unless --verbose; no traceback.
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert len(lines) == 1, stderr[-5000:]
    error = lines[0].split("\r")[-1]
    assert re.match(r"slimflow: error: .*train\.csv: the training rows have 0 class.*check data\.labels", error)
    assert (tmp_path / "run" / "ingest" / "rejects.parquet").exists()


# --- slimflow predict: one output line per input line, whatever the bytes ----------------------------------------

class _StubPredictor:
    """Stands in for an exported student: the contract under test is line accounting, and that no text the
    model sees holds bytes that are not UTF-8 (the real tokenisers failed on them: 'surrogates not allowed')."""

    batches: list[int] = []

    def __init__(self, model_dir, backend="auto", batch_size=256):
        pass

    def predict(self, texts):
        for t in texts:
            t.encode("utf-8")  # raises on a lone surrogate, as the tokenisers did
        _StubPredictor.batches.append(len(texts))
        labels = ["pos" if len(t) % 2 else "neg" for t in texts]  # Predictor.predict: (labels, [N, C] probs)
        return labels, np.array([[0.25, 0.75] if lab == "pos" else [0.75, 0.25] for lab in labels])


def _stdin(data: bytes):
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


@pytest.mark.parametrize("batch_size", [1, 10, 256])
@pytest.mark.parametrize("strict", [False, True])
def test_predict_answers_every_line_in_order_and_marks_the_undecodable_ones(monkeypatch, capsys, batch_size, strict):
    from slimflow.flows.cli import main
    from slimflow.tasks.students import export

    monkeypatch.setattr(export, "Predictor", _StubPredictor)
    lines = [f"第{i}行 text {i}".encode() for i in range(200)]
    for k in (0, 99, 150):
        lines[k] = b"\xff\xfe binary \x00\x81 line"
    lines[120] = b"\x89PNG\r\n\x1a"[:4] + "半个字".encode()[:-1]  # a character cut in half
    bad = {0, 99, 120, 150}
    monkeypatch.setattr(sys, "stdin", _stdin(b"\n".join(lines) + b"\r\n"))
    rc = main(["predict", "model-dir", "--batch-size", str(batch_size)] + (["--strict"] if strict else []))
    out, err = capsys.readouterr()
    assert rc == (1 if strict else 0)
    got = out.split("\n")
    assert got[-1] == "" and len(got) == 201  # 200 lines, each ended
    for i, line in enumerate(got[:-1]):
        text, label, conf = line.split("\t")
        if i in bad:
            assert label == "!error" and conf.startswith("not UTF-8 (byte "), line
        else:
            assert text == f"第{i}行 text {i}" and label in ("pos", "neg") and conf == "0.7500"
    assert err.count("\n") == 1 and "4 input line(s) are not UTF-8 (line 1, 100, 121, 151)" in err


@pytest.mark.parametrize("value", ["0", "-5", "ten"])
def test_predict_refuses_a_batch_size_below_one(capsys, value):
    from slimflow.flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["predict", "model-dir", "--batch-size", value])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
