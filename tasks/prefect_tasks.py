"""The Prefect face of the stage functions: names, retries, cache keys.

The work is in the stage functions; what is here is glue that maps a task's parameters onto their arguments
(e.g. ``train_student_in_run`` picks ``max_len`` or ``max_chars`` by token unit, ``fit_teacher_task`` picks the fit).
Glue can change outputs too, so a task's own function here, and the helpers it names, are part of its code version
(tasks/code_version.py); another task's glue is not.

Cache keys hash (task, code version, the parameters that key its output): the parameters carry the input shards'
content hashes and the stage params, less the execution-only settings (``EXECUTION_ONLY``) and the run directory,
so a rerun with nothing changed is all cache hits, and one edited input shard changes the key of exactly the
tasks downstream of it. Results (a shard's run-relative path, rows and hash) are persisted as JSON under the run
directory (flows/stages.py), so the cache survives across processes, machines and a moved run directory; the flows
check each cached shard against the disk before trusting it (storage is the ground truth; this cache mirrors it).
"""

from __future__ import annotations

from prefect import task
from prefect.context import TaskRunContext
from slimflow.storage.hashing import fingerprint
from slimflow.storage.shards import CorruptShardError, ShardRef
from slimflow.tasks.code_version import task_code_version

# Settings that change how a task runs (threads, on which device, where the base model is cached, where the online
# teacher answers, the task runner), never what it writes: kept out of every key, at the top level and inside a
# config section passed as a dict (teacher.threads must not relabel every shard; issue 13).
EXECUTION_ONLY = frozenset({"threads", "device", "workers", "cache_dir", "runner", "service"})
# shard: the task run's name (its input's hash keys it). run_dir: where the run lives, not what it computes; every
# other parameter names files by their path relative to it, so a moved run directory keeps its cache (which lives
# inside it: flows/stages.py).
_NOT_IN_KEY = EXECUTION_ONLY | {"shard", "run_dir"}


def keyed(value):
    """``value`` without the parameters that do not key a task's output, at any depth of dicts and lists."""
    if isinstance(value, dict):
        return {k: keyed(v) for k, v in value.items() if k not in _NOT_IN_KEY}
    if isinstance(value, list | tuple):
        return [keyed(v) for v in value]
    return value


def _cache_key(context: TaskRunContext, parameters: dict) -> str:
    """(task, code version, keyed parameters): the code version is derived from the code the task runs
    (tasks/code_version.py), so nothing needs bumping by hand and a comment or docstring moves nothing."""
    return fingerprint(context.task.name, task_code_version(context.task.fn), keyed(parameters))


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass next time (a flaky filesystem, a pre-empted worker). A user mistake or a corrupt
    input (InputError and TeacherError are ValueErrors; CorruptShardError) fails the same way every time:
    retrying would only delay the one-line error."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(exc, ValueError | TypeError | KeyError | CorruptShardError)


_COMMON = dict(persist_result=True, result_serializer="json", retries=2, retry_delay_seconds=[2, 10],
               retry_condition_fn=_transient, cache_key_fn=_cache_key)


@task(name="ingest", **_COMMON)
def ingest_task(run_dir: str, params: dict, input_hashes: dict) -> dict:
    from slimflow.tasks.ingest import IngestParams, ingest

    p = dict(params)
    if p.get("labels") is not None:
        p["labels"] = tuple(p["labels"])
    return ingest(run_dir, IngestParams(**p))


@task(name="segment", task_run_name="segment-{shard}", **_COMMON)
def segment_task(run_dir: str, shard: str, ref: dict, lang: str, workers: int | None = None) -> dict:
    from slimflow.tasks.segment import segment_shard

    return segment_shard(run_dir, ShardRef.from_dict(ref), lang, workers).to_dict()


@task(name="pos-table", **_COMMON)
def pos_table_task(run_dir: str, refs: list[dict], min_count: int) -> dict:
    from slimflow.tasks.augment import build_pos_table

    return build_pos_table(run_dir, [ShardRef.from_dict(r) for r in refs], min_count)


@task(name="augment", task_run_name="augment-{shard}", **_COMMON)
def augment_task(run_dir: str, shard: str, ref: dict, table: dict, params: dict) -> dict:
    from slimflow.tasks.augment import AugmentParams, augment_shard

    p = {**params, "ngram": tuple(params["ngram"])}
    return augment_shard(run_dir, ShardRef.from_dict(ref), table, AugmentParams(**p)).to_dict()


def _teacher_kwargs(t: dict) -> dict:
    """The runtime knobs of a teacher config that label/embed functions take (none changes their outputs'
    meaning; dtype can change the last bits, so it stays in the cache key)."""
    return {k: t[k] for k in ("device", "dtype", "threads", "batch_tokens", "cache_dir", "trust_remote_code")}


def _dir_files(run_dir: str, rel_dir: str) -> list[dict]:
    """{path, sha256} of every file under ``rel_dir``: lets the flow verify a cached teacher directory."""
    import os

    from slimflow.storage.fs import join
    from slimflow.storage.hashing import sha256_file

    base = join(run_dir, rel_dir)
    out = []
    for root, _, files in os.walk(base):
        for name in sorted(files):
            full = os.path.join(root, name)
            out.append({"path": os.path.relpath(full, run_dir), "sha256": sha256_file(full)})
    return sorted(out, key=lambda f: f["path"])


@task(name="embed", task_run_name="embed-{shard}", **_COMMON)
def embed_task(run_dir: str, shard: str, ref: dict, teacher: dict) -> dict:
    from slimflow.tasks.teacher.fit import embed_shard

    r = ShardRef.from_dict(ref)
    kw = _teacher_kwargs(teacher)
    return embed_shard(run_dir, r, f"teacher/{r.split}", model=teacher["model"], max_length=teacher["max_length"],
                       truncation=teacher["truncation"], **kw).to_dict()


@task(name="fit-teacher", **_COMMON)
def fit_teacher_task(run_dir: str, teacher: dict, labels: list[str], train: list[dict], dev: list[dict],
                     test: list[dict]) -> dict:
    """Step 1: the fitted teacher in ``run_dir/teacher/model``; returns teacher.json plus its files' hashes."""
    from slimflow.storage.fs import join
    from slimflow.tasks.teacher import fit

    refs = {k: [ShardRef.from_dict(r) for r in v] for k, v in (("train", train), ("dev", dev), ("test", test))}
    out = join(run_dir, "teacher", "model")
    common = dict(labels=labels, model=teacher["model"], cache_dir=teacher["cache_dir"],
                  max_length=teacher["max_length"], truncation=teacher["truncation"],
                  trust_remote_code=teacher["trust_remote_code"])
    precision = dict(device=teacher["device"], dtype=teacher["dtype"])  # recorded in teacher.json (issue 16)
    if teacher["fit"] == "head":
        meta = fit.fit_head(run_dir, refs["train"], refs["dev"], out, head=teacher["head"], test_refs=refs["test"],
                            **precision, **common)
    elif teacher["fit"] == "finetune":
        meta = fit.finetune_teacher(run_dir, refs["train"], refs["dev"], out, test_refs=refs["test"],
                                    epochs=teacher["epochs"], lr=teacher["lr"], device=teacher["device"],
                                    dtype=teacher["dtype"], threads=teacher["threads"],
                                    batch_tokens=teacher["batch_tokens"],
                                    freeze_embeddings=teacher["freeze_embeddings"],
                                    freeze_layers=teacher["freeze_layers"], head_init=teacher["head_init"],
                                    probe_rows=teacher["probe_rows"], **common)
    else:
        meta = fit.adopt_pretrained(out, label_map=teacher["label_map"], **precision, **common)
        for split in ("dev", "test"):
            meta = fit.record_metrics(out, split, fit.evaluate_teacher(
                run_dir, refs[split], out, **_teacher_kwargs(teacher)))
    return {"meta": meta, "files": _dir_files(run_dir, "teacher/model")}


@task(name="label", task_run_name="label-{shard}", **_COMMON)
def label_task(run_dir: str, shard: str, ref: dict, kind: str, teacher: dict, weights_hash: str) -> dict:
    """Step 2: one shard labelled by the teacher (``weights_hash`` keys the cache on the fitted teacher)."""
    import dataclasses

    from slimflow.storage.fs import join
    from slimflow.tasks.teacher.label import label_shard

    # The output shard is named by kind ("augmented-00003"), so ids stay unique across the label stage.
    r = dataclasses.replace(ShardRef.from_dict(ref), split=kind)
    return label_shard(run_dir, r, kind, join(run_dir, "teacher", "model"), f"label/{kind}",
                       **_teacher_kwargs(teacher)).to_dict()


@task(name="vocab", task_run_name="vocab-{unit}", **_COMMON)
def vocab_task(run_dir: str, refs: list[dict], min_count: int, max_size: int, lowercase: bool,
               unit: str = "words", lang: str = "zh", teacher: dict | None = None) -> dict:
    """The students' vocabulary over the segmented train + unlabelled texts: ``train/vocab.json`` (words) or
    ``train/vocab-<unit>.json`` (chars, subword; subword reads ``teacher``'s tokenizer, saved beside it)."""
    from slimflow.storage.fs import join
    from slimflow.storage.hashing import sha256_file
    from slimflow.tasks.students.vocab import build_vocab_from_shards

    tokenizer = None
    if unit == "subword":
        from slimflow.tasks.students.subword import tokenizer_json
        from slimflow.tasks.teacher.model import resolve_base

        base = resolve_base(teacher["model"], teacher["cache_dir"])
        tokenizer = tokenizer_json(str(base.path), trust_remote_code=teacher["trust_remote_code"])
    vocab = build_vocab_from_shards(run_dir, [ShardRef.from_dict(r) for r in refs], unit=unit, lang=lang,
                                    lowercase=lowercase, min_count=min_count, max_size=max_size, tokenizer=tokenizer)
    rel = "train/vocab.json" if unit == "words" else f"train/vocab-{unit}.json"
    path = join(run_dir, rel)
    vocab.save(path)
    return {"path": rel, "sha256": sha256_file(path), "size": len(vocab), "unit": unit}


def vectors_path(unit: str, dim: int) -> str:
    """Where a run keeps a unit's static teacher vectors, relative to the run directory."""
    return f"train/vectors-{unit}-{dim}.npy"


@task(name="vectors", task_run_name="vectors-{vocab[unit]}", **_COMMON)
def vectors_task(run_dir: str, vocab: dict, teacher: dict, dim: int) -> dict:
    """Static token vectors of a vocabulary distilled from the teacher's encoder (``student.init: teacher``):
    ``train/vectors-<unit>-<dim>.npy``."""
    import io

    import numpy as np
    from slimflow.storage.fs import atomic_write_bytes, join
    from slimflow.storage.hashing import sha256_bytes
    from slimflow.tasks.students.static import static_vectors
    from slimflow.tasks.students.vocab import Vocab
    from slimflow.tasks.teacher.model import load_base_teacher, set_threads

    set_threads(teacher["threads"])
    enc = load_base_teacher(teacher["model"], cache_dir=teacher["cache_dir"], device=teacher["device"],
                            dtype=teacher["dtype"], threads=teacher["threads"],
                            trust_remote_code=teacher["trust_remote_code"])
    vecs = static_vectors(Vocab.load(join(run_dir, vocab["path"])), enc, dim, batch_tokens=teacher["batch_tokens"])
    buf = io.BytesIO()
    np.save(buf, vecs, allow_pickle=False)
    rel = vectors_path(vocab["unit"], dim)
    atomic_write_bytes(join(run_dir, rel), buf.getvalue())
    return {"path": rel, "sha256": sha256_bytes(buf.getvalue()), "shape": list(vecs.shape)}


@task(name="train-student", task_run_name="train-{kind}-{mode}", **_COMMON)
def train_task(run_dir: str, kind: str, mode: str, train: list[dict], dev: list[dict], vocab: dict,
               labels: list[str], student: dict, distill: dict, threads: int | None = None,
               vectors: dict | None = None, transformer: dict | None = None) -> dict:
    """Step 3: one student (``baseline`` on gold labels or ``distilled`` on teacher logits), early-stopped on dev.

    Resumes from its last epoch checkpoint when a previous attempt was interrupted. ``transformer``: the config's
    transformer section (+ the teacher's cache_dir, trust_remote_code), for kind transformer only.
    """
    return train_student_in_run(run_dir, kind, mode, [ShardRef.from_dict(r) for r in train], dev, vocab, labels,
                                student, distill, threads, vectors, transformer)


@task(name="train-student-online", task_run_name="train-{kind}-{mode}-online", **_COMMON)
def online_train_task(run_dir: str, kind: str, inputs: list[dict], dev: list[dict], vocab: dict,
                      labels: list[str], student: dict, distill: dict, weights_hash: str, service: dict,
                      threads: int | None = None, vectors: dict | None = None) -> dict:
    """Step 3, online (issue 6): a distilled student whose LABELLED shards the teacher service answers while it
    trains (``tasks/online.py``); ``inputs`` are ``{"kind", "ref"}`` input shards. Every answer is kept as a
    label shard, so a retry (the service was down too long) resumes without asking again."""
    from slimflow.tasks.online import OnlineLabeller, TeacherClient

    pairs = [(i["kind"], ShardRef.from_dict(i["ref"])) for i in inputs]
    with TeacherClient(service["url"], concurrency=service["concurrency"],
                       server_batch_size=service["server_batch_size"], retries=service["retries"]) as client, \
            OnlineLabeller(run_dir, pairs, client, weights_hash=weights_hash, labels=labels) as labeller:
        return train_student_in_run(run_dir, kind, "distilled", labeller.refs(), dev, vocab, labels, student,
                                    distill, threads, vectors)


def train_student_in_run(run_dir: str, kind: str, mode: str, train_refs: list, dev: list[dict], vocab: dict,
                         labels: list[str], student: dict, distill: dict, threads: int | None,
                         vectors: dict | None = None, transformer: dict | None = None,
                         out_rel: str | None = None) -> dict:
    """The train stage's one student, from the config's ``student`` / ``distill`` sections as dicts, into
    ``run_dir/out_rel`` (default ``train/{kind}-{mode}``). Plain function: the tasks above wrap it, and
    bench/label.py calls it for its extra student seeds with the stage's own vocabularies and vectors."""
    import io

    import numpy as np
    from slimflow.storage.fs import join, read_bytes
    from slimflow.tasks.students.train import train_student
    from slimflow.tasks.students.vocab import Vocab

    rel = out_rel or f"train/{kind}-{mode}"
    s = student
    res = train_student(
        run_dir, kind=kind, mode=mode, train_refs=train_refs,
        dev_refs=[ShardRef.from_dict(r) for r in dev], vocab=Vocab.load(join(run_dir, vocab["path"])),
        labels=labels, out_dir=join(run_dir, rel), loss=distill["loss"], temperature=distill["temperature"],
        alpha=distill["alpha"], embed_dim=s["embed_dim"], hidden=s["hidden"],
        max_len=s["max_chars"] if vocab.get("unit") == "chars" else s["max_len"],
        epochs=s["epochs"], patience=s["patience"], batch_size=s["batch_size"], optimizer=s["optimizer"],
        lr=s["lr"], shuffle_buffer=s["shuffle_buffer"], seed=s["seed"], threads=threads,
        init_vectors=np.load(io.BytesIO(read_bytes(join(run_dir, vectors["path"]))), allow_pickle=False)
        if vectors and kind != "transformer" else None,
        transformer=transformer, teacher_dir=join(run_dir, "teacher", "model") if transformer else None,
    )
    best = join(run_dir, rel, "best.pt")
    from slimflow.storage.hashing import sha256_file

    keep = ("best_dev_accuracy", "best_epoch", "epochs_run", "history")
    return {"kind": kind, "mode": mode, "dir": rel, **{k: res.get(k) for k in keep},
            "best": {"path": f"{rel}/best.pt", "sha256": sha256_file(best)}}


def train_stage_inputs(run_dir: str, unit: str) -> dict:
    """What a run's train stage gave its distilled students reading ``unit`` tokens, read back from the stage
    manifests: ``train`` (label shards), ``dev`` (as dicts) and ``test`` shards, ``vocab``, ``labels``, the
    ``student`` and ``distill`` settings and the teacher ``vectors``; :func:`train_student_in_run` takes them
    (bench/label.py trains further student seeds so)."""
    from slimflow.storage.layout import RunLayout
    from slimflow.storage.manifest import read_manifest

    layout = RunLayout(run_dir)
    train, seg, lab = (read_manifest(layout.stage_dir(s)) for s in ("train", "segment", "label"))
    s = train.params["student"]
    return {"train": lab.shards, "dev": [r.to_dict() for r in seg.split("dev")], "test": seg.split("test"),
            "vocab": train.extra["vocab"][unit], "labels": train.extra["labels"], "student": s,
            "distill": train.params["distill"],
            "vectors": {"path": vectors_path(unit, s["embed_dim"])} if s["init"] == "teacher" else None}


@task(name="export-student", task_run_name="export-{kind}", **_COMMON)
def export_task(run_dir: str, kind: str, trained: dict, lang: str) -> dict:
    """A distilled student as ONNX + TorchScript with its vocab, labels and segmentation settings."""
    from slimflow.storage.fs import join
    from slimflow.tasks.students.export import export_student

    rel = f"export/{kind}"
    meta = export_student(join(run_dir, trained["dir"]), join(run_dir, rel), lang=lang)
    return {"kind": kind, "dir": rel, "files": _dir_files(run_dir, rel), "meta": meta}


@task(name="evaluate-student", task_run_name="evaluate-{kind}-{mode}", **_COMMON)
def evaluate_student_task(run_dir: str, kind: str, mode: str, trained: dict, test: list[dict], lang: str,
                          speed_texts: list[str], splits: dict[str, list[dict]] | None = None) -> dict:
    """``splits``: {split: segment shards} whose texts read truncated are counted (see evaluate_student_run)."""
    from slimflow.tasks.evaluate import evaluate_student_run

    return evaluate_student_run(run_dir, trained["dir"], [ShardRef.from_dict(r) for r in test], lang,
                                speed_texts, _split_refs(splits)) | {"kind": kind, "mode": mode}


@task(name="evaluate-teacher", **_COMMON)
def evaluate_teacher_task(run_dir: str, teacher: dict, weights_hash: str, speed_texts: list[str],
                          splits: dict[str, list[dict]] | None = None) -> dict:
    """The teacher's speed and size, and under ``truncation`` its rows and texts read truncated per split."""
    from slimflow.tasks.evaluate import teacher_speed, teacher_truncated

    out = teacher_speed(run_dir, teacher, speed_texts)
    return out | {"truncation": teacher_truncated(run_dir, teacher, _split_refs(splits))} if splits else out


def _split_refs(splits: dict[str, list[dict]] | None) -> dict[str, list[ShardRef]] | None:
    return None if splits is None else {s: [ShardRef.from_dict(r) for r in refs] for s, refs in splits.items()}
