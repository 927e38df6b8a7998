"""Step 1 of data distillation: fit the teacher on the labelled rows (``teacher.fit``).

- ``head`` (CPU default): a frozen encoder embeds the labelled rows once per shard (``embed_shard``, cacheable
  per shard), then a head is fitted on the embeddings (``fit_head``): L2 logistic regression with C chosen
  on dev, or a small MLP with early stopping on dev. On zh-reviews with 2,000 train rows, e5 + logistic
  regression reaches ~0.83 test accuracy (bench/teacher_accuracy.py measures it, and how much the split moves it).
- ``finetune`` (the GPU path; runs on CPU, slowly): every weight trained, early stopping on dev, the best
  epoch kept (``finetune_teacher``).
- ``none``: a ready sequence-classification checkpoint, its labels mapped to the task's (``adopt_pretrained``).

Each writes a teacher directory: ``teacher.json`` (written last) + weights; ``load_teacher`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
from slimflow.storage.atomic_dir import build_dir, file_hashes
from slimflow.storage.fs import atomic_write_bytes, atomic_write_text, join
from slimflow.storage.shards import ShardRef, read_shard, write_shard
from slimflow.tasks.students.evaluate import classification_metrics  # one scoring for teacher and students
from slimflow.tasks.teacher.infer import run_batched
from slimflow.tasks.teacher.model import (
    ENCODER_DIR,
    FORMAT,
    HEAD_FILE,
    TEACHER_JSON,
    Teacher,
    TeacherError,
    base_weights_hash,
    cached_teacher,
    check_truncation,
    load_base_teacher,
    load_seqcls,
    make_head,
    read_teacher_json,
    resolve_base,
    set_threads,
    state_hash,
)

log = logging.getLogger(__name__)

# Embeddings of labelled rows, one shard per input shard (fit: head).
EMBED = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("embedding", pa.list_(pa.float32()), nullable=False),  # L2-normalised mean pool, [hidden]
])

HEAD_INITS = ("fit", "random")  # fit: finetune's head: fit: head's logistic regression first (LP-FT), or random
LOGREG_CS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # inverse L2 strength, picked on dev accuracy
MLP_HIDDEN = 256  # ~100k parameters over a 384-d embedding: enough for a few thousand rows


# ----------------------------------------------------------------------------------------------- metrics
def label_indices(names: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({n for n in names if n not in index}, key=str)
    if unknown:
        raise TeacherError(f"labels {unknown[:5]} are not among the task's labels {list(labels)}")
    return np.asarray([index[n] for n in names], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- embedding
def _encoder(model, cache_dir, device, dtype, threads, max_length, trust_remote_code, truncation="head") -> Teacher:
    set_threads(threads)
    key = ("encoder", model, cache_dir, device, dtype, threads, max_length, truncation, trust_remote_code)
    return cached_teacher(key, lambda: load_base_teacher(
        model, cache_dir=cache_dir, device=device, dtype=dtype, threads=threads, max_length=max_length,
        truncation=truncation, trust_remote_code=trust_remote_code), device)


def embed_texts(teacher: Teacher, texts: Sequence[str], *, batch_tokens: int = 16384) -> np.ndarray:
    """[N, hidden] float32 L2-normalised mean-pooled embeddings."""
    dim = teacher.model.config.hidden_size
    return run_batched(list(texts), teacher.encode, teacher.embed, dim, batch_tokens=batch_tokens,
                       device=teacher.device, pad_id=teacher.pad_id)


def embed_shard(run_dir: str, ref: ShardRef, out_rel_dir: str, *, model: str = "default",
                cache_dir: str | None = None, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                max_length: int = 128, truncation: str = "head", batch_tokens: int = 16384,
                trust_remote_code: bool = False) -> ShardRef:
    """Embed one labelled SEGMENT shard with the frozen encoder; write an ``EMBED`` shard (id, label, vector).

    The encoder stays loaded between calls in one process. The output records the input shard's hash and
    the encoder's weights hash as its inputs. ``truncation``: which tokens of a text over ``max_length`` are
    read (``slimflow.tasks.teacher.model.TRUNCATIONS``).
    """
    teacher = _encoder(model, cache_dir, device, dtype, threads, max_length, trust_remote_code, truncation)
    table = read_shard(run_dir, ref, columns=["id", "text", "label"])
    emb = embed_texts(teacher, table.column("text").to_pylist(), batch_tokens=batch_tokens)
    n, d = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    out = pa.table({"id": table.column("id"), "label": table.column("label"),
                    "embedding": pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1), pa.float32()))})
    return write_shard(out, run_dir, out_rel_dir, ref.split, ref.index, EMBED,
                       inputs=(ref.sha256, teacher.weights_hash))


def read_embeddings(run_dir: str, refs: Sequence[ShardRef], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(X [N, d] float32, y [N] label indices) from EMBED shards; unlabelled rows are skipped."""
    tables = [read_shard(run_dir, r) for r in refs]
    if not tables:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    t = pa.concat_tables(tables)
    t = t.filter(t.column("label").is_valid())
    col = t.column("embedding").combine_chunks()
    d = len(col[0]) if len(col) else 0
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), d)
    return x, label_indices(t.column("label").to_pylist(), labels)


# ------------------------------------------------------------------------------------------------- heads
def _standardise(head, x):
    import torch

    xt = torch.from_numpy(x)
    head.mu.copy_(xt.mean(0))
    head.sigma.copy_(xt.std(0).clamp(min=1e-6))


def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, max_iter: int = 300):
    """Multinomial logistic regression, objective mean CE + ||W||^2 / (2 C N) (scikit-learn's), L-BFGS."""
    import torch

    head = make_head(x.shape[1], n_classes)
    _standardise(head, x)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lin = head.net[0]
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-6,
                            history_size=20, line_search_fn="strong_wolfe")
    reg = 1.0 / (2.0 * c * len(x))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xt), yt) + reg * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.eval()


def fit_mlp(x, y, x_dev, y_dev, n_classes: int, *, hidden: int = MLP_HIDDEN, epochs: int = 200,
            patience: int = 10, lr: float = 1e-3, batch_size: int = 64, seed: int = 0):
    """One-hidden-layer MLP, AdamW; stops after ``patience`` epochs without a better dev accuracy."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = make_head(x.shape[1], n_classes, hidden=hidden)
    _standardise(head, x)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xd = torch.from_numpy(x_dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    best, best_state, bad = -1.0, None, 0
    for _ in range(epochs):
        head.train()
        with torch.enable_grad():
            for idx in torch.randperm(len(xt), generator=g).split(batch_size):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx]).backward()
                opt.step()
        head.eval()
        with torch.no_grad():
            acc = float((head(xd).argmax(1).numpy() == y_dev).mean())
        if acc > best:
            best, best_state, bad = acc, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best_state)
    return head.eval()


def fit_logreg_on_dev(x: np.ndarray, y: np.ndarray, xd: np.ndarray, yd: np.ndarray, n_classes: int):
    """Logistic regression for every C in ``LOGREG_CS``, the best on dev accuracy (then macro-F1) kept; ties keep
    the smaller C (stronger regularisation). Returns (head, its dev metrics, C, every C's dev metrics)."""
    best, search = None, []
    for c in LOGREG_CS:
        h = fit_logreg(x, y, n_classes, c)
        m = classification_metrics(yd, predict_head(h, xd), n_classes)
        search.append({"C": c, **m})
        if best is None or (m["accuracy"], m["macro_f1"]) > (best[1]["accuracy"], best[1]["macro_f1"]):
            best = (h, m, c)
    return best[0], best[1], best[2], search


def predict_head(head, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return head(torch.from_numpy(x)).argmax(1).numpy()


def _save_teacher(teacher_dir: str, meta: dict, head=None, write_files=None) -> dict:
    """Build the teacher folder beside ``teacher_dir`` and swap it in whole (storage/atomic_dir.py, issue 13):
    the head (if any), what ``write_files(folder)`` writes (a fine-tuned encoder), then ``teacher.json`` last,
    with every file's sha256 under ``files``. A kill midway leaves the previous teacher as it was."""
    with build_dir(teacher_dir) as tmp:
        if head is not None:
            from safetensors.torch import save as st_save

            blob = st_save({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
            atomic_write_bytes(join(tmp, HEAD_FILE), blob)
        if write_files is not None:
            write_files(tmp)
        meta = {"format": FORMAT, **meta, "files": file_hashes(tmp, exclude=(TEACHER_JSON,))}
        atomic_write_text(join(tmp, TEACHER_JSON), json.dumps(meta, indent=1, ensure_ascii=False))
    return meta


def _combined_hash(base_hash: str, head) -> str:
    from safetensors.torch import save as st_save

    blob = st_save({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    return hashlib.sha256(base_hash.encode() + blob).hexdigest()


def fit_head(run_dir: str, train_refs: Sequence[ShardRef], dev_refs: Sequence[ShardRef], teacher_dir: str, *,
             labels: Sequence[str], model: str = "default", head: str = "logreg",
             test_refs: Sequence[ShardRef] = (), cache_dir: str | None = None, max_length: int = 128,
             truncation: str = "head", seed: int = 0, trust_remote_code: bool = False, device: str = "auto",
             dtype: str = "auto") -> dict:
    """Fit a head on ``embed_shard`` outputs and save the teacher into ``teacher_dir``; returns teacher.json.

    ``head``: ``logreg`` (C picked on dev accuracy from ``LOGREG_CS``) or ``mlp`` (early stopping on dev).
    Dev (and test, when given) accuracy and macro-F1 go into ``teacher.json`` under ``metrics``; under
    ``precision``, what the encoder runs in on ``device`` for ``dtype`` (auto: the GEMM probe's figures).
    """
    import torch

    if head not in ("logreg", "mlp"):
        raise TeacherError(f"teacher.head {head!r} is not one of logreg, mlp")
    check_truncation(truncation)
    t0 = time.perf_counter()
    labels = list(labels)
    x, y = read_embeddings(run_dir, train_refs, labels)
    xd, yd = read_embeddings(run_dir, dev_refs, labels)
    if len(x) == 0 or len(xd) == 0:
        raise TeacherError(f"fit_head needs labelled train and dev embeddings, got {len(x)} train, {len(xd)} dev")
    torch.manual_seed(seed)
    search: list[dict] = []  # logreg: dev metrics of every C tried
    if head == "logreg":
        fitted, dev_m, c, search = fit_logreg_on_dev(x, y, xd, yd, len(labels))
        head_config = {"type": "logreg", "C": c, "dim": x.shape[1]}
    else:
        fitted = fit_mlp(x, y, xd, yd, len(labels), seed=seed)
        dev_m = classification_metrics(yd, predict_head(fitted, xd), len(labels))
        head_config = {"type": "mlp", "hidden": MLP_HIDDEN, "dim": x.shape[1]}
    metrics = {"dev": dev_m}
    if test_refs:
        xt, yt = read_embeddings(run_dir, test_refs, labels)
        metrics["test"] = classification_metrics(yt, predict_head(fitted, xt), len(labels))
    base = resolve_base(model, cache_dir)
    try:
        base_hash = base_weights_hash(base)
    except TeacherError:  # a hub id: hash the loaded tensors
        base_hash = _encoder(model, cache_dir, "cpu", "fp32", None, max_length, trust_remote_code).weights_hash
    meta = {
        "kind": "head", "name": f"{base.name}+{head}", "base_model": base.ref, "base_hash": base_hash,
        "labels": labels, "head": head, "head_config": head_config, "prefix": base.prefix,
        "pooling": "mean", "max_length": max_length, "truncation": truncation,
        "weights_hash": _combined_hash(base_hash, fitted),
        "metrics": metrics, "search": search, "train_rows": int(len(x)), "seed": seed,
        "precision": _precision(base.path, device, dtype, cache_dir, trust_remote_code, max_length),
        "fit_seconds": round(time.perf_counter() - t0, 3),
    }
    return _save_teacher(teacher_dir, meta, fitted)


def _precision(path: str, device: str, dtype: str, cache_dir: str | None, trust_remote_code: bool,
               max_length: int) -> dict:
    """What the teacher at ``path`` runs in on ``device`` (the per-machine probes, cached: no second measurement)."""
    from slimflow.tasks.teacher.model import model_shape, resolve_device, resolve_precision

    return resolve_precision(dtype, resolve_device(device), model_shape(path, trust_remote_code), cache_dir,
                             max_length=max_length)


# ------------------------------------------------------------------------------------------- fine-tuning
def _read_texts(run_dir: str, refs: Sequence[ShardRef], labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    tables = [read_shard(run_dir, r, columns=["text", "label"]) for r in refs]
    if not tables:
        return [], np.zeros(0, np.int64)
    t = pa.concat_tables(tables)
    t = t.filter(t.column("label").is_valid())
    return t.column("text").to_pylist(), label_indices(t.column("label").to_pylist(), labels)


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    """``min(n, k)`` row indices drawn without replacement, in order (all rows when ``n <= k``)."""
    return np.arange(n) if n <= k else np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _linear_probe(t: Teacher, texts, y, dev_texts, yd, batch_tokens: int, rows: int, seed: int) -> dict:
    """LP-FT's first step: ``fit: head``'s logistic regression on the frozen encoder's embeddings of at most
    ``rows`` train rows (C picked on at most ``rows`` dev rows), a seeded sample: the head only has to start
    fine-tuning in the right direction, and a probe over every row would cost a whole inference pass more per run
    (88 s of a 313 s epoch on the quick demo's 2,000 + 1,000 rows). Returns the head, its dev metrics (on the
    sample), C, the rows used and the seconds it took."""
    import torch

    t0 = time.perf_counter()
    tr, dv = _sample(len(texts), rows, seed), _sample(len(dev_texts), rows, seed + 1)
    t.model.eval()
    with torch.inference_mode():
        x = embed_texts(t, [texts[i] for i in tr], batch_tokens=batch_tokens)
        xd = embed_texts(t, [dev_texts[i] for i in dv], batch_tokens=batch_tokens)
    head, m, c, _ = fit_logreg_on_dev(x, y[tr], xd, yd[dv], len(t.labels))
    log.info("finetune: linear probe first on %d train / %d dev rows (C %g): dev accuracy %.4f", len(tr), len(dv),
             c, m["accuracy"])
    return {"head": head.to(t.device), "C": c, "rows": [len(tr), len(dv)],
            "train_seconds": round(time.perf_counter() - t0, 3), **m}


def encoder_layers(model):
    """The encoder's stack of transformer layers (BERT / RoBERTa / XLM-R ``encoder.layer``, DistilBERT
    ``transformer.layer``, ...): the ``ModuleList`` as long as ``config.num_hidden_layers``; None if it has none."""
    import torch

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [m for _, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    return found[0] if n and found else None


def freeze_bottom(model, layers: int | None, on_cpu: bool, freeze_embeddings: bool) -> int:
    """Fix what lies below the encoder's layer ``layers`` (the embeddings module and the bottom ``layers``
    layers) so that no gradient is computed there; None: a quarter of the layers on a CPU, none on GPUs. With
    ``layers`` 0 only the token table follows ``freeze_embeddings``. Returns the layers frozen."""
    stack = encoder_layers(model)
    n = len(stack) if stack is not None else 0
    if layers is None:
        layers = n // 4 if on_cpu else 0
    if layers and stack is None:
        raise TeacherError(f"teacher.freeze_layers {layers}: found no layer stack of config.num_hidden_layers "
                           f"layers in {type(model).__name__}; set teacher.freeze_layers: 0")
    if layers >= max(n, 1) and layers:
        raise TeacherError(f"teacher.freeze_layers {layers}: the teacher has {n} layers, so at most {n - 1} can be "
                           "frozen (the top one must train)")
    if freeze_embeddings or layers:
        model.get_input_embeddings().weight.requires_grad_(False)
    if layers:
        # the whole embeddings module (positions, LayerNorm) too: one trainable weight below layer k would carry
        # the backward pass through every frozen layer, which is the cost this saves
        for module in (getattr(model, "embeddings", None), *list(stack)[:layers]):
            if module is not None:
                module.requires_grad_(False)
    return layers


def finetune_teacher(run_dir: str, train_refs: Sequence[ShardRef], dev_refs: Sequence[ShardRef], teacher_dir: str,
                     *, labels: Sequence[str], model: str = "default", test_refs: Sequence[ShardRef] = (),
                     epochs: int = 3, lr: float = 3e-5, batch_size: int = 32, patience: int = 1,
                     device: str = "auto", dtype: str = "auto", threads: int | None = None,
                     max_length: int = 128, truncation: str = "head", batch_tokens: int = 16384,
                     cache_dir: str | None = None, seed: int = 0, trust_remote_code: bool = False,
                     freeze_embeddings: bool | None = None, freeze_layers: int | None = None,
                     length_buckets: bool = True, head_init: str = "fit", probe_rows: int = 500,
                     checkpoint_dir: str | None = None, progress: bool = True,
                     on_epoch: Callable[[int], None] | None = None) -> dict:
    """Fine-tune encoder + linear head (mean pooling) on SEGMENT shards; keep the best dev epoch.

    Stops after ``patience`` epochs without a better dev accuracy. Saves the encoder and tokenizer under
    ``teacher_dir/encoder`` (local paths only) and the head beside it. ``head_init`` ``fit`` starts the head from
    ``fit: head``'s logistic regression on the frozen encoder's embeddings (C picked on dev; LP-FT, Kumar et al.
    2022: a random head's gradients first distort the pretrained features the head should have read); ``random``
    starts it from zeros-mean noise; the probe reads a seeded sample of ``probe_rows`` train and dev rows. What
    makes it practical on a CPU (issue 16): the token embedding table frozen (``freeze_embeddings``; None: frozen
    on CPU, trained on GPUs), the embeddings and the bottom ``freeze_layers`` layers fixed (None: a quarter of
    the layers on a CPU, none on GPUs: no gradient is computed below the first trained layer; on the quick demo's
    split, one epoch, a quarter frozen reached dev accuracy 0.849 and a third 0.845, none 0.852),
    length-bucketed batches (``length_buckets``), autocast in the measured-fastest dtype (``dtype: auto``, see
    ``slimflow.tasks.teacher.precision``), a per-step progress bar with the running loss (``progress``), and a
    checkpoint after every epoch in ``checkpoint_dir`` (default ``<teacher_dir>.checkpoint``) that a rerun with the same
    inputs and settings resumes from; it is removed once the teacher is saved. ``on_epoch(epoch)`` is called
    after each epoch's checkpoint (tests stop a run there).
    """
    import os
    import shutil

    import torch
    from slimflow.tasks.teacher.infer import collate
    from slimflow.tasks.teacher.train_state import (
        bucket_batches,
        load_checkpoint,
        random_batches,
        save_checkpoint,
        trainable_state,
    )
    from tqdm import tqdm

    t0 = time.perf_counter()
    labels = list(labels)
    torch.manual_seed(seed)
    texts, y = _read_texts(run_dir, train_refs, labels)
    dev_texts, yd = _read_texts(run_dir, dev_refs, labels)
    if not texts or not dev_texts:
        raise TeacherError(f"finetune needs labelled train and dev rows, got {len(texts)} train, {len(dev_texts)} dev")
    base = resolve_base(model, cache_dir)
    # fp32 master weights; autocast supplies the low precision where the probe measured it faster
    t = load_base_teacher(model, cache_dir=cache_dir, device=device, dtype=dtype, threads=threads,
                          max_length=max_length, truncation=truncation, trust_remote_code=trust_remote_code,
                          autocast=True)
    t.kind, t.labels = "finetune", labels
    on_cpu = t.device.type == "cpu"
    frozen = on_cpu if freeze_embeddings is None else freeze_embeddings
    layers_frozen = freeze_bottom(t.model, freeze_layers, on_cpu, frozen)
    frozen = frozen or layers_frozen > 0
    if head_init not in HEAD_INITS:
        raise TeacherError(f"teacher.head_init {head_init!r} is not one of {', '.join(HEAD_INITS)}")
    dim = t.model.config.hidden_size
    t.head = make_head(dim, len(labels)).to(t.device)
    body = [p for p in t.model.parameters() if p.requires_grad]
    params = [{"params": body, "lr": lr}, {"params": t.head.parameters(), "lr": lr * 30}]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    steps = epochs * -(-len(texts) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, 1 - s / steps))
    scaler = torch.amp.GradScaler(t.device.type, enabled=t.autocast and t.dtype == torch.float16)
    ids = t.encode(texts)
    lengths = [len(s) for s in ids]
    g = torch.Generator().manual_seed(seed)
    recipe = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "patience": patience, "seed": seed,
              "freeze_embeddings": frozen, "freeze_layers": layers_frozen, "length_buckets": length_buckets,
              "max_length": max_length, "truncation": truncation, "dtype": t.precision.get("dtype"),
              "head_init": head_init, "probe_rows": probe_rows}
    fp = hashlib.sha256(json.dumps([base.ref, t.weights_hash, labels, texts, y.tolist(), dev_texts, yd.tolist(),
                                    recipe], ensure_ascii=False).encode()).hexdigest()
    ckpt_dir = checkpoint_dir or f"{teacher_dir}.checkpoint"
    best, best_state, bad, history, start, probe = -1.0, None, 0, [], 0, None
    if (ck := load_checkpoint(ckpt_dir, fp)) is not None:
        t.model.load_state_dict(ck["trainable"], strict=False)  # the frozen table is the base model's
        t.head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        scaler.load_state_dict(ck["scaler"])
        g.set_state(ck["rng_data"])
        torch.set_rng_state(ck["rng_torch"])
        best, bad, history, start = ck["best"], ck["bad"], ck["history"], ck["epoch"]
        best_state = (ck["trainable"], ck["head"]) if ck["best_is_last"] else ck["best_state"]
        log.info("finetune: resuming after epoch %d from %s", start, ckpt_dir)
        probe = ck.get("probe")
    elif head_init == "fit":
        probe = _linear_probe(t, texts, y, dev_texts, yd, batch_tokens, probe_rows, seed)
        t.head.load_state_dict(probe.pop("head").state_dict())

    def dev_predictions(rows: list[str]) -> np.ndarray:
        return run_batched(rows, t.encode, t.logits, len(labels), batch_tokens=batch_tokens, device=t.device,
                           pad_id=t.pad_id).argmax(1)

    for epoch in range(start, epochs):
        if start and epoch == start and bad >= patience:
            break  # the checkpointed run had already stopped early
        t.model.train()
        t.head.train()
        te = time.perf_counter()
        batches = bucket_batches(lengths, batch_size, g) if length_buckets else random_batches(len(ids), batch_size, g)
        total, seen = 0.0, 0
        with tqdm(batches, desc=f"fine-tune epoch {epoch + 1}/{epochs}", unit="step", disable=not progress,
                  leave=False, file=sys.stderr) as bar:
            for b in bar:
                input_ids, mask = collate([ids[i] for i in b], t.pad_id)
                input_ids, mask = input_ids.to(t.device), mask.to(t.device)
                opt.zero_grad()
                logits = t.logits(input_ids, mask)
                loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y[b], device=t.device))
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(body, 1.0)
                scaler.step(opt)
                scaler.update()
                sched.step()
                total, seen = total + float(loss.detach()) * len(b), seen + len(b)
                bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
        train_s = time.perf_counter() - te
        t.model.eval()
        t.head.eval()
        m = classification_metrics(yd, dev_predictions(dev_texts), len(labels))
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "train_seconds": round(train_s, 3), **m})
        log.info("finetune epoch %d: loss %.4f, dev accuracy %.4f, %.0f s", epoch + 1, total / max(seen, 1),
                 m["accuracy"], train_s)
        improved = m["accuracy"] > best
        if improved:
            best, bad = m["accuracy"], 0
            best_state = (trainable_state(t.model), trainable_state(t.head, buffers=True))
        else:
            bad += 1
        save_checkpoint(ckpt_dir, {
            "fingerprint": fp, "epoch": epoch + 1, "trainable": trainable_state(t.model),
            "head": trainable_state(t.head, buffers=True),
            "opt": opt.state_dict(), "sched": sched.state_dict(), "scaler": scaler.state_dict(),
            "rng_data": g.get_state(), "rng_torch": torch.get_rng_state(), "best": best, "bad": bad,
            "history": history, "probe": probe, "best_is_last": improved,
            "best_state": None if improved else best_state})
        if on_epoch is not None:
            on_epoch(epoch + 1)
        if bad >= patience:
            break
    unexpected = t.model.load_state_dict(best_state[0], strict=False).unexpected_keys
    assert not unexpected, f"trainable state names no encoder parameter: {unexpected[:3]}"  # frozen ones stay
    t.head.load_state_dict(best_state[1])
    metrics = {"dev": classification_metrics(yd, dev_predictions(dev_texts), len(labels))}
    if test_refs:
        test_texts, yt = _read_texts(run_dir, test_refs, labels)
        metrics["test"] = classification_metrics(yt, dev_predictions(test_texts), len(labels))

    def write_encoder(folder: str) -> None:
        enc_dir = join(folder, ENCODER_DIR)
        t.model.save_pretrained(enc_dir, safe_serialization=True)
        t.tokenizer.save_pretrained(enc_dir)

    meta = {
        "kind": "finetune", "name": f"{base.name}+finetune", "base_model": base.ref,
        "base_hash": base.source_hash, "labels": labels, "head": "linear",
        "head_config": {"type": "linear", "dim": dim}, "prefix": base.prefix, "pooling": "mean",
        "max_length": max_length, "truncation": truncation,
        "weights_hash": _combined_hash(state_hash(t.model), t.head),
        "metrics": metrics, "history": history, "linear_probe": probe, "train_rows": len(texts), "seed": seed,
        "params": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "patience": patience,
                   "freeze_embeddings": frozen, "freeze_layers": layers_frozen, "length_buckets": length_buckets,
                   "head_init": head_init, "probe_rows": probe_rows},
        "trainable_params": sum(p.numel() for p in body) + sum(p.numel() for p in t.head.parameters()),
        "precision": t.precision,
        "fit_seconds": round(time.perf_counter() - t0, 3),
    }
    meta = _save_teacher(teacher_dir, meta, t.head, write_files=write_encoder)
    if os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)  # the teacher is saved: nothing left to resume
    return meta


# ----------------------------------------------------------------------------------------------- fit: none
def map_labels(task_labels: Sequence[str], model_labels: Sequence[str],
               label_map: dict[str, str] | None = None) -> list[int]:
    """Model logit column for each task label: via ``label_map`` or equal names (then case-insensitive)."""
    label_map = label_map or {}
    stray = sorted(set(label_map) - set(task_labels))
    exact = {n: i for i, n in enumerate(model_labels)}
    folded = {n.casefold(): i for i, n in enumerate(model_labels)}
    index, missing = [], []
    for lab in task_labels:
        want = label_map.get(lab, lab)
        i = exact.get(want, folded.get(str(want).casefold()))
        if i is None:
            missing.append(f"{lab!r}" + (f" (mapped to {want!r})" if want != lab else ""))
        else:
            index.append(i)
    if missing or stray or len(set(index)) != len(index):
        problems = []
        if missing:
            problems.append(f"no model label for task label(s) {', '.join(missing)}")
        if stray:
            problems.append(f"label_map keys {stray} are not task labels")
        if not missing and len(set(index)) != len(index):
            problems.append("two task labels map to the same model label")
        raise TeacherError(
            f"the teacher's labels do not match the task's: {'; '.join(problems)}. Task labels: {list(task_labels)}; "
            f"model labels (id2label): {list(model_labels)}. Set teacher.label_map to {{task label: model label}}, "
            "or use fit: head to train a new head"
        )
    return index


def adopt_pretrained(teacher_dir: str, *, labels: Sequence[str], model: str,
                     label_map: dict[str, str] | None = None, max_length: int = 128, truncation: str = "head",
                     cache_dir: str | None = None, trust_remote_code: bool = False, device: str = "auto",
                     dtype: str = "auto") -> dict:
    """``fit: none``: use a sequence-classification checkpoint as is; record its label mapping."""
    from transformers import AutoConfig

    check_truncation(truncation)
    if model == "default":
        raise TeacherError("the default teacher (e5) has no classifier: use fit: head (or finetune), or set "
                           "teacher.model to a fine-tuned sequence-classification checkpoint")
    base = resolve_base(model, cache_dir)
    config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    id2label = getattr(config, "id2label", None) or {}
    model_labels = [id2label[i] for i in sorted(id2label, key=int)]
    index = map_labels(list(labels), model_labels, label_map)
    try:
        weights_hash = base_weights_hash(base)
    except TeacherError:  # a hub id: hash the loaded tensors
        weights_hash = state_hash(load_seqcls(base, trust_remote_code))
    meta = {
        "kind": "pretrained", "name": base.name, "base_model": base.ref, "base_hash": None,
        "labels": list(labels), "model_labels": model_labels, "label_index": index,
        "label_map": label_map or None, "head": None, "prefix": base.prefix, "max_length": max_length,
        "truncation": truncation, "weights_hash": weights_hash, "metrics": {},
        "precision": _precision(base.path, device, dtype, cache_dir, trust_remote_code, max_length),
    }
    return _save_teacher(teacher_dir, meta)


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate_teacher(run_dir: str, refs: Sequence[ShardRef], teacher_dir: str, *, device: str = "auto",
                     dtype: str = "auto", threads: int | None = None, batch_tokens: int = 16384,
                     cache_dir: str | None = None, trust_remote_code: bool = False) -> dict[str, float]:
    """Accuracy, macro-F1, MCC, rows (``n``) and texts/s of the fitted teacher on labelled SEGMENT shards
    (e.g. test)."""
    from slimflow.tasks.teacher.label import label_texts
    from slimflow.tasks.teacher.model import load_teacher

    teacher = load_teacher(teacher_dir, device=device, dtype=dtype, threads=threads, cache_dir=cache_dir,
                           trust_remote_code=trust_remote_code)
    texts, y = _read_texts(run_dir, refs, teacher.labels)
    t0 = time.perf_counter()
    pred = label_texts(teacher, texts, batch_tokens=batch_tokens).argmax(1) if texts else np.zeros(0, np.int64)
    secs = time.perf_counter() - t0
    return {**classification_metrics(y, pred, len(teacher.labels)), "qps": len(texts) / secs if secs > 0 else 0.0}


def record_metrics(teacher_dir: str, split: str, metrics: dict) -> dict:
    """Merge ``metrics`` under ``metrics[split]`` in teacher.json (atomically); returns the new json."""
    meta = read_teacher_json(teacher_dir)
    meta.setdefault("metrics", {})[split] = metrics
    atomic_write_text(join(teacher_dir, TEACHER_JSON), json.dumps(meta, indent=1, ensure_ascii=False))
    return meta
