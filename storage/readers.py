"""Input readers: CSV, TSV, JSONL and Parquet into one shape, with nothing silently dropped or merged.

Every row read comes back, including the unreadable ones: a row with bytes that are not UTF-8, a line of broken
JSON, a line with the wrong number of fields, or lines swallowed by a stray quote each come back with a
``problem`` so ingest can quarantine them with a reason. Whole-file problems (missing file, a directory, a
missing column, a file in another encoding or format) raise :class:`InputError` with a one-line message that
names the file, where, and what to do.

Row numbers (``RawRows.row``) are the lines a user can open in an editor: for CSV and TSV the line a record
starts on (the header is line 1), for JSONL the line; for Parquet the 1-based row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass

from slimflow.storage.fs import exists, read_bytes

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}


BAD_BYTES = "undecodable bytes (not UTF-8)"
BAD_JSON = "line is not valid JSON"
NOT_TEXT = "text is not a string"
NOT_LABEL = "label is not a single value"
MERGED = "merged rows"
UNCLOSED = "unclosed quote"
RAGGED = "wrong number of fields"

_UTF8_BOM = b"\xef\xbb\xbf"
_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32-BE"), (b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\xfe\xff", "UTF-16-BE"),
         (b"\xff\xfe", "UTF-16-LE"))
# Bytes that are not UTF-8 are decoded with surrogateescape: each becomes one of U+DC80..U+DCFF, which no valid
# UTF-8 decodes to, so a row's text says exactly whether its bytes were bad.
_ESCAPED = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # also lone ones from JSON escapes ("\\ud800"): not Unicode text
_LINE_END = re.compile(r"\r\n|\r|\n")
_SHOW = 60  # characters of user data quoted in a message at most: a message is one line, never the file


class InputError(ValueError):
    """An input file cannot be read as declared; the message says which file and how to fix it."""


@dataclass
class RawRows:
    """Column-oriented rows as read; ``row`` is the source line (CSV/TSV/JSONL) or 1-based row (Parquet)."""

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


def shorten(value: object, n: int = _SHOW) -> str:
    """``repr`` of user data cut to ``n`` characters, for one-line messages."""
    s = value if isinstance(value, str) else str(value)
    return repr(s[:n] + "...") if len(s) > n else repr(s)


def guess_encoding(data: bytes) -> tuple[str, str]:
    """``(what it looks like, iconv name)`` for bytes that are not UTF-8.

    Runs of non-ASCII bytes: a one-byte code page (Latin-1, cp1252) has mostly single high bytes between ASCII
    ones ("caf\\xe9 "); the CJK double-byte encodings have them in pairs. Then the first CJK codec that
    decodes the sample strictly wins (GB18030 first: it covers GBK and GB2312).
    """
    sample = data[:65536]
    sample = sample[: sample.rfind(b"\n") + 1] or sample  # whole lines: no character cut in half
    runs = re.findall(rb"[\x80-\xff]+", sample)
    if runs and sum(len(r) % 2 for r in runs) * 2 > len(runs):
        return "Latin-1 / cp1252", "CP1252"
    for codec, name, iconv in (("gb18030", "GBK / GB18030", "GB18030"), ("big5", "Big5", "BIG5"),
                               ("shift_jis", "Shift-JIS", "SHIFT-JIS"), ("euc_kr", "EUC-KR", "EUC-KR")):
        try:
            sample.decode(codec)
        except UnicodeDecodeError:
            continue
        return name, iconv
    return "Latin-1 / cp1252", "CP1252"


def _not_text(path: str, data: bytes) -> None:
    """Refuse, by their first bytes, files that are not UTF-8 text at all."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise InputError(f"{path}: the file is {name} (byte order mark at byte 0), not UTF-8; save it as "
                             f"UTF-8 (e.g. `iconv -f {name} -t UTF-8`)")
    if data.startswith(b"PAR1"):
        raise InputError(f"{path}: this is a Parquet file (it starts with PAR1); name it .parquet")
    if data.startswith(b"\x1f\x8b"):
        raise InputError(f"{path}: the file is gzip-compressed; name it with a .gz suffix (e.g. train.csv.gz)")
    head = data[:4096]
    if len(head) >= 8:
        for name, zeros in (("UTF-16-LE", head[1::2]), ("UTF-16-BE", head[0::2])):
            if zeros.count(0) >= 0.9 * len(zeros):  # ASCII in UTF-16: every other byte is NUL
                raise InputError(f"{path}: the file looks like {name} (every other byte is NUL), not UTF-8; save "
                                 f"it as UTF-8 (e.g. `iconv -f {name} -t UTF-8`)")


def _first_bad_byte(path: str, data: bytes, base: int) -> tuple[int, int]:
    """(byte offset in the file, line) of the first byte that is not UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8")
        return base + e.start, len(_LINE_END.findall(before)) + 1
    raise AssertionError(f"{path} decodes as UTF-8")


def _check_encoding(path: str, data: bytes, base: int, bad: int, good_non_ascii: int) -> None:
    """A file whose non-ASCII rows are mostly not UTF-8 is in another encoding: one error, not a reject per row.

    A few bad rows among UTF-8 ones (a damaged line) are quarantined instead. ``bad``: rows with bytes that are
    not UTF-8; ``good_non_ascii``: rows with valid non-ASCII UTF-8.
    """
    if bad < 2 or bad <= good_non_ascii:
        return
    offset, line = _first_bad_byte(path, data, base)
    looks, iconv = guess_encoding(data)
    if b"\x00" in data[:4096]:
        raise InputError(f"{path}: binary data, not text (bytes that are not UTF-8 from byte {offset}, line "
                         f"{line}, and NUL bytes); give a CSV, TSV, JSONL or Parquet file")
    raise InputError(f"{path}: not UTF-8: {bad} rows hold bytes that are not UTF-8, the first at byte {offset} "
                     f"(line {line}); it looks like {looks}. Save it as UTF-8 (e.g. `iconv -f {iconv} -t UTF-8`)")


def _decode(data: bytes) -> tuple[str, bool]:
    """UTF-8 text, bad bytes kept as lone surrogates (see ``_ESCAPED``); and whether there were any."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape"), True


def _clean(text: str) -> str:
    """Escaped bad bytes as U+FFFD: what rejects.parquet can hold and a person can read."""
    return _SURROGATE.sub("\ufffd", text)


def _non_ascii_kind(values: list[str]) -> int:
    """0: ASCII only; 1: valid non-ASCII UTF-8; 2: bytes that are not UTF-8."""
    kind = 0
    for v in values:
        if v.isascii():
            continue
        if _ESCAPED.search(v):
            return 2
        kind = 1
    return kind


def _read_delimited(path: str, data: bytes, sep: str, text_col: str, label_col: str | None,
                    labels: tuple[str, ...] | None) -> RawRows:
    _not_text(path, data)
    base = 0
    if data.startswith(_UTF8_BOM):  # a UTF-8 BOM would otherwise become part of the first header
        data, base = data[3:], 3
    text, _ = _decode(data)
    # Lines as an editor counts them: "\r\n", "\r" (old Mac files) and "\n" each end one.
    lines = io.StringIO(text, newline="").readlines()
    fmt = "TSV" if sep == "\t" else "CSV"
    # TSV has no quoting (a tab cannot occur in a field); in CSV, '"' quotes as RFC 4180 says.
    reader = csv.reader(iter(lines), delimiter=sep, quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,
                        strict=False)
    csv.field_size_limit(2**31 - 1)  # a long text is ingest's to quarantine (data.max_chars), not a parse error
    records: list[tuple[int, int, list[str]]] = []  # (first line, last line, fields)
    prev = 0
    for fields in reader:
        start, prev = prev + 1, reader.line_num
        if fields:  # [] is a blank line
            records.append((start, prev, fields))
    if not records:
        raise InputError(f"{path}: the file is empty (no header line); give a {fmt} file with a header "
                         f"(e.g. text,label)")
    header = records[0][2]
    body = records[1:]
    kinds = [_non_ascii_kind(f) for _, _, f in body]
    _check_encoding(path, data, base, kinds.count(2), kinds.count(1))
    _require(path, header, text_col, label_col)
    n_cols = len(header)
    ti = header.index(text_col)
    li = header.index(label_col) if label_col else None
    if labels is None and li is not None:  # the labels that single-line rows carry: what a row looks like here
        labels = tuple({normalise_label(f[li]) for a, b, f in body if a == b and len(f) == n_cols} - {None})
    known = set(labels or ())

    def row_like(piece: str) -> bool:
        fields = next(csv.reader([piece], delimiter=sep), [])
        return len(fields) == n_cols and normalise_label(fields[li]) in known

    out = RawRows(path, [], [], [], [])

    def add(t, lab, row, problem):
        out.text.append(t)
        out.label.append(lab)
        out.row.append(row)
        out.problem.append(problem)

    for i, (a, b, fields) in enumerate(body):
        problem = None
        if sep == "," and b == len(lines) and _opens_quote(lines[a - 1]) and "".join(lines[a - 1 : b]).count('"') % 2:
            problem = (f"{UNCLOSED}: the '\"' at line {a} is never closed (the field runs to the end of the file, "
                       f"line {b}); close it, or double it (\"\") inside a quoted text")
        elif b > a and li is not None and known:
            if any(row_like(piece) for f in fields if _LINE_END.search(f) for piece in _LINE_END.split(f)):
                problem = (f"{MERGED}: the '\"' at line {a} opens a quoted field that runs to line {b}, and a line "
                           f"inside it reads as a row of its own (text{sep}label); close the quote on line {a}, "
                           "or double it (\"\") inside a quoted text")
        if problem:  # every source line of the record is quarantined on its own, where a user can find it
            for k in range(a, b + 1):
                add(_clean(lines[k - 1].rstrip("\r\n")), None, k, problem)
            continue
        if len(fields) != n_cols:
            hint = ("TSV has no quoting, so a tab inside a text splits it: remove tabs from texts, or use CSV or "
                    "JSONL" if sep == "\t" else "quote a text that holds ',' (\"like, this\")")
            problem = f"{RAGGED}: line {a} has {len(fields)} fields, the header {n_cols}; {hint}"
        elif kinds[i] == 2 and _ESCAPED.search(fields[ti] + (fields[li] if li is not None else "")):
            problem = BAD_BYTES
        t = fields[ti] if ti < len(fields) else None
        lab = fields[li] if li is not None and li < len(fields) else None
        add(_clean(t) if t is not None else None, _clean(lab) if lab is not None else None, a, problem)
    return out


def _opens_quote(line: str) -> bool:
    """Whether a field on this line starts with '"' (a quote inside an unquoted field is a plain character)."""
    return re.search(r'(^|,)[ \t]*"', line) is not None


def _read_jsonl(path: str, data: bytes, text_col: str, label_col: str | None) -> RawRows:
    _not_text(path, data)
    base = 0
    if data.startswith(_UTF8_BOM):
        data, base = data[3:], 3
    text, labels, rows, bad = [], [], [], []
    lines = data.split(b"\n")
    n_obj = n_bad = n_good = 0
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        line, lossy = _decode(raw.rstrip(b"\r"))
        n_bad += lossy
        n_good += not lossy and not line.isascii()
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if n_obj == 0 and i == 1 and not lossy:
                raise InputError(f"{path}: line 1 is not JSON ({getattr(e, 'msg', e)}); is this file really "
                                 "JSONL?") from e
            text.append(_clean(line))
            labels.append(None)
            rows.append(i)
            bad.append(BAD_BYTES if lossy else BAD_JSON)
            continue
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {i} is a JSON {type(obj).__name__}; each line must be an object "
                             '({"text": ..., "label": ...})')
        n_obj += 1
        if n_obj == 1:
            _require(path, list(obj), text_col, label_col)
        t, lab = _cell_text(obj.get(text_col)), obj.get(label_col) if label_col else None
        text.append(_clean(t) if t is not None else None)
        labels.append(_clean(lab) if isinstance(lab, str) else lab)
        rows.append(i)
        bad.append(BAD_BYTES if lossy else _cell_problem(obj.get(text_col), lab))
    _check_encoding(path, data, base, n_bad, n_good)
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
    if isinstance(text, str) and _SURROGATE.search(text):
        return BAD_BYTES if _ESCAPED.search(text) else "text is not valid Unicode (a lone surrogate)"
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
    except Exception as e:  # pyarrow raises several error types for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({shorten(str(e), 120)}); check that it is "
                         "Parquet, or name it for its format (.csv, .tsv, .jsonl)") from e
    _require(path, table.column_names, text_col, label_col)
    for col, key in ((text_col, "text_column"), (label_col, "label_column")):
        if col is None:
            continue
        t = table.schema.field(col).type
        if pa.types.is_nested(t):
            what = "text" if key == "text_column" else "one label per row"
            raise InputError(f"{path}: column {col!r} holds {t} values, not {what}; set data.{key} to a column "
                             "of strings, or flatten it")
    col = table.column(text_col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        # Parquet does not validate UTF-8: read the bytes and decode them here, so bad rows are quarantined.
        col = col.cast(pa.large_binary())
    raw = col.to_pylist()
    labels = table.column(label_col).to_pylist() if label_col else [None] * len(raw)
    problems = [_cell_problem(t, lab) for t, lab in zip(raw, labels)]
    texts = [_cell_text(t) for t in raw]
    kinds = [_non_ascii_kind([t]) if isinstance(t, str) else 0 for t in texts]
    if kinds.count(2) >= 2 and kinds.count(2) > kinds.count(1):
        first = next(i for i, k in enumerate(kinds) if k == 2)
        looks, iconv = guess_encoding(b"\n".join(r for r in raw if isinstance(r, bytes)))
        raise InputError(f"{path}: column {text_col!r} is not UTF-8 in {kinds.count(2)} rows, the first at row "
                         f"{first + 1}; it looks like {looks}. Re-encode the texts as UTF-8 ({iconv} -> UTF-8)")
    return RawRows(path, [_clean(t) if t is not None else None for t in texts], labels,
                   list(range(1, len(raw) + 1)), problems)


def _require(path: str, columns: list[str], text_col: str, label_col: str | None) -> None:
    for col, key in ((text_col, "text_column"), (label_col, "label_column")):
        if col is not None and col not in columns:
            shown = ", ".join(shorten(c, 30) for c in columns[:12]) + (" ..." if len(columns) > 12 else "")
            raise InputError(f"{path}: column {col!r} not found (columns: {shown}); set data.{key}")


def read_rows(path: str, text_col: str, label_col: str | None, labels: tuple[str, ...] | None = None) -> RawRows:
    """Read every row of ``path``; ``label_col=None`` for unlabelled text.

    ``labels`` (the configured label names, if any) tell a CSV line that reads as a row of its own; without
    them, the labels of the file's single-line rows do.
    """
    fmt = detect_format(path)
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; the data paths in the config name files (CSV, TSV, JSONL or "
                         "Parquet)")
    if not exists(path):
        raise InputError(f"{path}: file not found; check the data paths in the config")
    data = read_bytes(path)
    if path.lower().endswith(".gz"):
        import gzip

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable gzip file ({e}); name it without .gz if it is not "
                             "compressed") from e
    if fmt == "csv":
        return _read_delimited(path, data, ",", text_col, label_col, labels)
    if fmt == "tsv":
        return _read_delimited(path, data, "\t", text_col, label_col, labels)
    if fmt == "jsonl":
        return _read_jsonl(path, data, text_col, label_col)
    return _read_parquet(path, data, text_col, label_col)


def normalise_label(value: object) -> str | None:
    """Label values as names: 1, 1.0 and "1" are all "1". Only an empty (or blank) cell, null and NaN numbers
    are missing: a class may be named "None", "null" or "NaN"."""
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
        if not v:
            return None
        try:
            f = float(v)
        except ValueError:
            return v
        if math.isnan(f):  # the name "NaN" or "nan" is a name, not a number
            return v
        return str(int(f)) if f.is_integer() and not math.isinf(f) else v
    return None  # lists, dicts: not a label; ingest reports it as missing
