import math

import pytest
import torch
from slimflow.tasks.students import losses
from slimflow.tasks.students.losses import LOSSES, compute_loss, register_loss

S = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
T = torch.tensor([[2.0, 0.0], [1.0, -1.0]])


def _lsm(x):  # log-softmax by hand
    m = max(x)
    z = math.log(sum(math.exp(v - m) for v in x)) + m
    return [v - z for v in x]


def test_mse_is_mean_squared_logit_difference():
    # ((1-2)^2 + (2-0)^2 + (0-1)^2 + (0+1)^2) / 4 = 7 / 4
    assert losses.mse(S, T, 1.0).item() == pytest.approx(1.75)
    assert losses.mse(S, T, 4.0).item() == pytest.approx(1.75)  # temperature does not apply to mse


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kl_is_softened_kl_times_t_squared(temp):
    total = 0.0
    for s, t in zip(S.tolist(), T.tolist(), strict=True):
        ls, lt = _lsm([v / temp for v in s]), _lsm([v / temp for v in t])
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))
    expected = total / 2 * temp * temp
    assert losses.kl(S, T, temp).item() == pytest.approx(expected, rel=1e-5)
    assert losses.kl(T, T, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_ce_uses_the_teachers_argmax():
    # teacher argmax: row 0 -> class 0, row 1 -> class 0
    expected = -(_lsm([1.0, 2.0])[0] + _lsm([0.0, 0.0])[0]) / 2
    assert losses.ce(S, T, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_compute_loss_ce_with_labels_and_mix_weights():
    labels = torch.tensor([1, 0])
    ce_gold = -(_lsm([1.0, 2.0])[1] + _lsm([0.0, 0.0])[0]) / 2
    total, parts = compute_loss("ce", S, None, labels)
    assert total.item() == pytest.approx(ce_gold, rel=1e-6) and set(parts) == {"ce"}
    kl = losses.kl(S, T, 2.0).item()
    total, parts = compute_loss("mix", S, T, labels, temperature=2.0, alpha=0.3)
    assert parts == {"ce": pytest.approx(ce_gold, rel=1e-6), "kl": pytest.approx(kl, rel=1e-6)}
    assert total.item() == pytest.approx(0.3 * ce_gold + 0.7 * kl, rel=1e-6)
    total, parts = compute_loss("mse", S, T, labels)
    assert total.item() == pytest.approx(1.75) and parts == {"mse": pytest.approx(1.75)}


@pytest.mark.parametrize("name", ["mix", "kl", "mse", "ce"])
def test_gradients_flow_to_the_student_only(name):
    s = S.clone().requires_grad_()
    t = T.clone().requires_grad_()  # as if straight out of a teacher's forward pass
    compute_loss(name, s, t, torch.tensor([1, 0]) if name == "mix" else None)[0].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher's logits are targets, detached inside compute_loss


def test_unknown_loss_lists_choices_and_register_adds_one():
    with pytest.raises(ValueError, match="ce, kl, mix, mse"):
        compute_loss("cosine", S, T)
    with pytest.raises(ValueError, match="needs teacher logits"):
        compute_loss("kl", S, None)
    with pytest.raises(ValueError, match="reserved"):
        register_loss("mix", losses.mse)
    register_loss("l1", lambda s, t, temp: (s - t).abs().mean())
    try:
        assert compute_loss("l1", S, T)[0].item() == pytest.approx(1.25)
    finally:
        del LOSSES["l1"]
