"""Distillation losses: pure functions with one signature ``(logits_s, logits_t, temperature) -> scalar``
(TextBrewer's ``KD_LOSS_MAP`` style), a dict registry, and :func:`compute_loss` for the training loop.

Shapes: logits_s, logits_t [B, C] float; labels [B] int64 (class index).
"""

from __future__ import annotations

from collections.abc import Callable

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
