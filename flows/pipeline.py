"""The pipeline as Prefect flows: one flow per stage, and ``slimflow-run`` composing them.

Each stage flow reads the previous stage's committed manifest, maps its shard tasks, and commits its own
manifest last. The flows only wire stages together; the work is in ``tasks/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time

import numpy as np
from prefect import flow, tags
from slimflow.flows.config import Config
from slimflow.flows.report import write_report
from slimflow.flows.runners import gpu_tasks, shared_cluster, with_runner
from slimflow.flows.stages import StageResult, run_tasks
from slimflow.storage.fs import atomic_write_text, exists, read_bytes
from slimflow.storage.hashing import fingerprint, sha256_file
from slimflow.storage.layout import STAGES, RunLayout
from slimflow.storage.lock import run_lock
from slimflow.storage.manifest import Manifest, commit_manifest, read_manifest
from slimflow.storage.readers import InputError
from slimflow.storage.shards import ShardRef, read_shard
from slimflow.tasks.code_version import code_version
from slimflow.tasks.online import find_labelled
from slimflow.tasks.prefect_tasks import (
    augment_task,
    embed_task,
    evaluate_student_task,
    evaluate_teacher_task,
    export_task,
    fit_teacher_task,
    ingest_task,
    label_task,
    online_train_task,
    pos_table_task,
    segment_task,
    train_task,
    vectors_task,
    vocab_task,
)
from slimflow.tasks.teacher.label import assign_devices, label_precision

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


class StageOrderError(RuntimeError):
    """A stage was asked to run before the stage it reads from was committed."""


def require(layout: RunLayout, stage: str, for_stage: str) -> Manifest:
    m = read_manifest(layout.stage_dir(stage))
    if m is None:
        raise StageOrderError(f"{for_stage} needs the {stage} stage of {layout.root}, which has not completed; "
                              f"run `slimflow {stage} CONFIG --out {layout.root}` (or `slimflow run`) first")
    from slimflow.storage.shards import shard_ok

    # A committed input that no longer matches its hash (truncated, edited) is never consumed (issue 6): the
    # stage that wrote it recomputes it (`slimflow run` does so, its cache check sees the bad hash).
    bad = [r.path for r in m.shards if not shard_ok(layout.root, r)]
    if bad:
        raise StageOrderError(f"{for_stage} needs the {stage} stage of {layout.root}, but its shard {bad[0]} "
                              f"{f'(and {len(bad) - 1} more) ' if len(bad) > 1 else ''}is missing or does not "
                              f"match its recorded sha256; run `slimflow {stage} CONFIG --out {layout.root}` (or "
                              "`slimflow run`) to recompute it")
    return m


def _refs(results: list[dict]) -> list[ShardRef]:
    return [ShardRef.from_dict(r) for r in results]


@flow(name="ingest", flow_run_name="ingest-{config.name}")
@_holding_run_lock
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
    version = code_version(ingest_task)
    commit_manifest(
        layout.stage_dir("ingest"),
        Manifest("ingest", fingerprint("ingest", hashes, params, version), params, version, _refs(res["shards"]),
                 extra={k: res[k] for k in ("labels", "rows", "rejected", "reasons", "rejects")}),
        keep=("rejects.parquet",),
    )
    result.rows = {**res["rows"], "rejected": res["rejected"]}
    return result.to_dict()


@flow(name="segment", flow_run_name="segment-{config.name}")
@_holding_run_lock
def segment_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """Words + POS tags once per source row (jieba for zh, spaCy for en)."""
    layout = RunLayout(out)
    ing = require(layout, "ingest", "segment")
    result = StageResult("segment", rerun=rerun)
    calls = [dict(run_dir=out, shard=r.shard_id, ref=r.to_dict(), lang=config.lang,
                  workers=config.segment.workers) for r in ing.shards]
    refs = _refs(run_tasks(segment_task, calls, out, result, "segment"))
    version = code_version(segment_task)
    params = {"lang": config.lang}
    commit_manifest(layout.stage_dir("segment"),
                    Manifest("segment", fingerprint("segment", ing.fingerprint, params, version), params, version,
                             refs, extra={"labels": ing.extra["labels"]}))
    result.rows = {s: sum(r.rows for r in refs if r.split == s) for s in sorted({r.split for r in refs})}
    return result.to_dict()


@flow(name="augment", flow_run_name="augment-{config.name}")
@_holding_run_lock
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
    version = code_version(pos_table_task, augment_task)
    commit_manifest(layout.stage_dir("augment"),
                    Manifest("augment", fingerprint("augment", seg.fingerprint, params, version), params, version,
                             refs, extra={"pos_table": table, "labels": seg.extra["labels"]}),
                    keep=(table["path"].split("/", 1)[1],))
    result.rows = {"augmented": sum(r.rows for r in refs)}
    result.extra = {"pos_table_words": table["rows"]}
    return result.to_dict()


@flow(name="teacher", flow_run_name="teacher-{config.name}")
@_holding_run_lock
def teacher_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """Step 1: make the teacher ready on the labelled rows (frozen encoder + head, fine-tune, or as given)."""
    layout = RunLayout(out)
    seg = require(layout, "segment", "teacher")
    result = StageResult("teacher", rerun=rerun)
    t = config.teacher.model_dump(mode="json")
    labels = seg.extra["labels"]
    splits = {s: [r.to_dict() for r in seg.split(s)] for s in ("train", "dev", "test")}
    embeds: list[dict] = []
    if config.teacher.fit == "head":
        # Embeddings once per shard, cached like any shard task; the head fit reads them back.
        # Only what changes the embeddings keys them: a new head or fit setting reuses them.
        enc = {k: t[k] for k in ("model", "max_length", "truncation", "device", "dtype", "threads", "batch_tokens",
                                 "cache_dir", "trust_remote_code")}
        calls = [dict(run_dir=out, shard=r["split"] + f"-{r['index']:05d}", ref=r, teacher=enc)
                 for s in ("train", "dev", "test") for r in splits[s]]
        with gpu_tasks(config.runner):
            embeds = run_tasks(embed_task, calls, out, result, "embed")
        splits = {s: [e for e in embeds if e["split"] == s] for s in ("train", "dev", "test")}
    # A head fit reads the stored embeddings on the CPU; fine-tuning, and scoring a given model (fit: none) on
    # dev / test, run the teacher on teacher.device.
    with gpu_tasks(config.runner) if config.teacher.fit != "head" else contextlib.nullcontext():
        (fitted,) = run_tasks(fit_teacher_task, [dict(run_dir=out, teacher=t, labels=labels, **splits)], out,
                              result, "fit-teacher")
    meta = fitted["meta"]
    version = code_version(embed_task, fit_teacher_task)
    commit_manifest(layout.stage_dir("teacher"),
                    Manifest("teacher", fingerprint("teacher", seg.fingerprint, t, version), t, version,
                             _refs(embeds), extra={"teacher": meta, "files": fitted["files"], "labels": labels}))
    result.extra = {"teacher": {k: meta.get(k) for k in ("name", "kind", "weights_hash", "metrics")}}
    return result.to_dict()


@flow(name="label", flow_run_name="label-{config.name}")
@_holding_run_lock
def label_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """Step 2: the teacher labels every original, augmented and unlabelled row, shard by shard."""
    layout = RunLayout(out)
    seg = require(layout, "segment", "label")
    aug = require(layout, "augment", "label")
    teacher = require(layout, "teacher", "label")
    result = StageResult("label", rerun=rerun)
    t = config.teacher.model_dump(mode="json")
    weights = teacher.extra["teacher"]["weights_hash"]
    inputs = _label_inputs(seg, aug)
    # Shards the teacher service already answered (distill.mode online, issue 6) are used, never asked again.
    found = {} if rerun else {i: ref for i, (kind, r) in enumerate(inputs)
                              if (ref := find_labelled(out, kind, r, weights)) is not None}
    result.cached += len(found)
    # Shards are dealt to devices round-robin, in a stable order (a rerun keeps the assignment); with one device
    # this is just config.teacher.device. Named by kind, as the label task names its output shard.
    named = [dataclasses.replace(r, split=kind) for kind, r in inputs]
    plan = assign_devices(named, teacher_devices(config.teacher.device))
    device = {ref.shard_id: d for d, refs in plan.items() for ref in refs}
    # The dtype each device labels in, resolved before the tasks (auto: the GEMM probe, cached per machine) so the
    # dtype actually used keys every label task and is recorded with the labels (issue 16). The flow's process
    # sees the devices the tasks use, as teacher_devices already assumes.
    precision = {d: label_precision(layout.path("teacher", "model"), device=d, dtype=t["dtype"], threads=t["threads"],
                                    cache_dir=t["cache_dir"], trust_remote_code=t["trust_remote_code"]) for d in plan}
    # Only the settings label_shard reads (the fitted teacher itself is keyed by its weights' hash); of these,
    # device, threads and cache_dir are execution-only and never key a task (tasks/prefect_tasks.py).
    runtime = {k: t[k] for k in ("batch_tokens", "threads", "cache_dir", "trust_remote_code")}
    calls = [dict(run_dir=out, shard=n.shard_id, ref=r.to_dict(), kind=kind,
                  teacher={**runtime, "device": device[n.shard_id], "dtype": precision[device[n.shard_id]]["dtype"]},
                  weights_hash=weights)
             for i, ((kind, r), n) in enumerate(zip(inputs, named, strict=True)) if i not in found]
    with gpu_tasks(config.runner):
        asked = iter(_refs(run_tasks(label_task, calls, out, result, "label", progress_key="slimflow-label-progress")))
    refs = [found[i] if i in found else next(asked) for i in range(len(inputs))]
    # Label tasks keep the teacher resident between shards (thread runner: in this process); the stages after
    # this one do not need it, so give its memory (~0.5 GB for e5-small) back to training.
    from slimflow.tasks.teacher.model import release_teachers

    release_teachers()
    version = code_version(label_task)
    params = {k: t[k] for k in ("batch_tokens", "dtype", "device")} | {
        "dtype_used": {d: p["dtype"] for d, p in precision.items()}}
    commit_manifest(layout.stage_dir("label"),
                    Manifest("label", fingerprint("label", seg.fingerprint, aug.fingerprint, teacher.fingerprint,
                                                  params, version), params, version, refs,
                             extra={"teacher": teacher.extra["teacher"]["name"], "weights_hash": weights,
                                    "labels": teacher.extra["labels"], "precision": precision}))
    result.rows = {kind: sum(r.rows for r in refs if r.split == kind) for kind in ("original", "augmented",
                                                                                  "unlabelled")}
    return result.to_dict()


@flow(name="train", flow_run_name="train-{config.name}")
@_holding_run_lock
def train_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """Step 3: every student kind twice, from the same code: on gold labels (baseline) and on the teacher's."""
    layout = RunLayout(out)
    seg = require(layout, "segment", "train")
    online = config.distill.mode == "online"
    lab, inputs, weights = _online_source(layout) if online else (require(layout, "label", "train"), [], "")
    result = StageResult("train", rerun=rerun)
    s = config.student.model_dump(mode="json")
    unit = {kind: config.student.unit_of(kind, config.lang) for kind in config.students}
    units = sorted(set(unit.values()), reverse=True)  # words first: its vocab.json keeps its old place
    vocab_refs = [r.to_dict() for r in seg.shards if r.split in ("train", "unlabelled")]
    # The subword unit reads the teacher's tokenizer: which teacher keys its vocabulary.
    tok_source = {k: config.teacher.model_dump(mode="json")[k] for k in ("model", "cache_dir", "trust_remote_code")}
    vocabs = dict(zip(units, run_tasks(vocab_task, [dict(run_dir=out, refs=vocab_refs, min_count=s["min_count"],
                                                         max_size=s["max_vocab"], lowercase=config.lang == "en",
                                                         unit=u, lang=config.lang,
                                                         teacher=tok_source if u == "subword" else None)
                                                    for u in units], out, result, "vocab"),
                      strict=True))
    vectors = {u: None for u in units}
    # The transformer student starts from the teacher's own embedding rows: no static vectors for it (issue 15).
    vec_units = [u for u in units if any(unit[k] == u for k in config.students if k != "transformer")]
    if config.student.init == "teacher" and vec_units:  # static token vectors distilled from the teacher (issue 11)
        t = config.teacher.model_dump(mode="json")
        enc = {k: t[k] for k in ("model", "cache_dir", "trust_remote_code", "device", "dtype", "threads",
                                 "batch_tokens")}
        with gpu_tasks(config.runner):
            vectors.update(zip(vec_units, run_tasks(vectors_task, [dict(run_dir=out, vocab=vocabs[u], teacher=enc,
                                                                        dim=s["embed_dim"]) for u in vec_units],
                                                    out, result, "vectors"), strict=True))
    data = {"baseline": [r.to_dict() for r in seg.split("train")], "distilled": [r.to_dict() for r in lab.shards]}
    dev = [r.to_dict() for r in seg.split("dev")]
    calls = [dict(run_dir=out, kind=kind, mode=mode, train=data[mode], dev=dev, vocab=vocabs[unit[kind]],
                  labels=lab.extra["labels"], student=s, distill=config.distill.model_dump(mode="json"), threads=1,
                  vectors=vectors[unit[kind]],
                  **({"transformer": {**config.transformer.model_dump(mode="json"),
                                      "cache_dir": config.teacher.cache_dir,
                                      "trust_remote_code": config.teacher.trust_remote_code}}
                     if kind == "transformer" else {}))
             for kind in config.students for mode in ("baseline", "distilled")]
    if online:  # the distilled students ask the teacher service while they train (issue 6)
        d = config.distill
        service = {"url": d.service_url, "concurrency": d.concurrency, "server_batch_size": d.server_batch_size,
                   "retries": d.retries}
        online_calls = [dict(run_dir=out, kind=c["kind"], inputs=inputs, dev=dev, vocab=c["vocab"], labels=c["labels"],
                             student=s, distill=c["distill"], weights_hash=weights, service=service, threads=1,
                             vectors=c["vectors"])
                        for c in calls if c["mode"] == "distilled"]
        calls = [c for c in calls if c["mode"] == "baseline"]
    trained = run_tasks(train_task, calls, out, result, "train")
    if online:
        trained += run_tasks(online_train_task, online_calls, out, result, "train-online")
    version = code_version(vocab_task, vectors_task, train_task, *([online_train_task] if online else []))
    params = {"students": list(config.students), "student": s, "distill": config.distill.model_dump(mode="json")}
    commit_manifest(layout.stage_dir("train"),
                    Manifest("train", fingerprint("train", seg.fingerprint, lab.fingerprint, params, version), params,
                             version, [], extra={"vocab": vocabs, "students": trained, "labels": lab.extra["labels"]}))
    result.extra = {"students": {f"{t['kind']}-{t['mode']}": t["best_dev_accuracy"] for t in trained}}
    return result.to_dict()


@flow(name="export", flow_run_name="export-{config.name}")
@_holding_run_lock
def export_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """Each distilled student as ONNX + TorchScript, with its vocabulary, labels and segmentation settings."""
    layout = RunLayout(out)
    tr = require(layout, "train", "export")
    result = StageResult("export", rerun=rerun)
    distilled = [t for t in tr.extra["students"] if t["mode"] == "distilled"]
    exported = run_tasks(export_task, [dict(run_dir=out, kind=t["kind"], trained=t, lang=config.lang)
                                       for t in distilled], out, result, "export")
    version = code_version(export_task)
    commit_manifest(layout.stage_dir("export"),
                    Manifest("export", fingerprint("export", tr.fingerprint, version), {}, version, [],
                             extra={"students": exported}))
    result.extra = {"exported": {e["kind"]: e["dir"] for e in exported}}
    return result.to_dict()


@flow(name="evaluate", flow_run_name="evaluate-{config.name}")
@_holding_run_lock
def evaluate_flow(config: Config, out: str, rerun: dict | None = None) -> dict:
    """Teacher vs baseline vs distilled students on the test split: accuracy, macro-F1, MCC, texts/s, size."""
    from slimflow.tasks.evaluate import SPEED_TEXTS

    layout = RunLayout(out)
    seg = require(layout, "segment", "evaluate")
    teacher = require(layout, "teacher", "evaluate")
    tr = require(layout, "train", "evaluate")
    result = StageResult("evaluate", rerun=rerun)
    test = [r.to_dict() for r in seg.split("test")]
    # Texts each model reads truncated are counted on every labelled split (issue 11).
    splits = {s: [r.to_dict() for r in seg.split(s)] for s in ("train", "dev", "test")}
    texts = [t for r in seg.split("test") for t in read_shard(out, r, columns=["text"]).column("text").to_pylist()]
    # Evenly spaced over the test split, not its first rows: a split may be in file order (the demo's is all
    # positive reviews, then all negative), and text length, which sets both sides' speed, differs by class.
    if len(texts) > SPEED_TEXTS:
        texts = [texts[i] for i in np.linspace(0, len(texts) - 1, SPEED_TEXTS).round().astype(int)]
    with gpu_tasks(config.runner):  # the teacher's speed, on teacher.device
        (t_speed,) = run_tasks(evaluate_teacher_task, [dict(
            run_dir=out, teacher={k: getattr(config.teacher, k) for k in (
                "device", "dtype", "threads", "batch_tokens", "cache_dir", "trust_remote_code")},
            weights_hash=teacher.extra["teacher"]["weights_hash"], speed_texts=texts, splits=splits)], out, result,
            "evaluate-teacher")
    # A kind reads text the same way in both modes: its truncation is counted once, on the distilled student.
    evals = run_tasks(evaluate_student_task, [dict(run_dir=out, kind=t["kind"], mode=t["mode"], trained=t, test=test,
                                                   lang=config.lang, speed_texts=texts,
                                                   splits=splits if t["mode"] == "distilled" else None)
                                              for t in tr.extra["students"]], out, result, "evaluate")
    version = code_version(evaluate_teacher_task, evaluate_student_task)
    commit_manifest(layout.stage_dir("evaluate"),
                    Manifest("evaluate", fingerprint("evaluate", teacher.fingerprint, tr.fingerprint, version), {},
                             version, [], extra={"teacher": {**teacher.extra["teacher"].get("metrics", {}).get(
                                 "test", {}), **t_speed, "name": teacher.extra["teacher"]["name"]},
                                 "students": evals}))
    return result.to_dict()


def _label_inputs(seg: Manifest, aug: Manifest) -> list[tuple[str, ShardRef]]:
    """What the teacher labels: (kind, input shard) for the original, augmented and unlabelled rows."""
    return ([("original", r) for r in seg.split("train")] + [("augmented", r) for r in aug.shards]
            + [("unlabelled", r) for r in seg.split("unlabelled")])


def _online_source(layout: RunLayout) -> tuple[Manifest, list[dict], str]:
    """distill.mode online (issue 6): no label stage; the train stage asks the teacher service for the label
    stage's inputs. A stand-in for the label manifest (labels, fingerprint), the inputs, the weights hash."""
    seg, aug, teacher = (require(layout, s, "train") for s in ("segment", "augment", "teacher"))
    lab = Manifest("label", fingerprint("label-online", seg.fingerprint, aug.fingerprint, teacher.fingerprint), {},
                   "", [], extra={"labels": teacher.extra["labels"]})
    inputs = [{"kind": kind, "ref": r.to_dict()} for kind, r in _label_inputs(seg, aug)]
    return lab, inputs, teacher.extra["teacher"]["weights_hash"]


STAGE_FLOWS = {"ingest": ingest_flow, "segment": segment_flow, "augment": augment_flow, "teacher": teacher_flow,
               "label": label_flow, "train": train_flow, "export": export_flow, "evaluate": evaluate_flow}


DEVICE_STAGES = ("teacher", "label", "evaluate")
CPU_STAGES = ("train",)
# The stages whose tasks run one per shard (their `shard` parameter), so `slimflow rerun --shard` can pick them;
# the teacher stage only with teacher.fit: head (an embed task per shard). The others run as a whole.
SHARD_STAGES = ("segment", "augment", "teacher", "label")


def teacher_devices(device: str) -> list[str]:
    """Devices the teacher stages spread over: every visible GPU for auto/cuda, else the one named."""
    from slimflow.tasks.teacher.label import available_devices

    return available_devices(device)


def run_stages(config: Config, out: str, stages: list[str], rerun: dict | None = None) -> dict:
    """Run ``stages`` in order and merge their results into the report.

    ``rerun`` ({"stage", "shards"}) forces those tasks to recompute, and with them every task downstream that
    reads one of their outputs (`slimflow rerun`). Holds the run directory's lock throughout (storage/lock.py):
    a run already writing ``out`` is waited for.
    """
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
