"""Evaluation: test metrics and serving speed of the teacher and every student, with one harness.

Speed is measured the way a service would see it: raw text in (segmentation / tokenisation inside the timing),
on this machine's CPU unless the teacher is configured on a GPU, at batch 32 and batch 1. Students are timed
in their served form: exported and run by the Predictor that `slimflow predict` uses.

Each timing runs in a fresh process (``isolated``), as a service would run the model: the orchestrating process
has threads of its own (Prefect's log and event shipping, progress bars) and the teacher's memory, none of which
belong in the measurement. Both sides are timed the same way, so the ratio stays fair.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor

from storage.fs import join
from storage.shards import ShardRef

SPEED_TEXTS = 256  # test texts timed per model: enough for a stable texts/s, small enough for the teacher


def speed(predict, texts: list[str]) -> dict:
    """Texts/s of ``predict(list of raw texts)`` at batch 32 and batch 1."""
    from tasks.students.evaluate import measure_throughput

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
    from tasks.students.export import Predictor

    return speed(Predictor(export_dir).predict, texts)


def evaluate_student_run(run_dir: str, train_rel: str, test: list[ShardRef], lang: str, speed_texts: list[str]) -> dict:
    """Accuracy, macro-F1, MCC on ``test``; texts/s served; parameters; ONNX size on disk."""
    from tasks.students.evaluate import count_params, size_on_disk
    from tasks.students.export import export_student
    from tasks.students.train import evaluate_student, load_student

    train_dir = join(run_dir, train_rel)
    metrics = evaluate_student(run_dir, test, train_dir)
    model = load_student(train_dir)[0]
    with tempfile.TemporaryDirectory() as tmp:
        export_student(train_dir, tmp, lang=lang)
        served = isolated(student_speed, tmp, speed_texts)
        size = size_on_disk(join(tmp, "model.onnx"))
    return {**metrics, **served, "params": count_params(model), "size_bytes": size}


def teacher_speed(run_dir: str, teacher: dict, speed_texts: list[str]) -> dict:
    """The fitted teacher's texts/s (tokenisation included), its parameter count and size on disk, timed in a
    fresh process as the students are."""
    return isolated(_teacher_speed, run_dir, teacher, speed_texts)


def _teacher_speed(run_dir: str, teacher: dict, speed_texts: list[str]) -> dict:
    from tasks.teacher.label import label_texts
    from tasks.teacher.model import load_teacher

    t = load_teacher(join(run_dir, "teacher", "model"), device=teacher["device"], dtype=teacher["dtype"],
                     threads=teacher["threads"], cache_dir=teacher["cache_dir"],
                     trust_remote_code=teacher.get("trust_remote_code", False))
    served = speed(lambda texts: label_texts(t, texts, batch_tokens=teacher["batch_tokens"]), speed_texts)
    # The weights as served (in the dtype they were loaded in), the head included.
    modules = [t.model] + ([t.head] if t.head is not None else [])
    tensors = [x for m in modules for x in list(m.parameters()) + list(m.buffers())]
    params = sum(x.numel() for m in modules for x in m.parameters())
    size = sum(x.numel() * x.element_size() for x in tensors)
    return {**served, "params": int(params), "size_bytes": int(size)}
