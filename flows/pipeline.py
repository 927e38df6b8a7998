"""The pipeline as Prefect flows: one flow per stage, and ``slimflow-run`` composing them.

Each stage is described once in ``flows/stage_specs.py`` and run by one runner (``flows/stages.py``): it reads the
committed manifests of the stages before it, maps its shard tasks, and commits its own manifest last. Here each
becomes a Prefect flow, and ``slimflow-run`` composes them. The work is in ``tasks/``.
"""

from __future__ import annotations

import functools
import logging
import os
import time

from prefect import flow, tags
from slimflow.flows.config import Config
from slimflow.flows.prefect_env import prefect_env
from slimflow.flows.report import write_report
from slimflow.flows.runners import shared_cluster, with_runner
from slimflow.flows.stage_specs import STAGE_SPECS, teacher_devices
from slimflow.flows.stages import Stage, StageOrderError, run_stage
from slimflow.storage.fs import atomic_write_text, exists, read_bytes
from slimflow.storage.layout import STAGES, RunLayout
from slimflow.storage.lock import run_lock
from slimflow.storage.manifest import read_manifest
from slimflow.storage.shards import ShardRef

PIPELINE = STAGES  # the stages in the order they run (defined once, in storage/layout.py)


def _lock_notice(msg: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()  # inside a flow run: the run's log in the UI
    except MissingContextError:
        logger = logging.getLogger("slimflow")
    logger.warning(msg)


def _holding_run_lock(fn):
    """A stage flow holds its run directory's lock (storage/lock.py) while it runs: a stage deployment started
    while another run writes the directory waits for it. Under ``run_stages``, which holds it, this is a no-op
    (the lock is re-entrant within a process)."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        out = kwargs["out"] if "out" in kwargs else args[1]
        with run_lock(out, notify=_lock_notice):
            return fn(*args, **kwargs)

    return locked


def _stage_flow(stage: Stage):
    """``stage`` as a Prefect flow (a subflow of ``slimflow-run`` in the UI, a deployment of its own), named as
    the module attribute it is bound to, holding the run directory's lock and run by the one runner."""

    def stage_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
        return run_stage(stage, config, out, rerun)

    stage_flow.__name__ = stage_flow.__qualname__ = f"{stage.name}_flow"  # deployments' entrypoints name it
    stage_flow.__doc__ = stage.doc
    return flow(name=stage.name, flow_run_name=f"{stage.name}-{{config.name}}")(_holding_run_lock(stage_flow))


STAGE_FLOWS = {stage.name: _stage_flow(stage) for stage in STAGE_SPECS}
assert tuple(STAGE_FLOWS) == PIPELINE, "flows/stage_specs.py describes the stages of storage/layout.py, in order"
# One module attribute per stage flow: prefect.yaml's entrypoints (slimflow.flows.pipeline.ingest_flow ...).
ingest_flow, segment_flow, augment_flow, teacher_flow, label_flow, train_flow, export_flow, evaluate_flow = (
    STAGE_FLOWS.values())


DEVICE_STAGES = ("teacher", "label", "evaluate")
CPU_STAGES = ("train",)
# The stages whose tasks run one per shard (their `shard` parameter), so `slimflow rerun --shard` can pick them;
# the teacher stage only with teacher.fit: head (an embed task per shard). The others run as a whole.
SHARD_STAGES = ("segment", "augment", "teacher", "label")


def run_stages(config: Config, out: str, stages: list[str], rerun: dict | None = None) -> dict:
    """Run ``stages`` in order and merge their results into the report.

    ``rerun`` ({"stage", "shards"}) forces those tasks to recompute, and with them every task downstream that
    reads one of their outputs (`slimflow rerun`). Holds the run directory's lock throughout (storage/lock.py):
    a run already writing ``out`` is waited for.
    """
    prefect_env()  # before the first flow call starts the temporary server
    stages = plan_stages(config, out, stages)  # refused before the lock creates anything
    with run_lock(out, notify=_lock_notice):
        return _run_stages(config, out, stages, rerun)


def plan_stages(config: Config, out: str, stages: list[str]) -> list[str]:
    """The stages ``run_stages`` runs for ``stages``: no label stage in online mode, an error if that was all."""
    if config.distill.mode == "online":  # the train stage asks the teacher service instead (issue 6)
        if stages and all(s == "label" for s in stages):
            raise ValueError(
                "distill.mode is online: there is no label stage, the train stage asks the teacher service while "
                "the students train (and keeps every answer); start the service (`slimflow teacher serve CONFIG "
                f"--out {out}`) and run `slimflow train CONFIG --out {out}`, or set distill.mode: offline to label "
                "every row ahead of training")
        stages = [s for s in stages if s != "label"]
    return stages


def _run_stages(config: Config, out: str, stages: list[str], rerun: dict | None) -> dict:
    layout = RunLayout(out)
    atomic_write_text(layout.path("config.json"), config.model_dump_json(indent=1))  # what `rerun` reloads
    results = []
    with shared_cluster(config.runner) as runner:
        for stage in stages:
            t0 = time.perf_counter()
            stage_flow = STAGE_FLOWS[stage]
            if runner.kind != "thread":
                stage_flow = with_runner(stage_flow, runner)
            elif stage in DEVICE_STAGES or stage in CPU_STAGES:
                # One teacher task per device at a time (two on one device only fight over its cores / memory);
                # single-threaded student trainings, one per core.
                from prefect.task_runners import ThreadPoolTaskRunner

                n = len(teacher_devices(config.teacher.device)) if stage in DEVICE_STAGES else os.cpu_count() or 1
                stage_flow = stage_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=n))
            with tags(f"stage:{stage}"):
                res = stage_flow(config=config, out=out, rerun=rerun)
            res["seconds"] = round(time.perf_counter() - t0, 3)
            if rerun is not None:
                rerun = {**rerun, "dirty": sorted(set(rerun.get("dirty", ())) | set(res["refreshed"]))}
            results.append(res)
    return write_report(layout, config, results)


def rerun_stages(out: str, stage: str, shards: list[str] | None = None) -> dict:
    """Recompute ``stage`` (only ``shards`` of it, when given) and everything downstream that depends on it,
    up to the last stage the run directory had completed."""
    if stage not in PIPELINE:
        raise ValueError(f"--stage {stage!r} is not a stage; choose one of: {', '.join(PIPELINE)}")
    if shards and stage not in SHARD_STAGES:
        raise ValueError(_no_shard_tasks(stage))
    layout = RunLayout(out)
    path = layout.path("config.json")
    if not exists(path):
        raise StageOrderError(f"{out} has no config.json: it is not a slimflow run directory (or predates it)")
    config = Config.model_validate_json(read_bytes(path))
    if shards and stage == "teacher" and config.teacher.fit != "head":
        raise ValueError(_no_shard_tasks(stage, f" with teacher.fit: {config.teacher.fit} (only fit: head embeds "
                                                "the shards one task each)"))
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


def _no_shard_tasks(stage: str, why: str = "") -> str:
    takes = ", ".join(s for s in SHARD_STAGES if s != "teacher")
    return (f"--shard does not apply to the {stage} stage{why}: its tasks run on the whole stage, not one per "
            f"shard; drop --shard to rerun the whole stage (--shard applies to {takes}, and teacher with "
            "teacher.fit: head)")


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
