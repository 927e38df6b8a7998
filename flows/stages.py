"""Running a stage: what a stage is (:class:`Stage`), the one runner every stage goes through (:func:`run_stage`:
require its inputs, map its tasks, commit its manifest), and running a stage's tasks (submit, show progress, count
cache hits, trust the disk over the cache)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prefect.futures import as_completed
from slimflow.flows.config import Config
from slimflow.storage.fs import is_local
from slimflow.storage.hashing import fingerprint
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import Manifest, commit_manifest, read_manifest
from slimflow.storage.shards import ShardRef, shard_ok
from slimflow.tasks.code_version import code_version, task_code_version


@dataclass
class StageResult:
    stage: str
    executed: int = 0
    cached: int = 0
    seconds: float = 0.0
    rows: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    rerun: dict | None = None  # {"stage", "shards": [ids] | None, "dirty": [sha256]}: see `needs_refresh`
    refreshed: list[str] = field(default_factory=list)  # sha256 of outputs recomputed by a rerun

    def to_dict(self) -> dict:
        return {"stage": self.stage, "executed": self.executed, "cached": self.cached,
                "seconds": round(self.seconds, 3), "rows": self.rows, "refreshed": self.refreshed, **self.extra}


def _hashes(value: object) -> set[str]:
    """Every sha256 a task's parameters or result mention (its input and output shards)."""
    if isinstance(value, dict):
        out = {value["sha256"]} if isinstance(value.get("sha256"), str) else set()
        for v in value.values():
            out |= _hashes(v)
        return out
    if isinstance(value, list | tuple):
        return set().union(*(_hashes(v) for v in value)) if value else set()
    return set()


def needs_refresh(result: StageResult, kwargs: dict) -> bool:
    """Whether a `slimflow rerun` must recompute this task: it was chosen (its stage, and its shard when shards
    were named), or it reads an output that the rerun recomputed (everything downstream of a chosen task)."""
    spec = result.rerun
    if not spec:
        return False
    if spec["stage"] == result.stage and (not spec.get("shards") or kwargs.get("shard") in spec["shards"]):
        return True
    return bool(_hashes(kwargs) & set(spec.get("dirty", ())))


def _outputs_ok(run_dir: str, result: object) -> bool:
    """True when every file a task result points at exists with the recorded hash."""
    if isinstance(result, dict):
        if "path" in result and "sha256" in result:
            ref = ShardRef(split="", index=0, path=result["path"], rows=0, bytes=0, sha256=result["sha256"])
            if not shard_ok(run_dir, ref):
                return False
        return all(_outputs_ok(run_dir, v) for k, v in result.items() if isinstance(v, dict | list))
    if isinstance(result, list):
        return all(_outputs_ok(run_dir, v) for v in result)
    return True


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, disable=total == 0, leave=False)


def cached_in_run(task, run_dir: str):
    """``task`` with its cache records and persisted results under the run directory (``.prefect-cache/``), not
    ``$PREFECT_HOME``: another machine, container or Prefect home that sees the run directory, or the directory
    moved, finds them (issue 13). The keys hold no absolute path (tasks/prefect_tasks.py), and each record is one
    file named by its key, holding its result: a cache policy's separate ``key_storage`` would record the result's
    absolute path instead, and a moved directory then fails on read (measured on Prefect 3.9). A remote run
    directory (``s3://``...) keeps Prefect's default result storage: a storage block there must be saved on the
    server first."""
    if not is_local(run_dir):
        return task
    return task.with_options(result_storage=Path(RunLayout(run_dir).prefect_cache).resolve())


def run_tasks(task, calls: list[dict], run_dir: str, result: StageResult, desc: str,
              progress_key: str | None = None) -> list:
    """Submit ``task`` once per kwargs in ``calls``; return results in call order.

    A cache hit whose output files are gone or altered (a deleted run dir, a truncated shard) is recomputed
    with the cache refreshed for that one task, so a stale cache entry is never used.
    """
    t0 = time.perf_counter()
    task = cached_in_run(task, run_dir)
    task_code_version(task)  # here, in the flow's thread, not in the runner's threads beside running tasks
    refresh = [needs_refresh(result, kw) for kw in calls]
    futures = [(task.with_options(refresh_cache=True) if r else task).submit(**kw) for kw, r in zip(calls, refresh)]
    artifact = None
    if progress_key and futures:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        # The UI shows the share of shards done while a long stage (labelling) runs.
        artifact = create_progress_artifact(0.0, key=progress_key, description=f"{desc}: shards done (%)")
    with _bar(len(futures), desc) as bar:
        for done, _ in enumerate(as_completed(futures), start=1):
            bar.update()
            if artifact is not None:
                update_progress_artifact(artifact, 100.0 * done / len(futures))
    results = []
    for fut, kw, r in zip(futures, calls, refresh):
        value = fut.result()
        if r:
            result.refreshed += sorted(_hashes(value))
            if result.rerun is not None:
                result.rerun = {**result.rerun, "dirty": sorted(set(result.rerun.get("dirty", ())) | _hashes(value))}
        if fut.state.name == "Cached":
            if _outputs_ok(run_dir, value):
                result.cached += 1
            else:
                value = task.with_options(refresh_cache=True).submit(**kw).result()
                result.executed += 1
        else:
            result.executed += 1
        results.append(value)
    result.seconds += time.perf_counter() - t0
    return results


class StageOrderError(RuntimeError):
    """A stage was asked to run before the stage it reads from was committed."""


def require(layout: RunLayout, stage: str, for_stage: str) -> Manifest:
    m = read_manifest(layout.stage_dir(stage))
    if m is None:
        raise StageOrderError(f"{for_stage} needs the {stage} stage of {layout.root}, which has not completed; "
                              f"run `slimflow {stage} CONFIG --out {layout.root}` (or `slimflow run`) first")
    # A committed input that no longer matches its hash (truncated, edited) is never consumed (issue 6): the
    # stage that wrote it recomputes it (`slimflow run` does so, its cache check sees the bad hash).
    bad = [r.path for r in m.shards if not shard_ok(layout.root, r)]
    if bad:
        raise StageOrderError(f"{for_stage} needs the {stage} stage of {layout.root}, but its shard {bad[0]} "
                              f"{f'(and {len(bad) - 1} more) ' if len(bad) > 1 else ''}is missing or does not "
                              f"match its recorded sha256; run `slimflow {stage} CONFIG --out {layout.root}` (or "
                              "`slimflow run`) to recompute it")
    return m


@dataclass
class StageRun:
    """What a stage's plan works from: the config, the run directory, the committed manifests it reads (by
    stage), and the stage's result, which its task groups count into (:meth:`map`)."""

    config: Config
    out: str
    inputs: dict[str, Manifest]
    result: StageResult
    rerun: dict | None = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.out)

    def map(self, task, calls: list[dict], desc: str, progress_key: str | None = None) -> list:
        """One task group: ``task`` once per kwargs in ``calls`` (see :func:`run_tasks`)."""
        return run_tasks(task, calls, self.out, self.result, desc, progress_key=progress_key)


@dataclass(frozen=True)
class Output:
    """What a stage's plan made of its task results: its manifest's parts, and its rows in the report."""

    params: dict  # the manifest's params; they key the output when the stage has any
    shards: list[ShardRef] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # the manifest's stage-specific facts
    keep: tuple[str, ...] = ()  # files in the stage directory, besides the shards, that the commit keeps
    rows: dict = field(default_factory=dict)  # StageResult.rows
    summary: dict = field(default_factory=dict)  # StageResult.extra: the stage's line in the report
    sources: dict | None = None  # ingest: the input files' sha256, keying its output as upstream stages' would


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, described once; :func:`run_stage` runs every one of them the same way."""

    name: str
    doc: str  # the stage flow's description (the UI shows it)
    reads: tuple[str, ...]  # the committed stages it requires, in that order
    keyed_by: tuple[str, ...]  # those of them whose fingerprints key its output
    tasks: tuple  # the Prefect tasks it runs: their code makes the stage's code version
    plan: Callable[[StageRun], Output]  # maps its task groups, and makes the manifest's parts of the results
    online_tasks: tuple = ()  # tasks it runs as well under distill.mode online (issue 6)
    # How it reads its inputs when that is not just `require` of each of ``reads`` (train, online: a stand-in
    # for the label stage); returns the manifests by stage.
    read: Callable[[RunLayout, Config], dict[str, Manifest]] | None = None

    def code_version(self, config: Config) -> str:
        return code_version(*self.tasks, *(self.online_tasks if config.distill.mode == "online" else ()))


def run_stage(stage: Stage, config: Config, out: str, rerun: dict | None = None) -> dict:
    """Run one stage: require the manifests it reads, run its plan (its task groups), and commit its manifest,
    last; return its result for the report.

    Every committed manifest's fingerprint is made here, and only here: the fingerprints of the stages that key
    it, then its sources (ingest) and its params (when it has any: export and evaluate have none, and their
    fingerprints are what they were before this runner), then its code version. Equal fingerprints mean equal
    outputs, and a changed input moves every fingerprint downstream of it.
    """
    layout = RunLayout(out)
    if stage.read is not None:
        inputs = stage.read(layout, config)
    else:
        inputs = {s: require(layout, s, stage.name) for s in stage.reads}
    result = StageResult(stage.name, rerun=rerun)
    made = stage.plan(StageRun(config, out, inputs, result, rerun))
    version = stage.code_version(config)
    key = [inputs[s].fingerprint for s in stage.keyed_by]
    key += [made.sources] if made.sources is not None else []
    key += [made.params] if made.params else []
    commit_manifest(layout.stage_dir(stage.name),
                    Manifest(stage.name, fingerprint(stage.name, *key, version), made.params, version,
                             list(made.shards), extra=made.extra),
                    keep=made.keep)
    result.rows, result.extra = made.rows, made.summary
    return result.to_dict()
