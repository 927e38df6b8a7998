import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slimflow.storage.readers import BAD_BYTES, BAD_JSON, InputError, normalise_label, read_rows


def test_csv_with_bom_and_crlf(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes("\ufefftext,label\r\n好,pos\r\n\"a, b\",neg\r\n".encode())
    r = read_rows(str(p), "text", "label")
    assert r.text == ["好", "a, b"] and r.label == ["pos", "neg"] and r.row == [2, 3]  # lines: the header is 1
    assert r.problem == [None, None]


def test_tsv_and_invalid_utf8_row_is_kept_and_flagged(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_bytes(b"text\tlabel\ngood\t1\nbad \xff\xfe bytes\t0\n")
    r = read_rows(str(p), "text", "label")
    assert len(r.text) == 2 and r.problem == [None, BAD_BYTES]


def test_jsonl_mixed_types_and_broken_line(tmp_path):
    p = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": "x", "label": 1}), "{broken", json.dumps({"text": "y", "label": None}),
             json.dumps({"text": 5, "label": "b"})]
    p.write_text("\n".join(lines) + "\n")
    r = read_rows(str(p), "text", "label")
    assert r.text == ["x", "{broken", "y", "5"]
    assert r.problem == [None, BAD_JSON, None, None]
    assert r.row == [1, 2, 3, 4]


def test_parquet(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"t": ["x", None], "l": [1, 2]}), p)
    r = read_rows(str(p), "t", "l")
    assert r.text == ["x", None] and r.label == [1, 2]


@pytest.mark.parametrize("content,match", [
    ("text,label\nx,1\n", "column 'body' not found"),
])
def test_missing_column_names_the_file_and_the_fix(tmp_path, content, match):
    p = tmp_path / "a.csv"
    p.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        read_rows(str(p), "body", "label")
    assert "a.csv" in str(e.value) and "data.text_column" in str(e.value)


def test_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_rows(str(tmp_path / "nope.csv"), "text", "label")
    with pytest.raises(InputError, match="unknown file type"):
        read_rows(str(tmp_path / "x.docx"), "text", "label")
    p = tmp_path / "fake.jsonl"
    p.write_text("text,label\nx,1\n")
    with pytest.raises(InputError, match="really JSONL"):
        read_rows(str(p), "text", "label")
    q = tmp_path / "fake.parquet"
    q.write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet"):
        read_rows(str(q), "text", "label")


@pytest.mark.parametrize("raw,want", [(1, "1"), (1.0, "1"), ("1.0", "1"), (" pos ", "pos"), (float("nan"), None),
                                      ("", None), (None, None), (2.5, "2.5"), ([1], None),
                                      # only an empty cell is missing: these are class names (issue 12)
                                      ("NaN", "NaN"), ("None", "None"), ("null", "null"), (" none ", "none")])
def test_normalise_label(raw, want):
    assert normalise_label(raw) == want
