"""The ``transformer`` student (issue 15): a few of the teacher's own layers, over its vocabulary trimmed to the
corpus.

Built from a BERT-like teacher (the default multilingual-e5-small, or any Hugging Face BERT/RoBERTa-shaped
encoder): ``layers`` names the teacher layers that initialise the student's (DistilBERT and BERT-PKD start from
teacher layers; a randomly initialised transformer student fails, TextBrewer issues 33 and 40). Same hidden size,
so hidden states and attention scores compare without projections. The embedding table keeps only the rows of
the subword vocabulary (tasks/students/subword.py: [PAD], [UNK], the corpus's pieces), plus the teacher's [CLS]
and [SEP]: e5-small's 250k x 384 table (96M of its 118M parameters) becomes a few tens of thousands of rows.

The student keeps the students' contract, ``forward(ids [B, T] int64, lengths [B] int64) -> logits [B, C]``,
over the subword vocabulary's ids (no special tokens): it adds [CLS] and [SEP] itself, so training streams,
the Predictor and ONNX serve it like any student. Sentence vector: masked mean over the tokens, L2-normalised
(e5's pooling, and what the teacher's fitted head reads), then one linear layer.

:meth:`TransformerStudent.features` also returns every hidden state and every layer's pre-softmax attention
scores (TinyBERT matches those), and :func:`theseus_logits` runs BERT-of-Theseus's mixed model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_LAYERS = (2, 5, 8, 11)  # 4 of e5-small's 12, every third: TinyBERT's i*k + k-1 with k = 3
_MASKED = -1e4  # additive attention bias on padding (BERT's value; finite, so fp16/bf16 stay finite)
_ACTS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass
class Features:
    hidden: list[Tensor]  # n_layers + 1 of [B, T+2, H]: the embeddings' output, then each layer's
    scores: list[Tensor]  # n_layers of [B, heads, T+2, T+2] pre-softmax attention scores
    mask: Tensor  # [B, T+2] bool: [CLS], the text's pieces, [SEP]
    pooled: list[Tensor]  # n_layers + 1 of [B, H]: masked mean of each hidden state, L2-normalised
    logits: Tensor  # [B, C]


class Layer(nn.Module):
    """One post-LN BERT encoder layer; also returns its pre-softmax attention scores [B, heads, T, T]."""

    def __init__(self, hidden: int, heads: int, ffn: int, eps: float, act: str, dropout: float,
                 head_dim: int | None = None):
        super().__init__()
        if head_dim is None:  # the teacher's layout: the heads split the hidden size
            if hidden % heads:
                raise ValueError(f"hidden size {hidden} is not a multiple of the {heads} attention heads")
            head_dim = hidden // heads
        self.heads, self.head_dim, self.act = heads, head_dim, act
        inner = heads * head_dim  # < hidden once heads are pruned (transformer.width)
        self.query, self.key, self.value = (nn.Linear(hidden, inner) for _ in range(3))
        self.attn_out = nn.Linear(inner, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        b, t, _ = x.shape
        d = self.head_dim

        def split(y: Tensor) -> Tensor:  # [B, T, heads * d] -> [B, heads, T, d]
            return y.view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        probs = self.drop(torch.softmax(scores + bias, dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(b, t, self.heads * d)
        x = self.attn_norm(x + self.drop(self.attn_out(ctx)))
        x = self.ffn_norm(x + self.drop(self.ffn_out(_ACTS[self.act](self.ffn_in(x)))))
        return x, scores


class TransformerStudent(nn.Module):
    """Embeddings (word + position + token type 0, LayerNorm), ``n_layers`` BERT layers, mean pooling, classifier.

    ``vocab_size``: the subword vocabulary's size; rows ``vocab_size`` and ``vocab_size + 1`` are [CLS], [SEP].
    """

    def __init__(self, vocab_size: int, num_classes: int, *, hidden: int, heads: int, ffn: int, n_layers: int,
                 max_positions: int, eps: float = 1e-12, act: str = "gelu", dropout: float = 0.1,
                 head_dim: int | None = None):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unsupported activation {act!r}; the transformer student knows {', '.join(_ACTS)}")
        self.cls_id, self.sep_id = vocab_size, vocab_size + 1
        self.embed = nn.Embedding(vocab_size + 2, hidden)
        self.positions = nn.Embedding(max_positions, hidden)
        self.token_type = nn.Parameter(torch.zeros(hidden))
        self.embed_norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([Layer(hidden, heads, ffn, eps, act, dropout, head_dim) for _ in range(n_layers)])
        self.out = nn.Linear(hidden, num_classes)

    def inputs(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(ids [B, T+2] with [CLS] first and [SEP] after each row's last piece, mask [B, T+2] bool)."""
        b = ids.size(0)
        n = lengths.clamp(max=ids.size(1)).unsqueeze(1)  # [B, 1]
        steps = torch.arange(ids.size(1) + 2, device=ids.device).unsqueeze(0)  # [1, T+2]
        cls = torch.full((b, 1), self.cls_id, dtype=ids.dtype, device=ids.device)
        pad = torch.zeros((b, 1), dtype=ids.dtype, device=ids.device)
        body = torch.cat([cls, ids, pad], 1)  # position s holds ids[s-1]
        full = torch.where(steps == n + 1, torch.full_like(body, self.sep_id), body)
        mask = steps <= n + 1
        return full * mask.to(full.dtype), mask

    def embeddings(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden [B, T+2, H] after the embedding LayerNorm, mask, additive attention bias [B, 1, 1, T+2])."""
        full, mask = self.inputs(ids, lengths)
        pos = torch.arange(full.size(1), device=ids.device)
        x = self.embed_norm(self.embed(full) + self.positions(pos).unsqueeze(0) + self.token_type)
        bias = (~mask).to(x.dtype)[:, None, None, :] * _MASKED
        return self.drop(x), mask, bias

    def head(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.out(pool(x, mask))

    def features(self, ids: Tensor, lengths: Tensor) -> Features:
        x, mask, bias = self.embeddings(ids, lengths)
        hidden, scores = [x], []
        for layer in self.layers:
            x, s = layer(x, bias)
            hidden.append(x)
            scores.append(s)
        pooled = [pool(h, mask) for h in hidden]
        return Features(hidden, scores, mask, pooled, self.out(pooled[-1]))

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        x, mask, bias = self.embeddings(ids, lengths)
        for layer in self.layers:
            x, _ = layer(x, bias)
        return self.head(x, mask)


def pool(x: Tensor, mask: Tensor) -> Tensor:
    """[B, H] masked mean over tokens, L2-normalised, in float32 (as the teacher's mean_pool)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    mean = (x * m).sum(1, dtype=torch.float32) / mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
    return F.normalize(mean, dim=-1)


# -------------------------------------------------------------------------------------- from a teacher
def bert_body(model: nn.Module) -> nn.Module:
    """The BertModel-shaped body of an encoder or a sequence-classification checkpoint."""
    body = getattr(model, "base_model", model)
    if not (hasattr(body, "embeddings") and hasattr(body, "encoder") and hasattr(body.encoder, "layer")):
        raise ValueError(f"the teacher ({type(model).__name__}) is not BERT-shaped (embeddings + encoder.layer); "
                         "the transformer student needs a BERT / RoBERTa / XLM-R-like encoder")
    return body


def check_layers(layers: Sequence[int], n_teacher: int) -> list[int]:
    """``layers`` as a list, or a clear error: each must be a layer the teacher has, strictly increasing."""
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("transformer.layers is empty; name at least one teacher layer, e.g. [2, 5, 8, 11]")
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise ValueError(f"transformer.layers {layers} names layer(s) {bad} the teacher does not have: it has "
                         f"{n_teacher} layers, numbered 0 to {n_teacher - 1}; pick from those")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"transformer.layers {layers} must be strictly increasing (student layer i is the i-th)")
    return layers


def layer_maps(layers: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
    """(student index, teacher index) pairs for the matching losses, from the init ``layers``.

    hidden: hidden states, index 0 the embeddings' output: 0 -> 0, then student layer i's output -> the output of
    the teacher layer it was initialised from (TinyBERT; TextBrewer's 0->0, 4->1, 8->2, 12->3 for every fourth).
    attention: student layer i's scores -> teacher layer layers[i]'s. pooled (pkd): the hidden pairs past 0."""
    hidden = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layers)]
    return {"hidden": hidden, "attention": list(enumerate(layers)), "pooled": hidden[1:]}


def theseus_modules(layers: Sequence[int], n_teacher: int) -> list[list[int]]:
    """The teacher layers each student layer replaces in BERT-of-Theseus: student layer i (initialised from
    teacher layer layers[i]) stands for the teacher's layers after layers[i-1] up to layers[i]; the last one also
    for any teacher layers after it."""
    starts = [0] + [t + 1 for t in layers[:-1]]
    ends = [t + 1 for t in layers[:-1]] + [n_teacher]
    return [list(range(a, b)) for a, b in zip(starts, ends)]


def teacher_rows(tokenizer, itos: Sequence[str], pad_id: int | None = None) -> tuple[list[int], int, int]:
    """(teacher id of each student row: [PAD], [UNK], the pieces; the teacher's [CLS] id; its [SEP] id)."""
    from slimflow.tasks.students.subword import _unknown_token

    specials = tokenizer.encode("", add_special_tokens=True).ids
    if len(specials) != 2:
        raise ValueError(f"the teacher's tokenizer wraps a text in {len(specials)} special tokens, not a [CLS]-like "
                         "and a [SEP]-like one; the transformer student needs a BERT / RoBERTa-style tokenizer")
    unk = tokenizer.token_to_id(_unknown_token(tokenizer, tokenizer.to_str()))
    rows = [pad_id if pad_id is not None else unk, unk]  # [PAD]'s row is never attended to
    for piece in itos[2:]:
        tid = tokenizer.token_to_id(piece)
        if tid is None:
            raise ValueError(f"piece {piece!r} of the vocabulary is not in the teacher's tokenizer; build the "
                             "subword vocabulary with this teacher")
        rows.append(tid)
    return rows, specials[0], specials[1]


def student_config(encoder: nn.Module, vocab_size: int, num_classes: int, layers: Sequence[int], max_len: int,
                   dropout: float) -> dict:
    """The sizes that rebuild a student (saved in best.pt), read from the teacher's config."""
    c = encoder.config
    if max_len + 2 > c.max_position_embeddings:
        raise ValueError(f"transformer.max_len {max_len} + [CLS] + [SEP] exceeds the teacher's "
                         f"{c.max_position_embeddings} positions; lower transformer.max_len")
    return {"kind": "transformer", "vocab_size": vocab_size, "num_classes": num_classes, "hidden": c.hidden_size,
            "heads": c.num_attention_heads, "ffn": c.intermediate_size, "n_layers": len(layers),
            "max_positions": max_len + 2, "eps": float(c.layer_norm_eps), "act": c.hidden_act, "dropout": dropout,
            "max_len": max_len, "layers": list(layers)}


def build_from_config(cfg: dict) -> TransformerStudent:
    return TransformerStudent(cfg["vocab_size"], cfg["num_classes"], hidden=cfg["hidden"], heads=cfg["heads"],
                              ffn=cfg["ffn"], n_layers=cfg["n_layers"], max_positions=cfg["max_positions"],
                              eps=cfg["eps"], act=cfg["act"], dropout=cfg["dropout"], head_dim=cfg.get("head_dim"))


@torch.no_grad()
def from_teacher(encoder: nn.Module, tokenizer, itos: Sequence[str], num_classes: int, *, layers: Sequence[int],
                 max_len: int, dropout: float = 0.1, head=None) -> tuple[TransformerStudent, dict]:
    """(student, its config): teacher ``layers`` copied into a student over the trimmed vocabulary ``itos``.

    ``tokenizer``: the teacher's ``tokenizers.Tokenizer``. ``head``: the teacher's fitted head (standardise ->
    linear, tasks/teacher/model.make_head) over the same L2-normalised mean pooling: its linear layer, with the
    standardisation folded in, starts the student's classifier; any other head leaves it random. Pass ``layers``
    as all of the teacher's to get the teacher itself (its hidden states and scores for the matching losses).
    """
    body = bert_body(encoder)
    n_teacher = len(body.encoder.layer)
    layers = check_layers(layers, n_teacher)
    rows, cls_id, sep_id = teacher_rows(tokenizer, itos, getattr(body.config, "pad_token_id", None))
    cfg = student_config(body, len(itos), num_classes, layers, max_len, dropout)
    student = build_from_config(cfg)
    emb = body.embeddings
    student.embed.weight.copy_(emb.word_embeddings.weight[torch.tensor(rows + [cls_id, sep_id])])
    student.positions.weight.copy_(emb.position_embeddings.weight[: cfg["max_positions"]])
    student.token_type.copy_(emb.token_type_embeddings.weight[0])
    student.embed_norm.load_state_dict(emb.LayerNorm.state_dict())
    for s, t in zip(student.layers, layers):
        _copy_layer(s, body.encoder.layer[t])
    linear = _head_linear(head, cfg["hidden"], num_classes)
    if linear is not None:
        student.out.weight.copy_(linear[0])
        student.out.bias.copy_(linear[1])
    return student, cfg


def _copy_layer(s: Layer, t: nn.Module) -> None:
    att = t.attention
    pairs = [(s.query, att.self.query), (s.key, att.self.key), (s.value, att.self.value),
             (s.attn_out, att.output.dense), (s.attn_norm, att.output.LayerNorm),
             (s.ffn_in, t.intermediate.dense), (s.ffn_out, t.output.dense), (s.ffn_norm, t.output.LayerNorm)]
    for mine, theirs in pairs:
        mine.load_state_dict(theirs.state_dict())


def _head_linear(head, hidden: int, num_classes: int):
    """(weight, bias) of W((x - mu) / sigma) + b folded into one linear map, for a logistic-regression head."""
    net = getattr(head, "net", None)
    if head is None or net is None or len(net) != 1 or not isinstance(net[0], nn.Linear):
        return None
    w, b = net[0].weight.float(), net[0].bias.float()
    if w.shape != (num_classes, hidden):
        return None
    sigma, mu = head.sigma.float(), head.mu.float()
    return w / sigma, b - (w / sigma) @ mu


def theseus_logits(student: TransformerStudent, teacher: TransformerStudent, modules: list[list[int]],
                   ids: Tensor, lengths: Tensor, rate: float) -> Tensor:
    """BERT-of-Theseus (Xu et al. 2020): each student layer replaces its teacher module with probability
    ``rate`` (one draw per module per batch, from torch's RNG); the frozen teacher modules pass gradients
    through to the student layers before them. Embeddings and classifier are the student's."""
    x, mask, bias = student.embeddings(ids, lengths)
    draws = torch.rand(len(modules)).tolist()
    for i, module in enumerate(modules):
        if draws[i] < rate:
            x, _ = student.layers[i](x, bias)
        else:
            for t in module:
                x, _ = teacher.layers[t](x, bias)
    return student.head(x, mask)
