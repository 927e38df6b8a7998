"""The pipeline as Prefect flows: one flow per stage, and ``slimflow-run`` composing them.

Each stage flow reads the previous stage's committed manifest, maps its shard tasks, and commits its own
manifest last. The flows only wire stages together; the work is in ``tasks/``.
"""

from __future__ import annotations

import time

from prefect import flow

from flows.config import Config
from flows.report import write_report
from flows.stages import StageResult, run_tasks
from storage.fs import atomic_write_text, exists, read_bytes
from storage.hashing import fingerprint, sha256_file
from storage.layout import RunLayout
from storage.manifest import Manifest, commit_manifest, read_manifest
from storage.readers import InputError
from storage.shards import ShardRef
from tasks.prefect_tasks import augment_task, code_version, ingest_task, pos_table_task, segment_task

PIPELINE = ("ingest", "segment", "augment")


class StageOrderError(RuntimeError):
    """A stage was asked to run before the stage it reads from was committed."""


def require(layout: RunLayout, stage: str, for_stage: str) -> Manifest:
    m = read_manifest(layout.stage_dir(stage))
    if m is None:
        raise StageOrderError(f"{for_stage} needs the {stage} stage of {layout.root}, which has not completed; "
                              f"run `slimflow {stage} CONFIG --out {layout.root}` (or `slimflow run`) first")
    return m


def _refs(results: list[dict]) -> list[ShardRef]:
    return [ShardRef.from_dict(r) for r in results]


@flow(name="ingest", flow_run_name="ingest-{config.name}")
def ingest_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """Read and validate the inputs; quarantine bad rows; split; write content-addressed shards."""
    layout = RunLayout(out)
    result = StageResult("ingest", rerun=rerun)
    d = config.data
    params = {
        "train": d.train, "dev": d.dev, "test": d.test, "unlabelled": d.unlabelled,
        "text_column": d.text_column, "label_column": d.label_column, "labels": d.labels,
        "dev_fraction": d.dev_fraction, "test_fraction": d.test_fraction, "split_seed": d.split_seed,
        "max_chars": d.max_chars, "shard_rows": config.shards.rows,
    }
    hashes = {}
    for key in ("train", "dev", "test", "unlabelled"):
        path = params[key]
        if path is not None:
            try:
                hashes[key] = sha256_file(path)
            except FileNotFoundError:
                raise InputError(f"data.{key}: file {path} not found; check the path in the config") from None
    (res,) = run_tasks(ingest_task, [dict(run_dir=out, params=params, input_hashes=hashes)], out, result,
                       "ingest")
    version = code_version("ingest.py")
    commit_manifest(
        layout.stage_dir("ingest"),
        Manifest("ingest", fingerprint("ingest", hashes, params, version), params, version, _refs(res["shards"]),
                 extra={k: res[k] for k in ("labels", "rows", "rejected", "reasons", "rejects")}),
        keep=("rejects.parquet",),
    )
    result.rows = {**res["rows"], "rejected": res["rejected"]}
    return result.to_dict()


@flow(name="segment", flow_run_name="segment-{config.name}")
def segment_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """Words + POS tags once per source row (jieba for zh, spaCy for en)."""
    layout = RunLayout(out)
    ing = require(layout, "ingest", "segment")
    result = StageResult("segment", rerun=rerun)
    calls = [dict(run_dir=out, shard=r.shard_id, ref=r.to_dict(), lang=config.lang,
                  workers=config.segment.workers) for r in ing.shards]
    refs = _refs(run_tasks(segment_task, calls, out, result, "segment"))
    version = code_version("segment.py")
    params = {"lang": config.lang}
    commit_manifest(layout.stage_dir("segment"),
                    Manifest("segment", fingerprint("segment", ing.fingerprint, params, version), params, version,
                             refs, extra={"labels": ing.extra["labels"]}))
    result.rows = {s: sum(r.rows for r in refs if r.split == s) for s in sorted({r.split for r in refs})}
    return result.to_dict()


@flow(name="augment", flow_run_name="augment-{config.name}")
def augment_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """UNK masking, same-POS substitution and n-gram sampling of the labelled train rows."""
    layout = RunLayout(out)
    seg = require(layout, "segment", "augment")
    result = StageResult("augment", rerun=rerun)
    params = config.augment.model_dump(mode="json")
    corpus = [r.to_dict() for r in seg.shards if r.split in ("train", "unlabelled")]
    (table,) = run_tasks(pos_table_task, [dict(run_dir=out, refs=corpus, min_count=config.augment.min_count)],
                         out, result, "pos-table")
    calls = [dict(run_dir=out, shard=r.shard_id, ref=r.to_dict(), table=table, params=params)
             for r in seg.split("train")]
    refs = _refs(run_tasks(augment_task, calls, out, result, "augment"))
    version = code_version("augment.py")
    commit_manifest(layout.stage_dir("augment"),
                    Manifest("augment", fingerprint("augment", seg.fingerprint, params, version), params, version,
                             refs, extra={"pos_table": table, "labels": seg.extra["labels"]}),
                    keep=(table["path"].split("/", 1)[1],))
    result.rows = {"augmented": sum(r.rows for r in refs)}
    result.extra = {"pos_table_words": table["rows"]}
    return result.to_dict()


STAGE_FLOWS = {"ingest": ingest_flow, "segment": segment_flow, "augment": augment_flow}


def run_stages(config: Config, out: str, stages: list[str], rerun: dict | None = None) -> dict:
    """Run ``stages`` in order and merge their results into the report.

    ``rerun`` ({"stage", "shards"}) forces those tasks to recompute, and with them every task downstream that
    reads one of their outputs (`slimflow rerun`).
    """
    layout = RunLayout(out)
    atomic_write_text(layout.path("config.json"), config.model_dump_json(indent=1))  # what `rerun` reloads
    results = []
    for stage in stages:
        t0 = time.perf_counter()
        res = STAGE_FLOWS[stage](config=config, out=out, rerun=rerun)
        res["seconds"] = round(time.perf_counter() - t0, 3)
        if rerun is not None:
            rerun = {**rerun, "dirty": sorted(set(rerun.get("dirty", ())) | set(res["refreshed"]))}
        results.append(res)
    return write_report(layout, config, results)


def rerun_stages(out: str, stage: str, shards: list[str] | None = None) -> dict:
    """Recompute ``stage`` (only ``shards`` of it, when given) and everything downstream that depends on it,
    up to the last stage the run directory had completed."""
    layout = RunLayout(out)
    path = layout.path("config.json")
    if not exists(path):
        raise StageOrderError(f"{out} has no config.json: it is not a slimflow run directory (or predates it)")
    config = Config.model_validate_json(read_bytes(path))
    if stage not in PIPELINE:
        raise ValueError(f"--stage {stage!r} is not a stage; choose one of: {', '.join(PIPELINE)}")
    done = [s for s in PIPELINE if read_manifest(layout.stage_dir(s)) is not None]
    if stage not in done:
        raise StageOrderError(f"stage {stage} of {out} has not completed; use `slimflow run` to finish it")
    if shards:
        known = {r.shard_id for r in _stage_inputs(layout, stage)}
        unknown = sorted(set(shards) - known)
        if unknown:
            raise ValueError(f"no shard {', '.join(unknown)} in stage {stage}; shards: {', '.join(sorted(known))}")
    last = PIPELINE.index(done[-1])
    return run_stages(config, out, list(PIPELINE[PIPELINE.index(stage) : last + 1]),
                      rerun={"stage": stage, "shards": list(shards or []), "dirty": []})


def _stage_inputs(layout: RunLayout, stage: str) -> list[ShardRef]:
    """The shards a stage's per-shard tasks are named after (their `shard` parameter)."""
    m = read_manifest(layout.stage_dir(stage))
    return m.shards if m else []


@flow(name="slimflow-run", flow_run_name="run-{config.name}")
def run_flow(config: Config, out: str, until: str = PIPELINE[-1]) -> dict:
    """The whole pipeline up to and including ``until``; returns the report's summary."""
    if until not in PIPELINE:
        raise ValueError(f"--until {until!r} is not a stage; choose one of: {', '.join(PIPELINE)}")
    return run_stages(config, out, list(PIPELINE[: PIPELINE.index(until) + 1]))
