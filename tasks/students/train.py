"""Train one student (step 3 of ERNIE Slim's data distillation): baseline on gold labels, or distilled on
teacher logits, with early stopping on dev accuracy and a resumable checkpoint after every epoch.

``out_dir`` after a completed call::

    last.pt      model + optimizer + torch RNG state + epoch + history (resume point, rewritten each epoch)
    best.pt      the best dev epoch's weights + what is needed to rebuild the model (config, labels)
    vocab.json   labels.json
    result.json  written last: the training finished, with the sha256 of best.pt, vocab.json and labels.json
                 (a rerun returns it as is while they match it; load_student refuses a folder that does not)
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from slimflow.storage.fs import atomic_write_bytes, atomic_write_text, exists, join, makedirs, read_bytes
from slimflow.storage.hashing import fingerprint, sha256_bytes, sha256_file
from slimflow.storage.shards import ShardRef
from slimflow.tasks.students.data import MODES, Mode, ShardStream
from slimflow.tasks.students.evaluate import classification_metrics
from slimflow.tasks.students.vocab import Vocab

# torch, models and losses are imported inside the functions: importing this module (the flows do, to wrap
# train_student in a task) stays cheap.

OPTIMIZERS = ("adadelta", "adam")
_INIT_LOCK = threading.Lock()
DEFAULT_LR = {"adadelta": 1.0, "adam": 1e-3}  # adadelta: lr 1.0, rho 0.95 as the seeds (PaddleNLP distill)
# A BOW under Adam takes 3e-3: a mean of embeddings learns slowly at 1e-3 and was still climbing on dev after the
# quick preset's 6 epochs. Measured on zh-reviews' and en-reviews' labelled transfer sets (2-5 seeds each, units
# words / chars / subword, random and teacher init): dev accuracy higher in all seven settings (+0.4 to +1.8
# points), test -0.45 to +2.2 (mean +0.3). 1e-2 was worse (zh chars: test 0.3 below 3e-3). The BiLSTM at 2e-3
# split its seeds (+0.5 / -0.7 on en words), so it keeps 1e-3.
KIND_LR = {("adam", "bow"): 3e-3}
CKPT_FORMAT = 2  # 2: optimizer state is a list (dense part, sparse embedding part)


def default_lr(optimizer: str, kind: str) -> float:
    """The learning rate a ``kind`` student trains at under ``optimizer`` when the config gives none."""
    return KIND_LR.get((optimizer, kind), DEFAULT_LR[optimizer])


def _save(obj, path: str) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: str):
    import torch

    # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
    return torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)


class _Optimizer:
    """AdaDelta (the seeds: lr 1.0, rho 0.95) or Adam over a student's parameters.

    Adam updates embedding tables lazily: their gradients are sparse (a batch touches a few thousand of 50k
    rows) and SparseAdam moves only the touched rows' moments ("lazy Adam"). A dense Adam step over a 50k x 128
    table cost ~70-120 ms here, most of a BOW student's training step. AdaDelta has no sparse form: dense.
    """

    def __init__(self, name: str, model, lr: float):
        import torch
        from torch import nn

        if name == "adadelta":
            self.parts = [torch.optim.Adadelta(model.parameters(), lr=lr, rho=0.95, eps=1e-6)]
            return
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        for m in embeddings:
            m.sparse = True  # gradient only; exported and scripted models are unaffected
        sparse_ids = {id(m.weight) for m in embeddings}
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        self.parts = [torch.optim.Adam(dense, lr=lr)]
        if embeddings:
            self.parts.append(torch.optim.SparseAdam([m.weight for m in embeddings], lr=lr))

    def zero_grad(self) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.parts]

    def load_state_dict(self, states: list[dict]) -> None:
        for o, st in zip(self.parts, states, strict=True):
            o.load_state_dict(st)


def predict_stream(model, stream: ShardStream) -> tuple[list[int], list[int]]:
    """(gold, predicted) class ids over a non-shuffled stream, in eval mode without gradients."""
    import torch

    was_training = model.training
    model.eval()
    y_true: list[int] = []
    y_pred: list[int] = []
    with torch.inference_mode():
        for b in stream.epoch(0):
            logits = model(torch.from_numpy(b.ids), torch.from_numpy(b.lengths))
            y_pred.extend(logits.argmax(-1).tolist())
            y_true.extend(b.gold.tolist())
    model.train(was_training)
    return y_true, y_pred


def train_student(run_dir: str, *, kind: str, mode: Mode, train_refs: list[ShardRef], dev_refs: list[ShardRef],
                  vocab: Vocab, labels: list[str], out_dir: str, loss: str = "mse", temperature: float = 1.0,
                  alpha: float = 0.5, embed_dim: int = 128, hidden: int = 128, dropout: float = 0.0,
                  max_len: int = 128, epochs: int = 10, patience: int = 2, batch_size: int = 64,
                  optimizer: str = "adam", lr: float | None = None, shuffle_buffer: int = 10000, seed: int = 0,
                  threads: int | None = 1, progress: bool | None = None,
                  on_epoch_end: Callable[[dict], None] | None = None, init_vectors=None,
                  transformer: dict | None = None, teacher_dir: str | None = None) -> dict:
    """Train a ``kind`` student and return ``{"best_dev_accuracy", "best_epoch", "epochs_run", "checkpoint",
    "out_dir", "history", "params", ...}``.

    mode "baseline": cross-entropy on gold labels of SEGMENT shards (``loss`` is ignored).
    mode "distilled": ``loss`` (mse | kl | ce | mix, see losses.py) on LABELLED shards' teacher logits.
    ``init_vectors``: [len(vocab), embed_dim] float32 initial embedding table (tasks/students/static.py), else
    the model's own random initialisation.
    Resumes from ``out_dir/last.pt`` when it was written by a call with the same inputs and params; a
    resumed run ends with the same weights and result as an uninterrupted one. ``on_epoch_end`` receives
    each epoch's history entry after its checkpoint is on disk (for logging). ``threads``: torch intra-op
    threads for this call (None: leave torch's setting). Default 1: these models' ops are too small to split;
    on the 2-core box 2 threads trained 2-7x slower than 1 (measured while other work shared the CPU).
    """
    kwargs = dict(locals())  # first statement: exactly the arguments
    del kwargs["run_dir"], kwargs["threads"], kwargs["transformer"], kwargs["teacher_dir"]
    if kind == "transformer":  # the teacher's own layers (issue 15): tasks/students/transformer_train.py
        if transformer is None or teacher_dir is None:
            raise ValueError("kind 'transformer' needs the config's transformer section and the fitted teacher_dir")
        from slimflow.tasks.students.transformer_train import train_transformer

        # Its own threads setting: big matrix products split well over cores, unlike the small students' ops.
        with _num_threads(transformer.get("threads")):
            return train_transformer(run_dir, mode=mode, train_refs=train_refs, dev_refs=dev_refs, vocab=vocab,
                                     labels=labels, out_dir=out_dir, teacher_dir=teacher_dir, settings=transformer,
                                     progress=progress, on_epoch_end=on_epoch_end)
    with _num_threads(threads):
        return _train(run_dir, **kwargs)


@contextmanager
def _num_threads(n: int | None):
    import torch

    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _train(run_dir: str, *, kind: str, mode: Mode, train_refs: list[ShardRef], dev_refs: list[ShardRef],
           vocab: Vocab, labels: list[str], out_dir: str, loss: str, temperature: float, alpha: float,
           embed_dim: int, hidden: int, dropout: float, max_len: int, epochs: int, patience: int, batch_size: int,
           optimizer: str, lr: float | None, shuffle_buffer: int, seed: int, progress: bool | None,
           on_epoch_end: Callable[[dict], None] | None, init_vectors) -> dict:
    import numpy as np
    import torch
    from slimflow.tasks.students.losses import check_loss
    from slimflow.tasks.students.models import student_class

    student_class(kind)  # unknown kinds fail before any work, with the valid choices
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "distilled":
        check_loss(loss)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if not train_refs or not dev_refs:
        raise ValueError("train_student needs train and dev shards; got "
                         f"{len(train_refs)} train, {len(dev_refs)} dev")
    init = "random"
    if init_vectors is not None:
        init_vectors = np.ascontiguousarray(init_vectors, dtype=np.float32)
        if init_vectors.shape != (len(vocab), embed_dim):
            raise ValueError(f"init_vectors has shape {init_vectors.shape}, the embedding table is "
                             f"({len(vocab)}, {embed_dim}); compute them for this vocabulary and embed_dim")
        init = "vectors:" + sha256_bytes(init_vectors.tobytes())
    params = {"kind": kind, "mode": mode, "loss": loss if mode == "distilled" else "ce", "temperature": temperature,
              "alpha": alpha, "embed_dim": embed_dim, "hidden": hidden, "dropout": dropout, "max_len": max_len,
              "epochs": epochs, "patience": patience, "batch_size": batch_size, "optimizer": optimizer,
              "lr": default_lr(optimizer, kind) if lr is None else lr, "shuffle_buffer": shuffle_buffer, "seed": seed,
              "init": init}
    fp = fingerprint("train_student", params, [r.sha256 for r in train_refs], [r.sha256 for r in dev_refs],
                     vocab.fingerprint, list(labels))
    if (done := finished_training(out_dir, fp)) is not None:
        return done
    result_path, last_path, best_path = begin_training(out_dir, vocab, labels)
    model_config = {"kind": kind, "vocab_size": len(vocab), "num_classes": len(labels), "embed_dim": embed_dim,
                    "hidden": hidden, "dropout": dropout, "max_len": max_len, "lowercase": vocab.lowercase}

    with _INIT_LOCK:  # torch's RNG is process-wide: two trainings in one thread runner would interleave draws
        torch.manual_seed(seed)
        model = student_class(kind)(len(vocab), len(labels), embed_dim=embed_dim, hidden=hidden, dropout=dropout)
        if init_vectors is not None:
            with torch.no_grad():
                model.embed.weight.copy_(torch.from_numpy(init_vectors))
    opt = _Optimizer(optimizer, model, params["lr"])
    history: list[dict] = []
    start_epoch = 0
    if (state := resume_state(last_path, fp)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch = list(state["history"]), int(state["epoch"])

    train = ShardStream(run_dir, train_refs, mode=mode, vocab=vocab, labels=labels, batch_size=batch_size,
                        max_len=max_len, shuffle=True, shuffle_buffer=shuffle_buffer, seed=seed)
    dev = ShardStream(run_dir, dev_refs, mode="baseline", vocab=vocab, labels=labels, batch_size=256,
                      max_len=max_len, shuffle=False)
    show = sys.stderr.isatty() if progress is None else progress

    epoch = start_epoch
    while epoch < epochs and not stop_early(history, patience):
        entry = _run_epoch(model, opt, train, dev, epoch, params, show)
        prev_best, _ = best_epoch(history)
        history.append(entry)
        if entry["dev_accuracy"] > prev_best:
            # best.pt before last.pt: if killed in between, the resumed epoch rewrites the same best.pt.
            _save({"format": CKPT_FORMAT, "model": model.state_dict(), "config": model_config,
                   "labels": list(labels), "epoch": epoch, "dev_accuracy": entry["dev_accuracy"]}, best_path)
        epoch += 1
        _save({"format": CKPT_FORMAT, "fingerprint": fp, "model": model.state_dict(),
               "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
               "history": history, "params": params}, last_path)
        if on_epoch_end is not None:
            on_epoch_end(entry)

    best_acc, best_at = best_epoch(history)
    result = {"fingerprint": fp, "kind": kind, "mode": mode, "best_dev_accuracy": best_acc,
              "best_epoch": best_at, "epochs_run": len(history),
              "stopped_early": len(history) < epochs, "checkpoint": best_path, "out_dir": out_dir,
              "params": params, "model_config": model_config, "labels": list(labels),
              "train_rows_skipped": train.skipped, "history": history, "files": _result_files(out_dir)}
    atomic_write_text(result_path, json.dumps(result, indent=1, ensure_ascii=False))
    return result


def finished_training(out_dir: str, fp: str) -> dict | None:
    """result.json of the training ``fp`` already done in ``out_dir``, or None. Its files must still be the ones
    it went with: a later call for other inputs, killed midway, may have rewritten best.pt or vocab.json under it
    (issue 13). Then the training is redone (from last.pt)."""
    result_path = join(out_dir, "result.json")
    if exists(result_path):
        done = json.loads(read_bytes(result_path).decode("utf-8"))
        if done.get("fingerprint") == fp and _files_match(out_dir, done):
            return done
    return None


def begin_training(out_dir: str, vocab: Vocab, labels: list[str]) -> tuple[str, str, str]:
    """Write the vocabulary and labels a training reads into ``out_dir``; its (result.json, last.pt, best.pt)."""
    makedirs(out_dir)
    vocab.save(join(out_dir, "vocab.json"))
    atomic_write_text(join(out_dir, "labels.json"), json.dumps(list(labels), ensure_ascii=False))
    return tuple(join(out_dir, n) for n in ("result.json", "last.pt", "best.pt"))


def resume_state(last_path: str, fp: str) -> dict | None:
    """The last.pt checkpoint of the training ``fp``, or None: one written for other inputs or params is
    overwritten after the first epoch."""
    if not exists(last_path):
        return None
    state = _load(last_path)
    return state if state.get("format") == CKPT_FORMAT and state.get("fingerprint") == fp else None


def best_epoch(history: list[dict]) -> tuple[float, int]:
    """(dev accuracy, epoch) of the best epoch so far, the earliest on a tie; (-1, -1) before the first."""
    best = max(history, key=lambda h: (h["dev_accuracy"], -h["epoch"]), default=None)
    return (best["dev_accuracy"], best["epoch"]) if best else (-1.0, -1)


def stop_early(history: list[dict], patience: int) -> bool:
    """``patience`` epochs since the best one."""
    return bool(history) and history[-1]["epoch"] - best_epoch(history)[1] >= patience


def _result_files(out_dir: str) -> dict[str, dict]:
    """{name: {sha256}} of the files a finished training hands on (what load_student reads), for result.json."""
    from slimflow.tasks.students.vocab import tokenizer_path

    names = ["best.pt", "vocab.json", "labels.json"]
    if exists(tokenizer_path(join(out_dir, "vocab.json"))):
        names.append(tokenizer_path("vocab.json"))
    return {n: {"sha256": sha256_file(join(out_dir, n))} for n in names}


def _files_match(out_dir: str, result: dict) -> bool:
    files = result.get("files") or {}
    return bool(files) and all(exists(join(out_dir, n)) and sha256_file(join(out_dir, n)) == r["sha256"]
                               for n, r in files.items())


def _run_epoch(model, opt, train: ShardStream, dev: ShardStream, epoch: int, params: dict, show: bool) -> dict:
    import torch
    from slimflow.tasks.students.losses import compute_loss
    from tqdm import tqdm

    model.train()
    meter = EpochMeter(tqdm(total=train.rows_upper_bound, desc=f"{params['kind']} {params['mode']} epoch {epoch + 1}",
                            unit="row", disable=not show, leave=False))
    for b in train.epoch(epoch):
        logits_s = model(torch.from_numpy(b.ids), torch.from_numpy(b.lengths))
        logits_t = torch.from_numpy(b.logits_t) if b.logits_t is not None else None
        total, parts = compute_loss(params["loss"], logits_s, logits_t, torch.from_numpy(b.labels),
                                    temperature=params["temperature"], alpha=params["alpha"])
        opt.zero_grad()
        total.backward()
        opt.step()
        meter.add(total.item(), parts, len(b))
    return meter.close(epoch, *predict_stream(model, dev), len(train.labels))


class EpochMeter:
    """One training epoch's running figures: row-weighted mean loss and loss parts, shown on ``bar`` as they
    go, and the epoch's history entry with the dev scores at the end."""

    def __init__(self, bar):
        self.bar, self.t0 = bar, time.perf_counter()
        self.rows, self.total, self.parts = 0, 0.0, {}

    def add(self, loss: float, parts: dict[str, float], n: int) -> None:
        self.rows += n
        self.total += loss * n
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v * n
        self.bar.update(n)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self, epoch: int, y_true: list[int], y_pred: list[int], num_classes: int) -> dict:
        self.bar.close()
        m = classification_metrics(y_true, y_pred, num_classes)
        rows = max(self.rows, 1)
        return {"epoch": epoch, "train_loss": self.total / rows,
                "train_parts": {k: v / rows for k, v in self.parts.items()}, "train_rows": self.rows,
                "dev_accuracy": m["accuracy"], "dev_macro_f1": m["macro_f1"], "dev_mcc": m["mcc"],
                "seconds": time.perf_counter() - self.t0}


def load_student(train_dir: str):
    """(model in eval mode, vocab, labels, model_config) from a ``train_student`` out_dir's best.pt.

    Only a finished training is loaded, and only with the files its result.json records (their sha256): a
    best.pt and vocab.json from two different trainings are refused, naming the file."""
    from slimflow.storage.atomic_dir import check_hashes
    from slimflow.tasks.students.models import student_class

    result_path = join(train_dir, "result.json")
    fix = f"re-run the training: `slimflow rerun RUN_DIR --stage train` (RUN_DIR holding {train_dir})"
    if not exists(result_path):
        raise FileNotFoundError(f"{train_dir} has no result.json: its training never finished; {fix}")
    files = json.loads(read_bytes(result_path).decode("utf-8")).get("files")
    if files:  # result.json written before issue 13 records none
        check_hashes(train_dir, files, fix)
    state = _load(join(train_dir, "best.pt"))
    cfg = state["config"]
    if cfg["kind"] == "transformer":
        from slimflow.tasks.students.transformer import build_from_config

        model = build_from_config(cfg)
        model.load_state_dict(state["model"])
        return model.eval(), Vocab.load(join(train_dir, "vocab.json")), list(state["labels"]), cfg
    model = student_class(cfg["kind"])(cfg["vocab_size"], cfg["num_classes"], embed_dim=cfg["embed_dim"],
                                       hidden=cfg["hidden"], dropout=cfg["dropout"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, Vocab.load(join(train_dir, "vocab.json")), list(state["labels"]), cfg


def evaluate_student(run_dir: str, refs: list[ShardRef], train_dir: str, batch_size: int = 256) -> dict:
    """Accuracy, macro-F1, MCC of a trained student (best.pt) on gold-labelled shards (e.g. test)."""
    model, vocab, labels, cfg = load_student(train_dir)
    stream = ShardStream(run_dir, refs, mode="baseline", vocab=vocab, labels=labels, batch_size=batch_size,
                         max_len=cfg["max_len"], shuffle=False)
    y_true, y_pred = predict_stream(model, stream)
    return classification_metrics(y_true, y_pred, len(labels))
