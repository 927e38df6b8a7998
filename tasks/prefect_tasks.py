"""The Prefect face of the stage functions: names, retries, cache keys. No logic lives here.

Cache keys hash (task, code version, every parameter): the parameters carry the input shards' content hashes,
the stage params and the run directory, so a rerun with nothing changed is all cache hits, and one edited
input shard changes the key of exactly the tasks downstream of it. Results (a shard's path, rows and hash)
are persisted as JSON so the cache survives across processes; the flows check each cached shard against the
disk before trusting it (storage is the ground truth; this cache only mirrors it).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext

from storage.hashing import fingerprint, hash_source_files
from storage.shards import ShardRef

_ROOT = Path(__file__).resolve().parent.parent
_STORAGE = [_ROOT / "storage" / n for n in ("schema.py", "shards.py", "readers.py")]


def code_version(*modules: str) -> str:
    """Hash of the given ``tasks/`` modules plus the storage format: a code change invalidates the cache."""
    return hash_source_files([_ROOT / "tasks" / m for m in modules] + _STORAGE)


# Parameters that change how fast a task runs, never what it writes: kept out of the cache key.
_NOT_IN_KEY = frozenset({"workers", "shard"})


def _cache_key(modules: tuple[str, ...]):
    version = code_version(*modules)

    def key(context: TaskRunContext, parameters: dict) -> str:
        kept = {k: v for k, v in parameters.items() if k not in _NOT_IN_KEY}
        return fingerprint(context.task.name, version, kept)

    return key


# Retries are for transient failures (a flaky filesystem, a pre-empted worker); a deterministic error
# fails the same way three times, which costs seconds, not a silent skip.
_COMMON = dict(persist_result=True, result_serializer="json", retries=2, retry_delay_seconds=[2, 10])


@task(name="ingest", cache_key_fn=_cache_key(("ingest.py",)), **_COMMON)
def ingest_task(run_dir: str, params: dict, input_hashes: dict) -> dict:
    from tasks.ingest import IngestParams, ingest

    p = dict(params)
    if p.get("labels") is not None:
        p["labels"] = tuple(p["labels"])
    return ingest(run_dir, IngestParams(**p))


@task(name="segment", task_run_name="segment-{shard}", cache_key_fn=_cache_key(("segment.py",)), **_COMMON)
def segment_task(run_dir: str, shard: str, ref: dict, lang: str, workers: int | None = None) -> dict:
    from tasks.segment import segment_shard

    return segment_shard(run_dir, ShardRef.from_dict(ref), lang, workers).to_dict()


@task(name="pos-table", cache_key_fn=_cache_key(("augment.py",)), **_COMMON)
def pos_table_task(run_dir: str, refs: list[dict], min_count: int) -> dict:
    from tasks.augment import build_pos_table

    return build_pos_table(run_dir, [ShardRef.from_dict(r) for r in refs], min_count)


@task(name="augment", task_run_name="augment-{shard}", cache_key_fn=_cache_key(("augment.py",)), **_COMMON)
def augment_task(run_dir: str, shard: str, ref: dict, table: dict, params: dict) -> dict:
    from tasks.augment import AugmentParams, augment_shard

    p = {**params, "ngram": tuple(params["ngram"])}
    return augment_shard(run_dir, ShardRef.from_dict(ref), table, AugmentParams(**p)).to_dict()
