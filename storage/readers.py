"""Input readers: CSV, TSV, JSONL and Parquet into one shape, with nothing silently dropped.

Every row read comes back, including the unreadable ones: a row whose bytes are not UTF-8 is returned with
its text decoded lossily and a ``problem`` so ingest can quarantine it with a reason. Structural
problems (missing file, missing column, a file that is not the declared format) raise :class:`InputError`
with a message naming the file and what to do.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

from storage.fs import exists, read_bytes

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}


BAD_BYTES = "undecodable bytes (not UTF-8)"
BAD_JSON = "line is not valid JSON"
NOT_TEXT = "text is not a string"
NOT_LABEL = "label is not a single value"


class InputError(ValueError):
    """An input file cannot be read as declared; the message says which file and how to fix it."""


@dataclass
class RawRows:
    """Column-oriented rows as read: ``row`` is the 1-based data row (not counting a header)."""

    file: str
    text: list[str | None]
    label: list[object]
    row: list[int]
    problem: list[str | None]  # a reader-level reason to quarantine the row (bad bytes, broken line)


def detect_format(path: str) -> str:
    lower = path.lower()
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext) or lower.endswith(ext + ".gz"):
            return fmt
    raise InputError(f"{path}: unknown file type; use .csv, .tsv, .jsonl or .parquet")


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _read_delimited(path: str, data: bytes, sep: str, text_col: str, label_col: str | None) -> RawRows:
    import polars as pl

    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM would otherwise become part of the first header
        data = data[3:]
    try:
        # Everything as strings: labels like "1" and "1.0" are normalised by ingest, not guessed here.
        # utf8-lossy keeps rows with bad bytes (as U+FFFD) so they can be quarantined, not lost.
        df = pl.read_csv(io.BytesIO(data), separator=sep, infer_schema=False, encoding="utf8-lossy",
                         quote_char=None if sep == "\t" else '"', truncate_ragged_lines=False)
    except Exception as e:  # polars raises several error types for malformed input
        raise InputError(f"{path}: not a readable {'TSV' if sep == chr(9) else 'CSV'} file ({e}). "
                         "Check the delimiter and quoting, or convert it to JSONL.") from e
    _require(path, df.columns, text_col, label_col)
    text = df[text_col].to_list()
    # Which rows had undecodable bytes: decode each raw line strictly is costly; U+FFFD only appears after
    # a lossy decode (or when the author typed it, which is as unusable for a teacher).
    bad = [BAD_BYTES if t is not None and "\ufffd" in t else None for t in text]
    labels = df[label_col].to_list() if label_col else [None] * len(text)
    return RawRows(path, text, labels, list(range(1, len(text) + 1)), bad)


def _read_jsonl(path: str, data: bytes, text_col: str, label_col: str | None) -> RawRows:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text, labels, rows, bad = [], [], [], []
    lines = data.split(b"\n")
    n_obj = 0
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        line, lossy = _decode(raw.rstrip(b"\r"))
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if n_obj == 0 and i == 1:
                raise InputError(f"{path}: line 1 is not JSON ({e.msg}); is this file really JSONL?") from e
            text.append(line)
            labels.append(None)
            rows.append(i)
            bad.append(BAD_JSON)
            continue
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {i} is a JSON {type(obj).__name__}; each line must be an object")
        n_obj += 1
        if n_obj == 1:
            _require(path, list(obj), text_col, label_col)
        t, lab = _cell_text(obj.get(text_col)), obj.get(label_col) if label_col else None
        text.append(t)
        labels.append(lab)
        rows.append(i)
        bad.append(BAD_BYTES if lossy else _cell_problem(obj.get(text_col), lab))
    return RawRows(path, text, labels, rows, bad)


def _cell_text(value: object) -> str | None:
    """A text cell as a string: numbers are written out; lists, dicts and bytes are not text (see _cell_problem)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return _decode(bytes(value))[0]
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)  # kept for rejects.parquet, never ingested


def _cell_problem(text: object, label: object) -> str | None:
    if isinstance(text, bytes | bytearray) and _decode(bytes(text))[1]:
        return BAD_BYTES
    if text is not None and not isinstance(text, str | bytes | bytearray | bool | int | float):
        return f"{NOT_TEXT} (got {type(text).__name__})"
    if isinstance(label, list | dict | tuple):
        return f"{NOT_LABEL} (got {type(label).__name__})"
    return None


def _read_parquet(path: str, data: bytes, text_col: str, label_col: str | None) -> RawRows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from e
    _require(path, table.column_names, text_col, label_col)
    col = table.column(text_col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        # Parquet does not validate UTF-8: read the bytes and decode them here, so bad rows are quarantined.
        col = col.cast(pa.large_binary())
    raw = col.to_pylist()
    labels = table.column(label_col).to_pylist() if label_col else [None] * len(raw)
    problems = [_cell_problem(t, lab) for t, lab in zip(raw, labels)]
    return RawRows(path, [_cell_text(t) for t in raw], labels, list(range(1, len(raw) + 1)), problems)


def _require(path: str, columns: list[str], text_col: str, label_col: str | None) -> None:
    for col, key in ((text_col, "text_column"), (label_col, "label_column")):
        if col is not None and col not in columns:
            shown = ", ".join(columns[:12]) + (" ..." if len(columns) > 12 else "")
            raise InputError(f"{path}: column {col!r} not found (columns: {shown}); set data.{key}")


def read_rows(path: str, text_col: str, label_col: str | None) -> RawRows:
    """Read every row of ``path``; ``label_col=None`` for unlabelled text."""
    fmt = detect_format(path)
    if not exists(path):
        raise InputError(f"{path}: file not found; check the data paths in the config")
    data = read_bytes(path)
    if path.lower().endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    if fmt == "csv":
        return _read_delimited(path, data, ",", text_col, label_col)
    if fmt == "tsv":
        return _read_delimited(path, data, "\t", text_col, label_col)
    if fmt == "jsonl":
        return _read_jsonl(path, data, text_col, label_col)
    return _read_parquet(path, data, text_col, label_col)


def normalise_label(value: object) -> str | None:
    """Label values as names: 1, 1.0 and "1" are all "1"; None, NaN and blank are missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        v = value.strip()
        if not v or v.lower() in ("nan", "null", "none"):
            return None
        try:
            f = float(v)
        except ValueError:
            return v
        return str(int(f)) if f.is_integer() and not math.isinf(f) else v
    return None  # lists, dicts: not a label; ingest reports it as missing
