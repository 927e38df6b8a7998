"""Student models: BOW, CNN, BiLSTM. Every one is ``forward(ids [B, T] int64, lengths [B] int64) -> logits [B, C]``.

Padding is handled by length masks made of plain tensor ops (no packed sequences), so a row's logits do not
depend on how much padding its batch has, and the same code scripts with TorchScript and exports to ONNX
with dynamic batch and length axes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _mask(ids: Tensor, lengths: Tensor) -> Tensor:
    # [B, T] bool, True on real tokens. Built from lengths, not ids != PAD, so [PAD] inside a row is data.
    steps = torch.arange(ids.size(1), device=ids.device).unsqueeze(0)
    return steps < lengths.unsqueeze(1)


class BOW(nn.Module):
    """ERNIE Slim's BOW: mean of the word embeddings, then an MLP (tanh) and a classifier."""

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128, hidden: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.fc = nn.Linear(embed_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        mean = _bag_mean(ids, lengths, self.embed.weight, self.training, self.embed.sparse)
        return self.out(self.drop(torch.tanh(self.fc(mean))))

    def folded(self) -> FoldedBOW:
        """The same function for serving, with ``fc`` folded into the embedding table (see FoldedBOW)."""
        with torch.no_grad():
            table = self.embed.weight @ self.fc.weight.t()  # [V, hidden]; row 0 stays zero
        return FoldedBOW(table, self.fc.bias.detach().clone(), self.out).eval()


def _bag_mean(ids: Tensor, lengths: Tensor, weight: Tensor, training: bool, sparse: bool = False) -> Tensor:
    """[B, E] mean of the rows' embeddings. [PAD] (id 0) embeds to the zero vector (padding_idx keeps row 0 at
    zero and without gradient), so padding adds nothing to the sum. embedding_bag sums without materialising
    [B, T, E]; its padding_idx path is ~3x slower, so only training (which must keep row 0's gradient at zero)
    takes it, with sparse gradients when the trainer asks for them (lazy Adam). ONNX gets the plain gather +
    sum (the exporter turns embedding_bag into a slow Loop); TorchScript compiles only its own branch."""
    ids = ids * _mask(ids, lengths).to(ids.dtype)  # past a row's length -> [PAD], whatever the caller padded with
    if torch.jit.is_scripting():
        summed = F.embedding_bag(ids, weight, mode="sum")
    elif torch.onnx.is_in_onnx_export():
        summed = F.embedding(ids, weight).sum(1)
    elif training:
        summed = F.embedding_bag(ids, weight, mode="sum", padding_idx=0, sparse=sparse)
    else:
        summed = F.embedding_bag(ids, weight, mode="sum")
    return summed / lengths.clamp(min=1).unsqueeze(1).to(torch.float32)  # an empty text -> zero vector


class FoldedBOW(nn.Module):
    """A trained BOW as served: tanh(fc(mean(E[ids]))) = tanh(mean((E fc^T)[ids]) + b), exactly, since the
    mean and fc are both linear. The table shrinks from [V, embed_dim] to [V, hidden] (half, at the default
    sizes) and the per-text work to one gather of hidden-wide rows, with no fc to run."""

    def __init__(self, table: Tensor, bias: Tensor, out: nn.Linear):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.out = out

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        return self.out(torch.tanh(_bag_mean(ids, lengths, self.table, False) + self.bias))


class CNN(nn.Module):
    """Kim (2014): convolutions of widths 3, 4, 5, ReLU, max-over-time pooling, dropout, classifier."""

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128, hidden: int = 128,
                 dropout: float = 0.0, widths: tuple[int, ...] = (3, 4, 5)):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.widths = list(widths)
        self.max_width = max(widths)
        # `hidden` filters per width (Kim: 100); the pooled features are concatenated.
        self.convs = nn.ModuleList([nn.Conv1d(embed_dim, hidden, w) for w in widths])
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden * len(widths), num_classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        mask = _mask(ids, lengths)
        x = self.embed(ids) * mask.unsqueeze(-1).to(torch.float32)  # zero past each row's end
        # max_width - 1 zero steps on the right: a row shorter than a filter still has one window (its words
        # then zeros), and that window sees zeros however much padding the batch added.
        x = F.pad(x.transpose(1, 2), (0, self.max_width - 1))  # [B, E, T + max_w - 1]
        n_valid = lengths.unsqueeze(1)
        pooled = []
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(x))  # [B, H, T + max_w - w]
            steps = torch.arange(h.size(2), device=ids.device).unsqueeze(0)
            # Windows that lie inside the row: start <= len - w; at least the first one.
            valid = steps < (n_valid - self.widths[i] + 1).clamp(min=1)  # [B, T']
            # ReLU outputs are >= 0 and one window is always valid, so zeroing the rest leaves the max exact.
            pooled.append((h * valid.unsqueeze(1).to(torch.float32)).amax(2))
        return self.out(self.drop(torch.cat(pooled, 1)))


class BiLSTM(nn.Module):
    """Tang et al. (2019): one bidirectional LSTM layer, the last hidden state of each direction concatenated,
    a tanh dense layer, a classifier (the seeds' PaddleNLP student).

    The two directions are two one-way LSTMs: the backward one reads each row reversed within its own length,
    so it starts at the row's last word, not at the batch's padding (what a plain bidirectional nn.LSTM would
    do without packing).
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128, hidden: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.fwd = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.bwd = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        n = lengths.clamp(min=1).unsqueeze(1)  # [B, 1]; an empty row reads its one [PAD]
        steps = torch.arange(ids.size(1), device=ids.device).unsqueeze(0)  # [1, T]
        # Reverse the first n steps of each row, leave the padding where it is: t -> n-1-t for t < n.
        rev = torch.where(steps < n, n - 1 - steps, steps)
        x = self.embed(ids)  # [B, T, E]
        x_rev = x.gather(1, rev.unsqueeze(-1).expand(-1, -1, x.size(2)))
        out_f, _ = self.fwd(x)
        out_b, _ = self.bwd(x_rev)
        # Output at step n-1: the state after the last real word (padding comes later, so it never leaks in).
        last = (n - 1).unsqueeze(-1).expand(-1, 1, out_f.size(2))  # [B, 1, H]
        h = torch.cat([out_f.gather(1, last).squeeze(1), out_b.gather(1, last).squeeze(1)], 1)
        return self.out(torch.tanh(self.fc(self.drop(h))))


STUDENTS: dict[str, type[nn.Module]] = {"bow": BOW, "cnn": CNN, "bilstm": BiLSTM}


def register_student(name: str, cls: type[nn.Module]) -> None:
    """Add a student kind: ``cls(vocab_size, num_classes, embed_dim=, hidden=, dropout=)`` with the
    ``forward(ids, lengths) -> logits`` contract."""
    STUDENTS[name] = cls


def student_class(kind: str) -> type[nn.Module]:
    try:
        return STUDENTS[kind]
    except KeyError:
        raise ValueError(f"unknown student {kind!r}; choose one of: {', '.join(sorted(STUDENTS))} "
                         "(or add one with register_student)") from None


def build_student(kind: str, vocab_size: int, num_classes: int, *, embed_dim: int = 128, hidden: int = 128,
                  dropout: float = 0.0) -> nn.Module:
    """A freshly initialised student of ``kind`` (seed torch first for reproducible weights)."""
    return student_class(kind)(vocab_size, num_classes, embed_dim=embed_dim, hidden=hidden, dropout=dropout)

