"""The eight stages, each described once (:class:`~slimflow.flows.stages.Stage`): what it reads, which of that keys
its output, the tasks it runs, and its plan: the task calls it makes of the config and its inputs, and what its
manifest and report line hold of their results. ``flows/stages.py`` runs them all the same way (require ->
plan -> code version -> fingerprint -> commit); ``flows/pipeline.py`` makes each a Prefect flow.

The kwargs of every task call are its Prefect cache key (tasks/prefect_tasks.py): a renamed or added keyword
recomputes every task of that kind.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
from slimflow.flows.config import Config
from slimflow.flows.runners import gpu_tasks
from slimflow.flows.stages import Output, Stage, StageRun, require
from slimflow.storage.hashing import fingerprint, sha256_file
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import Manifest
from slimflow.storage.readers import InputError
from slimflow.storage.shards import ShardRef, read_shard
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


def _refs(results: list[dict]) -> list[ShardRef]:
    return [ShardRef.from_dict(r) for r in results]


def teacher_devices(device: str) -> list[str]:
    """Devices the teacher stages spread over: every visible GPU for auto/cuda, else the one named."""
    from slimflow.tasks.teacher.label import available_devices

    return available_devices(device)


def label_inputs(seg: Manifest, aug: Manifest) -> list[tuple[str, ShardRef]]:
    """What the teacher labels: (kind, input shard) for the original, augmented and unlabelled rows."""
    return ([("original", r) for r in seg.split("train")] + [("augmented", r) for r in aug.shards]
            + [("unlabelled", r) for r in seg.split("unlabelled")])


def _ingest(run: StageRun) -> Output:
    d, out = run.config.data, run.out
    params = {
        "train": d.train, "dev": d.dev, "test": d.test, "unlabelled": d.unlabelled,
        "text_column": d.text_column, "label_column": d.label_column, "labels": d.labels,
        "dev_fraction": d.dev_fraction, "test_fraction": d.test_fraction, "split_seed": d.split_seed,
        "max_chars": d.max_chars, "shard_rows": run.config.shards.rows,
    }
    hashes = {}
    for key in ("train", "dev", "test", "unlabelled"):
        path = params[key]
        if path is not None:
            try:
                hashes[key] = sha256_file(path)
            except FileNotFoundError:
                raise InputError(f"data.{key}: file {path} not found; check the path in the config") from None
    (res,) = run.map(ingest_task, [dict(run_dir=out, params=params, input_hashes=hashes)], "ingest")
    return Output(params, _refs(res["shards"]), sources=hashes, keep=("rejects.parquet",),
                  extra={k: res[k] for k in ("labels", "rows", "rejected", "reasons", "rejects")},
                  rows={**res["rows"], "rejected": res["rejected"]})


def _segment(run: StageRun) -> Output:
    ing, config = run.inputs["ingest"], run.config
    calls = [dict(run_dir=run.out, shard=r.shard_id, ref=r.to_dict(), lang=config.lang,
                  workers=config.segment.workers) for r in ing.shards]
    refs = _refs(run.map(segment_task, calls, "segment"))
    return Output({"lang": config.lang}, refs, extra={"labels": ing.extra["labels"]},
                  rows={s: sum(r.rows for r in refs if r.split == s) for s in sorted({r.split for r in refs})})


def _augment(run: StageRun) -> Output:
    seg, out = run.inputs["segment"], run.out
    params = run.config.augment.model_dump(mode="json")
    corpus = [r.to_dict() for r in seg.shards if r.split in ("train", "unlabelled")]
    (table,) = run.map(pos_table_task, [dict(run_dir=out, refs=corpus, min_count=run.config.augment.min_count)],
                       "pos-table")
    calls = [dict(run_dir=out, shard=r.shard_id, ref=r.to_dict(), table=table, params=params)
             for r in seg.split("train")]
    refs = _refs(run.map(augment_task, calls, "augment"))
    return Output(params, refs, extra={"pos_table": table, "labels": seg.extra["labels"]},
                  keep=(table["path"].split("/", 1)[1],), rows={"augmented": sum(r.rows for r in refs)},
                  summary={"pos_table_words": table["rows"]})


def _teacher(run: StageRun) -> Output:
    seg, config, out = run.inputs["segment"], run.config, run.out
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
            embeds = run.map(embed_task, calls, "embed")
        splits = {s: [e for e in embeds if e["split"] == s] for s in ("train", "dev", "test")}
    # A head fit reads the stored embeddings on the CPU; fine-tuning, and scoring a given model (fit: none) on
    # dev / test, run the teacher on teacher.device.
    with gpu_tasks(config.runner) if config.teacher.fit != "head" else contextlib.nullcontext():
        (fitted,) = run.map(fit_teacher_task, [dict(run_dir=out, teacher=t, labels=labels, **splits)], "fit-teacher")
    meta = fitted["meta"]
    return Output(t, _refs(embeds), extra={"teacher": meta, "files": fitted["files"], "labels": labels},
                  summary={"teacher": {k: meta.get(k) for k in ("name", "kind", "weights_hash", "metrics")}})


def _label(run: StageRun) -> Output:
    seg, aug, teacher = (run.inputs[s] for s in ("segment", "augment", "teacher"))
    config, out = run.config, run.out
    t = config.teacher.model_dump(mode="json")
    weights = teacher.extra["teacher"]["weights_hash"]
    inputs = label_inputs(seg, aug)
    # Shards the teacher service already answered (distill.mode online, issue 6) are used, never asked again.
    found = {} if run.rerun else {i: ref for i, (kind, r) in enumerate(inputs)
                                  if (ref := find_labelled(out, kind, r, weights)) is not None}
    run.result.cached += len(found)
    # Shards are dealt to devices round-robin, in a stable order (a rerun keeps the assignment); with one device
    # this is just config.teacher.device. Named by kind, as the label task names its output shard.
    named = [dataclasses.replace(r, split=kind) for kind, r in inputs]
    plan = assign_devices(named, teacher_devices(config.teacher.device))
    device = {ref.shard_id: d for d, refs in plan.items() for ref in refs}
    # The dtype each device labels in, resolved before the tasks (auto: the GEMM probe, cached per machine) so the
    # dtype actually used keys every label task and is recorded with the labels (issue 16). The flow's process
    # sees the devices the tasks use, as teacher_devices already assumes.
    precision = {d: label_precision(run.layout.path("teacher", "model"), device=d, dtype=t["dtype"],
                                    threads=t["threads"], cache_dir=t["cache_dir"],
                                    trust_remote_code=t["trust_remote_code"], max_length=t["max_length"])
                 for d in plan}
    # Only the settings label_shard reads (the fitted teacher itself is keyed by its weights' hash); of these,
    # device, threads and cache_dir are execution-only and never key a task (tasks/prefect_tasks.py).
    runtime = {k: t[k] for k in ("batch_tokens", "threads", "cache_dir", "trust_remote_code")}
    calls = [dict(run_dir=out, shard=n.shard_id, ref=r.to_dict(), kind=kind,
                  teacher={**runtime, "device": device[n.shard_id], "dtype": precision[device[n.shard_id]]["dtype"]},
                  weights_hash=weights)
             for i, ((kind, r), n) in enumerate(zip(inputs, named, strict=True)) if i not in found]
    with gpu_tasks(config.runner):
        asked = iter(_refs(run.map(label_task, calls, "label", progress_key="slimflow-label-progress")))
    refs = [found[i] if i in found else next(asked) for i in range(len(inputs))]
    # Label tasks keep the teacher resident between shards (thread runner: in this process); the stages after
    # this one do not need it, so give its memory (~0.5 GB for e5-small) back to training.
    from slimflow.tasks.teacher.model import release_teachers

    release_teachers()
    params = {k: t[k] for k in ("batch_tokens", "dtype", "device")} | {
        "dtype_used": {d: p["dtype"] for d, p in precision.items()}}
    return Output(params, refs, extra={"teacher": teacher.extra["teacher"]["name"], "weights_hash": weights,
                                       "labels": teacher.extra["labels"], "precision": precision},
                  rows={kind: sum(r.rows for r in refs if r.split == kind)
                        for kind in ("original", "augmented", "unlabelled")})


def _train_inputs(layout: RunLayout, config: Config) -> dict[str, Manifest]:
    """The train stage reads the label stage; under distill.mode online (issue 6) there is none, and it asks the
    teacher service for the label stage's inputs: the segment, augment and teacher stages, and a stand-in for the
    label manifest (its labels, and a fingerprint of what its labels derive from)."""
    if config.distill.mode != "online":
        return {s: require(layout, s, "train") for s in ("segment", "label")}
    seg, aug, teacher = (require(layout, s, "train") for s in ("segment", "augment", "teacher"))
    lab = Manifest("label", fingerprint("label-online", seg.fingerprint, aug.fingerprint, teacher.fingerprint), {},
                   "", [], extra={"labels": teacher.extra["labels"]})
    return {"segment": seg, "augment": aug, "teacher": teacher, "label": lab}


def _train_vocabs(run: StageRun, unit: dict[str, str]) -> tuple[dict, dict]:
    """Each unit's vocabulary (words, chars, subword), and its static vectors distilled from the teacher."""
    config, out = run.config, run.out
    s = config.student.model_dump(mode="json")
    units = sorted(set(unit.values()), reverse=True)  # words first: its vocab.json keeps its old place
    vocab_refs = [r.to_dict() for r in run.inputs["segment"].shards if r.split in ("train", "unlabelled")]
    t = config.teacher.model_dump(mode="json")
    # The subword unit reads the teacher's tokenizer: which teacher keys its vocabulary.
    tok_source = {k: t[k] for k in ("model", "cache_dir", "trust_remote_code")}
    vocabs = dict(zip(units, run.map(vocab_task, [dict(run_dir=out, refs=vocab_refs, min_count=s["min_count"],
                                                       max_size=s["max_vocab"], lowercase=config.lang == "en",
                                                       unit=u, lang=config.lang,
                                                       teacher=tok_source if u == "subword" else None)
                                                  for u in units], "vocab"), strict=True))
    vectors = {u: None for u in units}
    # The transformer student starts from the teacher's own embedding rows: no static vectors for it (issue 15).
    vec_units = [u for u in units if any(unit[k] == u for k in config.students if k != "transformer")]
    if config.student.init == "teacher" and vec_units:  # static token vectors distilled from the teacher (issue 11)
        enc = {k: t[k] for k in ("model", "cache_dir", "trust_remote_code", "device", "dtype", "threads",
                                 "batch_tokens")}
        with gpu_tasks(config.runner):
            vectors.update(zip(vec_units, run.map(vectors_task, [dict(run_dir=out, vocab=vocabs[u], teacher=enc,
                                                                      dim=s["embed_dim"]) for u in vec_units],
                                                  "vectors"), strict=True))
    return vocabs, vectors


def _train(run: StageRun) -> Output:
    config, out, seg, lab = run.config, run.out, run.inputs["segment"], run.inputs["label"]
    online = config.distill.mode == "online"
    s = config.student.model_dump(mode="json")
    unit = {kind: config.student.unit_of(kind, config.lang) for kind in config.students}
    vocabs, vectors = _train_vocabs(run, unit)
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
        inputs = [{"kind": kind, "ref": r.to_dict()} for kind, r in label_inputs(seg, run.inputs["augment"])]
        service = {"url": d.service_url, "concurrency": d.concurrency, "server_batch_size": d.server_batch_size,
                   "retries": d.retries}
        online_calls = [dict(run_dir=out, kind=c["kind"], inputs=inputs, dev=dev, vocab=c["vocab"], labels=c["labels"],
                             student=s, distill=c["distill"],
                             weights_hash=run.inputs["teacher"].extra["teacher"]["weights_hash"], service=service,
                             threads=1, vectors=c["vectors"])
                        for c in calls if c["mode"] == "distilled"]
        calls = [c for c in calls if c["mode"] == "baseline"]
    trained = run.map(train_task, calls, "train")
    if online:
        trained += run.map(online_train_task, online_calls, "train-online")
    params = {"students": list(config.students), "student": s, "distill": config.distill.model_dump(mode="json")}
    return Output(params, extra={"vocab": vocabs, "students": trained, "labels": lab.extra["labels"]},
                  summary={"students": {f"{t['kind']}-{t['mode']}": t["best_dev_accuracy"] for t in trained}})


def _export(run: StageRun) -> Output:
    distilled = [t for t in run.inputs["train"].extra["students"] if t["mode"] == "distilled"]
    exported = run.map(export_task, [dict(run_dir=run.out, kind=t["kind"], trained=t, lang=run.config.lang)
                                     for t in distilled], "export")
    return Output({}, extra={"students": exported}, summary={"exported": {e["kind"]: e["dir"] for e in exported}})


def _evaluate(run: StageRun) -> Output:
    from slimflow.tasks.evaluate import SPEED_TEXTS

    seg, teacher, tr = (run.inputs[s] for s in ("segment", "teacher", "train"))
    config, out = run.config, run.out
    # Texts each model reads truncated are counted on every labelled split (issue 11).
    splits = {s: [r.to_dict() for r in seg.split(s)] for s in ("train", "dev", "test")}
    test = splits["test"]
    texts = [t for r in seg.split("test") for t in read_shard(out, r, columns=["text"]).column("text").to_pylist()]
    # Evenly spaced over the test split, not its first rows: a split may be in file order (the demo's is all
    # positive reviews, then all negative), and text length, which sets both sides' speed, differs by class.
    if len(texts) > SPEED_TEXTS:
        texts = [texts[i] for i in np.linspace(0, len(texts) - 1, SPEED_TEXTS).round().astype(int)]
    with gpu_tasks(config.runner):  # the teacher's speed, on teacher.device
        (t_speed,) = run.map(evaluate_teacher_task, [dict(
            run_dir=out, teacher={k: getattr(config.teacher, k) for k in (
                "device", "dtype", "threads", "batch_tokens", "cache_dir", "trust_remote_code")},
            weights_hash=teacher.extra["teacher"]["weights_hash"], speed_texts=texts, splits=splits)],
            "evaluate-teacher")
    # A kind reads text the same way in both modes: its truncation is counted once, on the distilled student.
    evals = run.map(evaluate_student_task, [dict(run_dir=out, kind=t["kind"], mode=t["mode"], trained=t, test=test,
                                                 lang=config.lang, speed_texts=texts,
                                                 splits=splits if t["mode"] == "distilled" else None)
                                            for t in tr.extra["students"]], "evaluate")
    t_test = teacher.extra["teacher"].get("metrics", {}).get("test", {})
    return Output({}, extra={"teacher": {**t_test, **t_speed, "name": teacher.extra["teacher"]["name"]},
                             "students": evals})


# The pipeline, in the order it runs (storage/layout.py's STAGES, which tests/flows/test_stage_specs.py checks).
STAGE_SPECS = (
    Stage("ingest", reads=(), keyed_by=(), tasks=(ingest_task,), plan=_ingest,
          doc="Read and validate the inputs; quarantine bad rows; split; write content-addressed shards."),
    Stage("segment", reads=("ingest",), keyed_by=("ingest",), tasks=(segment_task,), plan=_segment,
          doc="Words + POS tags once per source row (jieba for zh, spaCy for en)."),
    Stage("augment", reads=("segment",), keyed_by=("segment",), tasks=(pos_table_task, augment_task), plan=_augment,
          doc="UNK masking, same-POS substitution and n-gram sampling of the labelled train rows."),
    Stage("teacher", reads=("segment",), keyed_by=("segment",), tasks=(embed_task, fit_teacher_task), plan=_teacher,
          doc="Step 1: make the teacher ready on the labelled rows (frozen encoder + head, fine-tune, or as given)."),
    Stage("label", reads=("segment", "augment", "teacher"), keyed_by=("segment", "augment", "teacher"),
          tasks=(label_task,), plan=_label,
          doc="Step 2: the teacher labels every original, augmented and unlabelled row, shard by shard."),
    Stage("train", reads=("segment", "label"), keyed_by=("segment", "label"), read=_train_inputs,
          tasks=(vocab_task, vectors_task, train_task), online_tasks=(online_train_task,), plan=_train,
          doc="Step 3: every student kind twice, from the same code: on gold labels (baseline) and on the teacher's."),
    Stage("export", reads=("train",), keyed_by=("train",), tasks=(export_task,), plan=_export,
          doc="Each distilled student as ONNX + TorchScript, with its vocabulary, labels and segmentation settings."),
    Stage("evaluate", reads=("segment", "teacher", "train"), keyed_by=("teacher", "train"),
          tasks=(evaluate_teacher_task, evaluate_student_task), plan=_evaluate,
          doc="Teacher vs baseline vs distilled students on the test split: accuracy, macro-F1, MCC, texts/s, size."),
)
