"""Evaluation: test metrics and serving speed of the teacher and every student, with one harness.

Speed is measured the way a service would see it: raw text in (segmentation / tokenisation inside the timing),
on this machine's CPU unless the teacher is configured on a GPU, at batch 32 and batch 1. Students are timed
in their served form: exported and run by the Predictor that `slimflow predict` uses.

Beside them, per split, how many texts each model reads truncated (issue 11: long documents are data; each model
cuts them to its own budget, and the report says how often it did).

Each timing runs in a fresh process (``isolated``), as a service would run the model: the orchestrating process
has threads of its own (Prefect's log and event shipping, progress bars) and the teacher's memory, none of which
belong in the measurement. Both sides are timed the same way, so the ratio stays fair.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor

from slimflow.storage.fs import join
from slimflow.storage.shards import ShardRef, read_shard

SPEED_TEXTS = 256  # test texts timed per model: enough for a stable texts/s, small enough for the teacher


def speed(predict, texts: list[str]) -> dict:
    """Texts/s of ``predict(list of raw texts)`` at batch 32 and batch 1."""
    from slimflow.tasks.students.evaluate import measure_throughput

    b32 = measure_throughput(predict, texts, 32, min_seconds=2.0)
    b1 = measure_throughput(predict, texts[:64], 1, min_seconds=1.0)
    return {"qps": b32["texts_per_s"], "qps_batch1": b1["texts_per_s"]}


def isolated(fn, *args):
    """``fn(*args)`` in a freshly spawned process (``fn`` importable at module level; args picklable).
    In a daemonic process (a Dask worker's default) no child may be started: then in this process."""
    if multiprocessing.current_process().daemon:
        return fn(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def student_speed(export_dir: str, texts: list[str]) -> dict:
    from slimflow.tasks.students.export import Predictor

    return speed(Predictor(export_dir).predict, texts)


def split_texts(run_dir: str, splits: Mapping[str, Sequence[ShardRef]]) -> dict[str, list[str]]:
    """The ``text`` column of each split's shards, in shard order."""
    return {s: [t for r in refs for t in read_shard(run_dir, r, columns=["text"]).column("text").to_pylist()]
            for s, refs in splits.items()}


def student_truncated(predictor, texts: Mapping[str, list[str]]) -> dict[str, int] | None:
    """Per split, how many texts the served student reads truncated; None while its Predictor cannot say
    (``count_truncated`` is the Predictor's own, as the student's tokenisation is)."""
    count = getattr(predictor, "count_truncated", None)
    return None if count is None else {s: int(count(x)) for s, x in texts.items()}


def evaluate_student_run(run_dir: str, train_rel: str, test: list[ShardRef], lang: str, speed_texts: list[str],
                         splits: Mapping[str, Sequence[ShardRef]] | None = None) -> dict:
    """Accuracy, macro-F1, MCC on ``test``; texts/s served; parameters; ONNX size on disk; and, per split of
    ``splits``, how many texts it reads truncated (``truncated``, see ``student_truncated``)."""
    from slimflow.tasks.students.evaluate import count_params, size_on_disk
    from slimflow.tasks.students.export import FILES, REDUCED, Predictor, export_student
    from slimflow.tasks.students.train import evaluate_student, load_student

    train_dir = join(run_dir, train_rel)
    metrics = evaluate_student(run_dir, test, train_dir)
    model = load_student(train_dir)[0]
    with tempfile.TemporaryDirectory() as tmp:
        export_student(train_dir, tmp, lang=lang)
        served = isolated(student_speed, tmp, speed_texts)
        # threads=None: the TorchScript backend would set this process's torch threads; counting only tokenises
        predictor = Predictor(tmp, threads=None)
        # The file served: int8 ONNX or bf16 TorchScript where the Predictor serves it (the transformer: the one
        # its export measured faster; the BiLSTM int8 where measured faster), else the ONNX model.
        reduced = predictor.backend in REDUCED
        size = size_on_disk(join(tmp, FILES[predictor.backend] if reduced else FILES["onnx"]))
        if reduced:  # the figures of the model a user gets: int8 / bf16 change some predictions; fp32's beside
            metrics = {**served_metrics(run_dir, test, predictor), "fp32": metrics}
        truncated = student_truncated(predictor, split_texts(run_dir, splits)) if splits else None
    return {**metrics, **served, "params": count_params(model), "size_bytes": size, "truncated": truncated,
            "backend": predictor.backend}


def served_metrics(run_dir: str, test: Sequence[ShardRef], predictor) -> dict:
    """Accuracy, macro-F1, MCC of an exported student as served (raw test text through its Predictor)."""
    from slimflow.tasks.students.evaluate import classification_metrics

    tables = [read_shard(run_dir, r, columns=["text", "label"]) for r in test]
    texts = [t for tab in tables for t in tab.column("text").to_pylist()]
    gold = [y for tab in tables for y in tab.column("label").to_pylist()]
    index = {lab: i for i, lab in enumerate(predictor.labels)}
    pred, _ = predictor.predict(texts)
    return classification_metrics([index[y] for y in gold], [index[y] for y in pred], len(index))


def teacher_speed(run_dir: str, teacher: dict, speed_texts: list[str]) -> dict:
    """The fitted teacher's texts/s (tokenisation included), its parameter count and size on disk, timed in a
    fresh process as the students are."""
    return isolated(_teacher_speed, run_dir, teacher, speed_texts)


def teacher_truncated(run_dir: str, teacher: dict, splits: Mapping[str, Sequence[ShardRef]]) -> dict:
    """``{"rows": {split: n}, "truncated": {split: n}}``: per split, its rows and how many of them the fitted
    teacher reads truncated (more tokens than its max_length, specials and prefix included). Tokenisation only;
    the teacher is loaded on the CPU and not kept resident."""
    from slimflow.tasks.teacher.model import load_teacher

    t = load_teacher(join(run_dir, "teacher", "model"), device="cpu", dtype="fp32", threads=teacher["threads"],
                     cache_dir=teacher["cache_dir"], trust_remote_code=teacher.get("trust_remote_code", False),
                     reuse=False)
    texts = split_texts(run_dir, splits)
    return {"rows": {s: len(x) for s, x in texts.items()},
            "truncated": {s: t.count_truncated(x) for s, x in texts.items()},
            "max_length": t.max_length, "truncation": t.truncation}


def _teacher_speed(run_dir: str, teacher: dict, speed_texts: list[str]) -> dict:
    from slimflow.tasks.teacher.label import label_texts
    from slimflow.tasks.teacher.model import load_teacher

    t = load_teacher(join(run_dir, "teacher", "model"), device=teacher["device"], dtype=teacher["dtype"],
                     threads=teacher["threads"], cache_dir=teacher["cache_dir"],
                     trust_remote_code=teacher.get("trust_remote_code", False))
    served = speed(lambda texts: label_texts(t, texts, batch_tokens=teacher["batch_tokens"]), speed_texts)
    # The weights as served (in the dtype they were loaded in), the head included.
    params, size = 0, 0
    for m in [t.model] + ([t.head] if t.head is not None else []):
        p, b = served_weights(m)
        params, size = params + p, size + b
    # what it ran in (dtype: auto resolves per machine), beside the figure it explains
    return {**served, "params": int(params), "size_bytes": int(size), "dtype": t.precision.get("dtype")}


def served_weights(module) -> tuple[int, int]:
    """(parameters, bytes) of a teacher part as served: a torch module's tensors in the dtype it was loaded in, or
    for the int8 onnxruntime body (``dtype: int8``, path ``ort``) its parameters and its file's size."""
    if hasattr(module, "parameters"):
        tensors = list(module.parameters()) + list(module.buffers())
        return (sum(x.numel() for x in module.parameters()),
                sum(x.numel() * x.element_size() for x in tensors))
    return module.params, os.path.getsize(module.path)
