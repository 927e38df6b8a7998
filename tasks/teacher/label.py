"""Step 2 of data distillation: the teacher labels one shard (original, augmented or unlabelled rows).

``label_shard`` is a plain function over one input shard; the flow maps it over shards (Prefect caches it
per shard). Output rows follow ``slimflow.storage.schema.LABELLED``, in input order, every input row exactly once.

Several GPUs: one labelling worker per device, each with its own resident teacher (loaded once, kept between
shards; ``slimflow.tasks.teacher.model.cached_teacher`` keeps one per device) labelling its own shards, one at a time
per device (``slot_lock``). ``assign_devices`` deals shards round-robin (in a stable order, so a rerun keeps the
assignment); the label stage runs one Prefect task per shard with the shard's device, as many at once as devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
from slimflow.storage.schema import AUGMENT, LABELLED, SEGMENT
from slimflow.storage.shards import ShardRef, read_shard, write_shard
from slimflow.tasks.teacher.infer import BATCH_RETRIES, RETRY_DELAY_S, BatchStats, FailHook, OomHook, run_batched
from slimflow.tasks.teacher.model import (
    Teacher,
    TeacherError,
    load_teacher,
    resolve_device,
    resolve_precision,
    set_threads,
    slot_lock,
    teacher_shape,
)

KINDS = ("original", "augmented", "unlabelled")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def label_texts(teacher: Teacher, texts: Sequence[str], *, batch_tokens: int = 16384,
                oom: OomHook | None = None, fail: FailHook | None = None, retries: int = BATCH_RETRIES,
                retry_delay: float = RETRY_DELAY_S, stats: BatchStats | None = None) -> np.ndarray:
    """[N, len(teacher.labels)] float32 logits for ``texts`` (``MASK_PLACEHOLDER`` -> the mask token).

    A failed batch is retried ``retries`` times (``slimflow.tasks.teacher.infer.run_batched``); ``fail`` injects
    failures.
    """
    return run_batched(list(texts), teacher.encode, teacher.logits, len(teacher.labels),
                       batch_tokens=batch_tokens, device=teacher.device, pad_id=teacher.pad_id, oom=oom,
                       fail=fail, retries=retries, retry_delay=retry_delay, stats=stats)


def _input_columns(table: pa.Table, kind: str) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(id, source_id, teacher text) of an input shard; checks it is the schema ``kind`` promises."""
    if kind == "augmented":
        want, text_col, src_col = AUGMENT, "text_t", "source_id"
    else:
        want, text_col, src_col = SEGMENT, "text", "id"
    missing = [n for n in ("id", text_col, "words", "label") if n not in table.column_names]
    if missing:
        raise TeacherError(f"label_shard(kind={kind!r}) expects {want.names} rows; the shard lacks {missing}")
    return table.column("id"), table.column(src_col), table.column(text_col)


def labelled_table(table: pa.Table, kind: str, logits: np.ndarray, labels: Sequence[str]) -> pa.Table:
    """The LABELLED table (``slimflow.storage.schema.LABELLED``) for an input table of ``kind`` and its [N, C] teacher
    logits, C = ``len(labels)``: one row per input row, in input order. Shared by the offline label stage
    (``label_table``) and online distillation (``slimflow.tasks.online``), so both write the same shards."""
    if kind not in KINDS:
        raise TeacherError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    ids, source_ids, texts = _input_columns(table, kind)
    n, c = logits.shape[0], len(labels)
    if logits.shape != (table.num_rows, c):
        raise TeacherError(f"got logits of shape {logits.shape} for {table.num_rows} rows and {c} labels")
    probs = softmax(logits) if n else logits
    hard = logits.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    names = np.asarray(labels, dtype=object)
    list_type = pa.list_(pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * c, c, dtype=np.int32))
    return pa.table({
        "id": ids,
        "source_id": source_ids,
        "kind": pa.array([kind] * n, pa.string()),
        "text_t": texts,
        "words": table.column("words"),
        "label": table.column("label"),
        "logits": pa.ListArray.from_arrays(offsets, pa.array(logits.reshape(-1), pa.float32())).cast(list_type),
        "probs": pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1), pa.float32())).cast(list_type),
        "label_t": pa.array(names[hard].tolist() if n else [], pa.string()),
        "confidence": pa.array(probs.max(axis=1) if n else np.zeros(0, np.float32), pa.float32()),
    })


def label_table(teacher: Teacher, table: pa.Table, kind: str, *, batch_tokens: int = 16384,
                oom: OomHook | None = None, stats: BatchStats | None = None, **retry) -> pa.Table:
    """The LABELLED table for one input table (see ``label_shard``)."""
    if kind not in KINDS:
        raise TeacherError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    _, _, texts = _input_columns(table, kind)
    logits = label_texts(teacher, texts.to_pylist(), batch_tokens=batch_tokens, oom=oom, stats=stats, **retry)
    return labelled_table(table, kind, logits, teacher.labels)


def label_shard(run_dir: str, in_ref: ShardRef, kind: str, teacher_dir: str, out_rel_dir: str, *,
                batch_tokens: int = 16384, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                max_length: int | None = None, cache_dir: str | None = None, trust_remote_code: bool = False,
                oom: OomHook | None = None, on_stats: Callable[[BatchStats], None] | None = None,
                fail: FailHook | None = None, retries: int = BATCH_RETRIES,
                retry_delay: float = RETRY_DELAY_S) -> ShardRef:
    """Label one shard with the fitted teacher in ``teacher_dir``; write it under ``out_rel_dir``.

    ``kind``: ``original`` / ``unlabelled`` read ``slimflow.storage.schema.SEGMENT`` rows (``text``); ``augmented``
    reads ``slimflow.storage.schema.AUGMENT`` rows (``text_t``, mask placeholders included). The output shard keeps
    the input's split and index (so use one ``out_rel_dir`` per kind, e.g. ``label/augmented``) and
    records the input shard's hash and the teacher's weights hash as its inputs. The teacher stays loaded
    between calls in one process, one per device (``slimflow.tasks.teacher.model.cached_teacher``). ``oom`` forces
    out-of-memory errors (tests); ``on_stats`` receives the batching figures (rows, forward passes, padding
    waste, OOM splits, retries, seconds). A failed batch is retried ``retries`` times with backoff from
    ``retry_delay`` s before the error propagates; ``fail`` forces transient failures (tests).
    """
    table = read_shard(run_dir, in_ref)
    stats = BatchStats()
    with slot_lock(device):  # one labelling worker per device at a time, on that device's resident teacher
        teacher = load_teacher(teacher_dir, device=device, dtype=dtype, threads=threads, max_length=max_length,
                               cache_dir=cache_dir, trust_remote_code=trust_remote_code)
        out = label_table(teacher, table, kind, batch_tokens=batch_tokens, oom=oom, stats=stats, fail=fail,
                          retries=retries, retry_delay=retry_delay)
    if on_stats is not None:
        on_stats(stats)
    return write_shard(out, run_dir, out_rel_dir, in_ref.split, in_ref.index, LABELLED,
                       inputs=(in_ref.sha256, teacher.weights_hash))


def label_precision(teacher_dir: str, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                    cache_dir: str | None = None, trust_remote_code: bool = False,
                    max_length: int | None = None) -> dict:
    """What labelling on ``device`` runs in (``resolve_precision``'s record: the dtype and, for auto, the GFLOP/s
    measured; with ``max_length``, the attention implementation too), from the teacher's config alone. The label
    stage resolves it before its tasks, so the dtype actually used keys the label cache and goes into the label
    manifest. The attention implementation is recorded, not keyed: sdpa and eager differ in the last bits only
    (pooled embeddings' cosine 0.99998 in bf16), like two thread counts."""
    set_threads(threads)  # the probe's figures hold for this thread count
    return resolve_precision(dtype, resolve_device(device), teacher_shape(teacher_dir, cache_dir, trust_remote_code),
                             cache_dir, max_length=max_length)


def available_devices(device: str = "auto") -> list[str]:
    """The devices labelling workers should use: every visible GPU for ``auto``/``cuda``, else the one named."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if device == "auto":
        return ["cpu"]
    return [device]


def assign_devices(shards: Sequence[ShardRef], devices: Sequence[str]) -> dict[str, list[ShardRef]]:
    """Deal shards to devices round-robin, in (split, index) order: one labelling worker per device."""
    if not devices:
        raise ValueError("assign_devices needs at least one device")
    plan: dict[str, list[ShardRef]] = {d: [] for d in devices}
    for i, ref in enumerate(sorted(shards, key=lambda r: (r.split, r.index, r.path))):
        plan[devices[i % len(devices)]].append(ref)
    return plan
