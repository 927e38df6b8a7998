"""Training the ``transformer`` student (issue 15), called by ``train_student`` for ``kind="transformer"``.

The same out_dir contract, checkpoints and early stopping as the other students (tasks/students/train.py, whose
helpers this reuses): ``last.pt`` after every epoch (model, optimizer, LR schedule, torch RNG, step, history) is
the resume point, ``best.pt`` the best dev epoch with the config that rebuilds it, ``result.json`` written last.
What differs is the step:

- ``mode="baseline"``: cross-entropy on gold labels, from the same teacher-layer init (the human-labels-only row).
- ``mode="distilled"``, ``method="distill"``: :func:`~slimflow.tasks.students.losses.transformer_loss`, the
  weighted logit losses on the teacher's logits from the shards, a scheduled hard-label CE, and the feature losses
  (hidden_mse, attention_mse, pkd) against the teacher run alongside in inference mode on the same batch (its
  layers over the same trimmed vocabulary: the pieces, and so the tokens, line up one to one).
- ``method="theseus"``: BERT-of-Theseus's mixed model (tasks/students/transformer.theseus_logits) trained on the
  logit losses alone, the replacement rate growing linearly per step; dev accuracy is the student's alone.

Deterministic on the CPU: dropout and Theseus draws come from torch's RNG, saved in last.pt, and the batches from
ShardStream's (seed, epoch). The steps run under autocast (fp32 weights and optimizer) in the dtype the teacher's
precision probe measures fastest at the student's GEMM shape on its device (slimflow.tasks.teacher.precision,
cached per machine): bf16 on a GPU with it, and on CPUs where bf16 GEMMs beat fp32 (an AVX512-BF16 EPYC: 937 vs
219 GFLOP/s), fp32 elsewhere. The dtype keys the training (a resume never mixes two) and is in result.json.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from contextlib import nullcontext

from slimflow.storage.fs import atomic_write_text
from slimflow.storage.hashing import fingerprint
from slimflow.storage.shards import ShardRef
from slimflow.tasks.students.data import ShardStream
from slimflow.tasks.students.train import (
    CKPT_FORMAT,
    EpochMeter,
    _result_files,
    _save,
    begin_training,
    best_epoch,
    finished_training,
    resume_state,
    stop_early,
)
from slimflow.tasks.students.vocab import Vocab

METHODS = ("distill", "theseus")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_teacher_parts(teacher_dir: str, *, cache_dir: str | None = None, trust_remote_code: bool = False):
    """(encoder or seq-cls model, fitted head or None, teacher.json's weights_hash) of a fitted teacher, fp32 CPU."""
    import torch
    from slimflow.tasks.teacher.model import load_teacher, read_teacher_json

    # threads: the caller's setting (train_student's transformer.threads); None would reset torch to all cores.
    t = load_teacher(teacher_dir, device="cpu", dtype="fp32", threads=torch.get_num_threads(), cache_dir=cache_dir,
                     trust_remote_code=trust_remote_code, reuse=False)
    return t.model, t.head, read_teacher_json(teacher_dir)["weights_hash"]


def train_transformer(run_dir: str, *, mode: str, train_refs: list[ShardRef], dev_refs: list[ShardRef],
                      vocab: Vocab, labels: list[str], out_dir: str, teacher_dir: str, settings: dict,
                      progress: bool | None = None, on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train a transformer student from ``teacher_dir``'s layers; ``settings`` is the config's ``transformer``
    section (flows/config.TransformerConfig, as a dict). Returns train_student's result dict."""
    import torch
    from slimflow.tasks.students.losses import check_transformer_losses
    from slimflow.tasks.students.transformer import bert_body, from_teacher, layer_maps, theseus_modules
    from tokenizers import Tokenizer

    s = dict(settings)
    if mode not in ("baseline", "distilled"):
        raise ValueError(f"unknown mode {mode!r}; choose one of: baseline, distilled")
    if s["method"] not in METHODS:
        raise ValueError(f"unknown transformer.method {s['method']!r}; choose one of: {', '.join(METHODS)}")
    check_transformer_losses(s["losses"])
    if vocab.unit != "subword":
        raise ValueError(f"the transformer student reads the teacher's pieces: its vocabulary must be a subword "
                         f"one, got {vocab.unit!r}")
    if not train_refs or not dev_refs:
        raise ValueError(f"train_student needs train and dev shards; got {len(train_refs)} train, {len(dev_refs)} dev")
    encoder, head, weights_hash = load_teacher_parts(teacher_dir, cache_dir=s.get("cache_dir"),
                                                     trust_remote_code=bool(s.get("trust_remote_code")))
    tok = Tokenizer.from_str(vocab.tokenizer)
    method = s["method"] if mode == "distilled" else "distill"
    # What keys the training (execution-only settings, device and threads, do not).
    keys = ("layers", "losses", "temperature", "temperature_schedule", "hard_label_weight",
            "hard_label_weight_schedule", "kd_weight_schedule", "method", "theseus_rate", "theseus_slope", "max_len",
            "epochs", "patience", "batch_size", "lr", "warmup", "weight_decay", "dropout", "shuffle_buffer", "seed")
    params = {"kind": "transformer", "mode": mode, **{k: s[k] for k in keys}, "method": method}
    if s.get("width", 1.0) < 1:  # a full-width student keys as it did before width existed
        params["width"] = s["width"]
    if method != "theseus":  # settings that do not change the training do not key it
        del params["theseus_rate"], params["theseus_slope"]
    device = resolve_device(s.get("device", "auto"))
    precision = _precision(encoder, device, s.get("cache_dir"))
    params["amp"] = precision["dtype"]
    fp = fingerprint("train_student", params, [r.sha256 for r in train_refs], [r.sha256 for r in dev_refs],
                     vocab.fingerprint, list(labels), weights_hash)
    if (done := finished_training(out_dir, fp)) is not None:
        return done
    result_path, last_path, best_path = begin_training(out_dir, vocab, labels)

    from slimflow.tasks.students.train import _INIT_LOCK

    with _INIT_LOCK:  # the student is copied, not drawn, but its classifier may be random: seed as the others do
        torch.manual_seed(s["seed"])
        model, model_config = from_teacher(encoder, tok, vocab.itos, len(labels), layers=s["layers"],
                                           max_len=s["max_len"], dropout=s["dropout"], head=head)
    if "width" in params:
        model, model_config = _prune(model, model_config, run_dir, train_refs, vocab, labels, mode, s)
    model_config["lowercase"] = vocab.lowercase
    n_teacher = len(bert_body(encoder).encoder.layer)
    feature_losses = [k for k, w in s["losses"].items() if w > 0 and k in ("hidden_mse", "attention_mse", "pkd")]
    teacher = None
    if mode == "distilled" and (feature_losses or method == "theseus"):
        teacher, _ = from_teacher(encoder, tok, vocab.itos, len(labels), layers=range(n_teacher),
                                  max_len=s["max_len"], dropout=0.0)
        teacher.eval().requires_grad_(False)
    del encoder
    model.to(device)
    if teacher is not None:
        teacher.to(device)

    train = ShardStream(run_dir, train_refs, mode=mode, vocab=vocab, labels=labels, batch_size=s["batch_size"],
                        max_len=s["max_len"], shuffle=True, shuffle_buffer=s["shuffle_buffer"], seed=s["seed"])
    dev = ShardStream(run_dir, dev_refs, mode="baseline", vocab=vocab, labels=labels, batch_size=64,
                      max_len=s["max_len"], shuffle=False)
    steps_per_epoch = max(1, math.ceil(train.rows_upper_bound / s["batch_size"]))
    total_steps = steps_per_epoch * s["epochs"]
    # No weight decay on biases and LayerNorms (BERT's recipe).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s["lr"])
    warm = max(1, int(s["warmup"] * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warm, max(0.0, (total_steps - k) / max(1, total_steps - warm))))
    history: list[dict] = []
    start_epoch, step = 0, 0
    if (state := resume_state(last_path, fp)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch, step = list(state["history"]), int(state["epoch"]), int(state["step"])
    ctx = {"params": params, "settings": s, "teacher": teacher, "maps": layer_maps(model_config["layers"]),
           "kept_heads": model_config.get("kept_heads"), "layers": model_config["layers"],
           "modules": theseus_modules(model_config["layers"], n_teacher), "device": device, "amp": params["amp"],
           # fp16 only: bf16 and fp32 keep fp32's exponent range, their gradients need no scaling
           "scaler": torch.amp.GradScaler(device.split(":")[0], enabled=params["amp"] == "fp16"),
           "total_steps": total_steps, "show": sys.stderr.isatty() if progress is None else progress}

    epoch = start_epoch
    while epoch < s["epochs"] and not stop_early(history, s["patience"]):
        entry, step = _run_epoch(model, opt, sched, train, dev, epoch, step, ctx)
        prev_best, _ = best_epoch(history)
        history.append(entry)
        if entry["dev_accuracy"] > prev_best:
            _save({"format": CKPT_FORMAT, "model": _cpu_state(model), "config": model_config,
                   "labels": list(labels), "epoch": epoch, "dev_accuracy": entry["dev_accuracy"]}, best_path)
        epoch += 1
        _save({"format": CKPT_FORMAT, "fingerprint": fp, "model": _cpu_state(model), "optimizer": opt.state_dict(),
               "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "epoch": epoch, "step": step,
               "history": history, "params": params}, last_path)
        if on_epoch_end is not None:
            on_epoch_end(entry)

    best_acc, best_at = best_epoch(history)
    result = {"fingerprint": fp, "kind": "transformer", "mode": mode, "best_dev_accuracy": best_acc,
              "best_epoch": best_at, "epochs_run": len(history), "stopped_early": len(history) < s["epochs"],
              "checkpoint": best_path, "out_dir": out_dir, "params": params, "model_config": model_config,
              "labels": list(labels), "train_rows_skipped": train.skipped, "history": history, "precision": precision,
              "files": _result_files(out_dir)}
    atomic_write_text(result_path, json.dumps(result, indent=1, ensure_ascii=False))
    return result


def _prune(model, model_config: dict, run_dir: str, train_refs: list[ShardRef], vocab: Vocab, labels: list[str],
           mode: str, s: dict):
    """The student cut to ``s["width"]`` (tasks/students/prune.py), importance measured on the first training
    batches of the run's seed with the loss it will train on: the teacher's soft labels, gold ones in baseline."""
    import itertools

    import torch
    from slimflow.tasks.students.losses import hard_ce, kl
    from slimflow.tasks.students.prune import IMPORTANCE_BATCHES, importance, prune

    stream = ShardStream(run_dir, train_refs, mode=mode, vocab=vocab, labels=labels, batch_size=s["batch_size"],
                         max_len=s["max_len"], shuffle=True, shuffle_buffer=s["shuffle_buffer"], seed=s["seed"])

    def loss(m, b):
        logits = m(torch.from_numpy(b.ids), torch.from_numpy(b.lengths))
        if mode == "baseline":
            return hard_ce(logits, torch.from_numpy(b.labels))
        return kl(logits, torch.from_numpy(b.logits_t))

    heads, neurons = importance(model, itertools.islice(stream.epoch(0), IMPORTANCE_BATCHES), loss)
    return prune(model, model_config, heads, neurons, s["width"])


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}


def _precision(encoder, device: str, cache_dir: str | None) -> dict:
    """The teacher's ``dtype: auto`` probe at this encoder's GEMM shape on ``device``: fp32, bf16, or fp16 (GPUs
    without bf16; its steps then go through a gradient scaler)."""
    import torch
    from slimflow.tasks.teacher.precision import gemm_shape, probe

    return probe(gemm_shape(encoder.config), torch.device(device), cache_dir=cache_dir)


def _autocast(device: str, amp: str = "fp32"):
    import torch

    if amp == "fp32":
        return nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu",
                          dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _step_loss(model, batch, step: int, ctx: dict):
    """(total loss, {part: value}) of one batch."""
    import torch
    from slimflow.tasks.students.losses import (
        hard_ce,
        scheduled_temperature,
        scheduled_weight,
        transformer_loss,
    )
    from slimflow.tasks.students.transformer import theseus_logits

    s, params, dev = ctx["settings"], ctx["params"], ctx["device"]
    ids, lengths = torch.from_numpy(batch.ids).to(dev), torch.from_numpy(batch.lengths).to(dev)
    labels = torch.from_numpy(batch.labels).to(dev)
    if params["mode"] == "baseline":
        logits = model(ids, lengths)
        part = hard_ce(logits, labels)
        return part, {"ce": part.item()}
    f = step / ctx["total_steps"]
    logits_t = torch.from_numpy(batch.logits_t).to(dev)
    kd = scheduled_weight(s["kd_weight_schedule"], 1.0, f)
    weights = {k: w * kd if k in ("mse", "kl", "ce") else w for k, w in s["losses"].items()}
    hard = scheduled_weight(s["hard_label_weight_schedule"], s["hard_label_weight"], f)
    teacher = ctx["teacher"]
    if params["method"] == "theseus":
        rate = theseus_rate(step, ctx["total_steps"], s["theseus_rate"], s["theseus_slope"])
        logits = theseus_logits(model, teacher, ctx["modules"], ids, lengths, rate)
        weights = {k: w for k, w in weights.items() if k in ("mse", "kl", "ce")}  # Theseus: no feature loss
        feats_s = feats_t = None
    else:
        feats_s = model.features(ids, lengths)
        logits = feats_s.logits
        feats_t = None
        if teacher is not None:
            with torch.inference_mode():
                feats_t = teacher.features(ids, lengths)
            feats_t = _clone(feats_t)
            if ctx["kept_heads"] is not None:
                from slimflow.tasks.students.prune import kept_teacher_scores

                feats_t.scores = kept_teacher_scores(feats_t.scores, ctx["kept_heads"], ctx["layers"])
    temp = scheduled_temperature(s["temperature_schedule"], s["temperature"], f, logits.float(), logits_t)
    return transformer_loss(weights, logits.float(), logits_t, labels, temperature=temp, hard_label_weight=hard,
                            feats_s=feats_s, feats_t=feats_t, maps=ctx["maps"])


# theseus_slope None: the replacement rate reaches 1 this far into training
THESEUS_RAMP = 2 / 3


def theseus_rate(step: int, total_steps: int, rate: float, slope: float | None) -> float:
    """The replacement rate at ``step``: ``rate`` plus ``slope`` per step, at most 1; ``slope`` None: the one
    that reaches 1 at THESEUS_RAMP of ``total_steps``; 0: constant."""
    if slope is None:
        slope = (1.0 - rate) / max(1.0, THESEUS_RAMP * total_steps)
    return min(1.0, rate + slope * step)


def _clone(feats):
    # Inference tensors cannot enter autograd (as targets of a loss); plain copies can.
    from dataclasses import fields, replace

    def c(v):
        return [t.clone() for t in v] if isinstance(v, list) else v.clone()

    return replace(feats, **{f.name: c(getattr(feats, f.name)) for f in fields(feats)})


def _run_epoch(model, opt, sched, train: ShardStream, dev: ShardStream, epoch: int, step: int, ctx: dict):
    from tqdm import tqdm

    params = ctx["params"]
    model.train()
    meter = EpochMeter(tqdm(total=train.rows_upper_bound, desc=f"transformer {params['mode']} epoch {epoch + 1}",
                            unit="row", disable=not ctx["show"], leave=False))
    scaler = ctx["scaler"]
    for b in train.epoch(epoch):
        with _autocast(ctx["device"], ctx["amp"]):
            total, parts = _step_loss(model, b, step, ctx)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        meter.add(total.item(), parts, len(b))
    return meter.close(epoch, *predict(model, dev, ctx["device"], ctx["amp"]), len(train.labels)), step


def predict(model, stream: ShardStream, device: str = "cpu", amp: str = "fp32") -> tuple[list[int], list[int]]:
    """(gold, predicted) class ids over a non-shuffled stream, in eval mode without gradients."""
    import torch

    was_training = model.training
    model.eval()
    y_true: list[int] = []
    y_pred: list[int] = []
    with torch.inference_mode(), _autocast(device, amp):
        for b in stream.epoch(0):
            logits = model(torch.from_numpy(b.ids).to(device), torch.from_numpy(b.lengths).to(device))
            y_pred.extend(logits.argmax(-1).tolist())
            y_true.extend(b.gold.tolist())
    model.train(was_training)
    return y_true, y_pred
