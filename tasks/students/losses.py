"""Distillation losses: pure functions with one signature ``(logits_s, logits_t, temperature) -> scalar``
(TextBrewer's ``KD_LOSS_MAP`` style), a dict registry, and :func:`compute_loss` for the training loop.

Shapes: logits_s, logits_t [B, C] float; labels [B] int64 (class index).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor, float], Tensor]


def mse(logits_s: Tensor, logits_t: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean squared error between raw logits (Tang et al. 2019, eq. 2; the seeds' default).

    Temperature is ignored: logits carry the teacher's confidence already, softening would only rescale."""
    return F.mse_loss(logits_s, logits_t)


def kl(logits_s: Tensor, logits_t: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t || p_s) on temperature-softened probabilities, times T^2 so the gradient scale does not
    shrink as T grows (Hinton et al. 2015, section 2). Mean over the batch."""
    if isinstance(temperature, Tensor):  # [B] per-row temperatures (flsw / cwsm schedules): each row times T_i^2
        t = temperature.detach().to(logits_s.dtype).unsqueeze(-1)
        log_p_s, log_p_t = F.log_softmax(logits_s / t, dim=-1), F.log_softmax(logits_t / t, dim=-1)
        rows = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
        return (rows * t.squeeze(-1) ** 2).mean()
    t = float(temperature)
    log_p_s = F.log_softmax(logits_s / t, dim=-1)
    log_p_t = F.log_softmax(logits_t / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def ce(logits_s: Tensor, logits_t: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy on the teacher's hard label, argmax(logits_t) (ERNIE Slim's "hard-label distillation")."""
    return F.cross_entropy(logits_s, logits_t.argmax(-1))


def hard_ce(logits_s: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy on given class indices (gold labels, or gold-else-teacher for ``mix``)."""
    return F.cross_entropy(logits_s, labels)


LOSSES: dict[str, LossFn] = {"mse": mse, "kl": kl, "ce": ce}
MIX = "mix"  # alpha * hard CE + (1 - alpha) * a soft loss: composed in compute_loss, not a LossFn


def register_loss(name: str, fn: LossFn) -> None:
    """Add a soft loss ``fn(logits_s, logits_t, temperature) -> scalar`` under ``name``."""
    if name == MIX:
        raise ValueError(f"{MIX!r} is reserved for alpha * CE + (1 - alpha) * soft")
    LOSSES[name] = fn


def loss_names() -> list[str]:
    return sorted([*LOSSES, MIX])


def check_loss(name: str, soft: str = "kl") -> None:
    """Raise for an unknown loss name, listing the valid ones (call when building the config)."""
    if name != MIX and name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; choose one of: {', '.join(loss_names())}")
    if name == MIX and soft not in LOSSES:
        raise ValueError(f"unknown soft loss {soft!r} for mix; choose one of: {', '.join(sorted(LOSSES))}")


def compute_loss(name: str, logits_s: Tensor, logits_t: Tensor | None = None, labels: Tensor | None = None, *,
                 temperature: float = 1.0, alpha: float = 0.5, soft: str = "kl") -> tuple[Tensor, dict[str, float]]:
    """``(total, {part: unweighted value})``.

    - ``ce`` with ``labels``: CE on them (baseline: gold; distilled: gold where the row has one, else the
      teacher's label_t); without ``labels``: CE on argmax(logits_t).
    - ``mix``: ``alpha * CE(labels) + (1 - alpha) * LOSSES[soft](logits_s, logits_t, T)``; ``soft`` defaults to
      ``kl``, the softened-probability loss this mix comes from (Hinton et al. 2015).
    - any other registered name: that soft loss on logits_t.

    ``logits_t`` is detached: it is a target, so gradients reach the student only.
    """
    check_loss(name, soft)
    if name == "ce" and labels is not None:
        part = hard_ce(logits_s, labels)
        return part, {"ce": part.item()}
    if logits_t is None:
        raise ValueError(f"loss {name!r} needs teacher logits; train on teacher-labelled shards (distilled mode)")
    # The teacher's logits are targets: no gradient may flow into them (or into a teacher that made them).
    logits_t = logits_t.detach()
    if name == MIX:
        if labels is None:
            raise ValueError("loss 'mix' needs hard labels (gold, else the teacher's label_t)")
        hard = hard_ce(logits_s, labels)
        soft_part = LOSSES[soft](logits_s, logits_t, temperature)
        total = alpha * hard + (1.0 - alpha) * soft_part
        return total, {"ce": hard.item(), soft: soft_part.item()}
    part = LOSSES[name](logits_s, logits_t, temperature)
    return part, {name: part.item()}


# ---------------------------------------------------------------- transformer students (issue 15)
# Intermediate-layer losses: pure functions over one (student, teacher) pair of mapped tensors and the token mask,
# in TextBrewer's formulations (textbrewer/losses.py); the layer pairs come from transformer.layer_maps.


def hidden_mse(state_s: Tensor, state_t: Tensor, mask: Tensor) -> Tensor:
    """TinyBERT's hidden-state loss: MSE over the real tokens. state_* [B, T, H], mask [B, T] bool.
    sum((S - T)^2 over real tokens) / (real tokens * H)."""
    m = mask.unsqueeze(-1).to(state_s.dtype)
    return ((state_s - state_t) ** 2 * m).sum() / (m.sum() * state_s.size(-1))


def attention_mse(scores_s: Tensor, scores_t: Tensor, mask: Tensor) -> Tensor:
    """TinyBERT's attention loss on pre-softmax scores [B, heads, T, T], over (query, key) pairs of real tokens:
    sum of squared differences / (heads * sum_b len_b^2)."""
    m = mask.to(scores_s.dtype)
    pair = m[:, None, :, None] * m[:, None, None, :]  # [B, 1, T, T]
    return ((scores_s - scores_t) ** 2 * pair).sum() / (pair.sum() * scores_s.size(1))


def pkd(pooled_s: Tensor, pooled_t: Tensor, mask: Tensor | None = None) -> Tensor:
    """BERT-PKD (Sun et al. 2019): squared distance of the L2-normalised pooled states [B, H], summed over H,
    mean over the batch. PKD pools [CLS]; the transformer student pools the mean, as e5 (its teacher) does."""
    diff = F.normalize(pooled_s, dim=-1) - F.normalize(pooled_t, dim=-1)
    return (diff**2).sum(-1).mean()


FeatureLossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# name -> (loss, which Features list it compares: transformer.Features field and layer_maps key)
FEATURE_LOSSES: dict[str, tuple[FeatureLossFn, str]] = {
    "hidden_mse": (hidden_mse, "hidden"), "attention_mse": (attention_mse, "attention"), "pkd": (pkd, "pooled")}

# Weight schedules over training (TextBrewer's kd_loss_weight / hard_label_weight schedulers): value at progress
# f = step / total_steps in [0, 1].
WEIGHT_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "constant": lambda v, f: v, "linear_decay": lambda v, f: v * (1.0 - f), "linear_growth": lambda v, f: v * f}
# Temperature: constant, linearly from T down to 1 / from 1 up to T, or TextBrewer's per-row dynamic ones.
TEMPERATURE_SCHEDULES = ("constant", "linear_decay", "linear_growth", "flsw", "cwsm")


def scheduled_weight(name: str, value: float, progress: float) -> float:
    if name not in WEIGHT_SCHEDULES:
        raise ValueError(f"unknown weight schedule {name!r}; choose one of: {', '.join(WEIGHT_SCHEDULES)}")
    return WEIGHT_SCHEDULES[name](value, min(max(progress, 0.0), 1.0))


def scheduled_temperature(name: str, base: float, progress: float, logits_s: Tensor, logits_t: Tensor,
                          beta: float = 1.0, gamma: float = 2.0) -> float | Tensor:
    """The temperature at ``progress`` (float), or for flsw / cwsm a [B] tensor (TextBrewer's
    flsw_temperature_scheduler / cwsm_temperature_scheduler: base + (mean(w) - w) * beta, w from the rows'
    student-teacher cosine (flsw: (1 - cos)^gamma) or the student's top probability (cwsm: 1 / (p_max + 1e-3)))."""
    f = min(max(progress, 0.0), 1.0)
    if name == "constant":
        return base
    if name == "linear_decay":
        return 1.0 + (base - 1.0) * (1.0 - f)
    if name == "linear_growth":
        return 1.0 + (base - 1.0) * f
    v = logits_s.detach().float()
    if name == "flsw":
        t = logits_t.detach().float()
        cos = (F.normalize(v, dim=-1, eps=1e-4) * F.normalize(t, dim=-1, eps=1e-4)).sum(-1)
        w = (1.0 - cos) ** gamma
    elif name == "cwsm":
        w = 1.0 / (torch.softmax(v, dim=-1).max(-1).values + 1e-3)
    else:
        raise ValueError(f"unknown temperature schedule {name!r}; choose one of: {', '.join(TEMPERATURE_SCHEDULES)}")
    return base + (w.mean() - w) * beta


def check_transformer_losses(weights: dict[str, float]) -> None:
    """Raise for an unknown loss name or a negative weight, listing the valid names (call when building config)."""
    valid = sorted([*LOSSES, *FEATURE_LOSSES])
    for name, w in weights.items():
        if name not in LOSSES and name not in FEATURE_LOSSES:
            raise ValueError(f"unknown transformer loss {name!r}; choose from: {', '.join(valid)}")
        if w < 0:
            raise ValueError(f"loss weight {name}: {w} is negative; weights are >= 0")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"transformer.losses {weights} has no positive weight; give one, e.g. {{kl: 1.0}}")


def transformer_loss(weights: dict[str, float], logits_s: Tensor, logits_t: Tensor | None, labels: Tensor | None,
                     *, temperature: float | Tensor = 1.0, hard_label_weight: float = 0.0, feats_s=None,
                     feats_t=None, maps: dict | None = None) -> tuple[Tensor, dict[str, float]]:
    """``(total, {part: unweighted value})``: sum of weight * logit loss (``LOSSES``) on the teacher's logits, plus
    ``hard_label_weight`` * CE on ``labels``, plus weight * each feature loss averaged over its mapped layer pairs
    (``maps`` from transformer.layer_maps; ``feats_*`` are transformer.Features)."""
    total = logits_s.new_zeros(())
    parts: dict[str, float] = {}
    if hard_label_weight > 0:
        if labels is None:
            raise ValueError("hard_label_weight > 0 needs hard labels (gold, else the teacher's label_t)")
        hard = hard_ce(logits_s, labels)
        total = total + hard_label_weight * hard
        parts["hard_ce"] = hard.item()
    for name, w in weights.items():
        if w == 0:
            continue
        if name in LOSSES:
            if logits_t is None:
                raise ValueError(f"loss {name!r} needs teacher logits; train on teacher-labelled shards")
            part = LOSSES[name](logits_s, logits_t.detach(), temperature)
        else:
            fn, field = FEATURE_LOSSES[name]
            if feats_s is None or feats_t is None or maps is None:
                raise ValueError(f"loss {name!r} needs the teacher's hidden states: run it alongside the student")
            src_s = feats_s.scores if field == "attention" else getattr(feats_s, field)
            src_t = feats_t.scores if field == "attention" else getattr(feats_t, field)
            pairs = maps[field]
            part = sum(fn(src_s[i], src_t[j].detach(), feats_s.mask) for i, j in pairs) / len(pairs)
        total = total + w * part
        parts[name] = part.item()
    return total, parts
