"""Width pruning of the transformer student (``transformer.width``): DynaBERT's width multiplier, the step ERNIE 3.0
takes between distillation and int8 (its compress API: ``width_mult`` 3/4 for 6-layer models, 2/3 for 12-layer
ones, "of the q, k, v and ffn weights").

Every layer keeps ``round(width * heads)`` attention heads and ``round(width * ffn)`` FFN neurons, the most
important ones, and training then recovers what the cut lost. The hidden size is the teacher's, so every matching
loss still applies; attention_mse compares the kept heads with the same heads of the teacher.

Importance (Michel et al. 2019 for heads, DynaBERT for neurons): the first-order change of the loss when a head's
or a neuron's output is scaled to zero, ``|sum over tokens of a * dL/da|``, summed over a few training batches in
eval mode (no dropout: deterministic). A head's output ``a`` feeds only its columns of the attention output
projection W, and ``sum_tokens a_j dL/da_j = sum_o W[o, j] dL/dW[o, j]``: the weight times its gradient over those
columns is that sum exactly, with no hook on the activations. Same for a neuron and its column of the FFN's down
projection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from slimflow.tasks.students.transformer import TransformerStudent, build_from_config
from torch import Tensor, nn

IMPORTANCE_BATCHES = 16  # x batch_size rows: 512 at the default, read once before training


def kept_counts(heads: int, ffn: int, width: float) -> tuple[int, int]:
    """(heads, FFN neurons) a layer keeps at ``width`` (0 < width <= 1): at least one of each."""
    if not 0 < width <= 1:
        raise ValueError(f"transformer.width must be in (0, 1], got {width}; 1 keeps every head and neuron")
    return max(1, round(width * heads)), max(1, round(width * ffn))


def importance(model: TransformerStudent, batches: Iterable, loss_fn: Callable[[TransformerStudent, object], Tensor]
               ) -> tuple[list[Tensor], list[Tensor]]:
    """(per layer [heads] scores, per layer [ffn] scores): the summed ``|a * dL/da|`` of each head's and each FFN
    neuron's output over ``batches``; ``loss_fn(model, batch)`` gives the batch's loss."""
    was_training = model.training
    model.eval()
    heads = [torch.zeros(layer.heads) for layer in model.layers]
    neurons = [torch.zeros(layer.ffn_in.out_features) for layer in model.layers]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for i, layer in enumerate(model.layers):
            w = layer.attn_out.weight  # [hidden, heads * d]: column block h reads head h
            heads[i] += (w * w.grad).view(w.size(0), layer.heads, layer.head_dim).sum((0, 2)).abs().detach().cpu()
            w = layer.ffn_out.weight  # [hidden, ffn]: column n reads neuron n
            neurons[i] += (w * w.grad).sum(0).abs().detach().cpu()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return heads, neurons


@torch.no_grad()
def prune(model: TransformerStudent, cfg: dict, head_scores: list[Tensor], neuron_scores: list[Tensor],
          width: float) -> tuple[TransformerStudent, dict]:
    """(pruned student, its config): every layer keeps its top heads and neurons by score (in their original
    order). The config records ``width``, ``head_dim`` and each layer's kept heads (teacher head numbers)."""
    n_heads, n_ffn = kept_counts(cfg["heads"], cfg["ffn"], width)
    d = model.layers[0].head_dim
    kept_heads = [sorted(s.topk(n_heads).indices.tolist()) for s in head_scores]
    kept_neurons = [sorted(s.topk(n_ffn).indices.tolist()) for s in neuron_scores]
    new_cfg = {**cfg, "heads": n_heads, "ffn": n_ffn, "head_dim": d, "width": width, "kept_heads": kept_heads}
    small = build_from_config(new_cfg)
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in f".{k}"}
    small.load_state_dict(state, strict=False)
    for layer, src, hs, ns in zip(small.layers, model.layers, kept_heads, kept_neurons):
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in hs])
        neurons = torch.tensor(ns)
        for name in ("query", "key", "value"):
            _copy(getattr(layer, name), getattr(src, name), rows=cols)
        _copy(layer.attn_out, src.attn_out, cols=cols)
        _copy(layer.ffn_in, src.ffn_in, rows=neurons)
        _copy(layer.ffn_out, src.ffn_out, cols=neurons)
        layer.attn_norm.load_state_dict(src.attn_norm.state_dict())
        layer.ffn_norm.load_state_dict(src.ffn_norm.state_dict())
    small.train(model.training)
    return small, new_cfg


def _copy(dst: nn.Linear, src: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    w = src.weight if rows is None else src.weight[rows]
    dst.weight.copy_(w if cols is None else w[:, cols])
    dst.bias.copy_(src.bias if rows is None else src.bias[rows])


def kept_teacher_scores(scores_t: list[Tensor], kept_heads: list[list[int]], layers: list[int]) -> list[Tensor]:
    """The teacher's per-layer attention scores with, at each layer a student layer was built from, only the heads
    that student layer kept (attention_mse compares like with like)."""
    out = list(scores_t)
    for hs, t in zip(kept_heads, layers):
        out[t] = scores_t[t][:, hs]
    return out
