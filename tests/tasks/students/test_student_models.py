import pytest
import torch
from slimflow.tasks.students.models import STUDENTS, build_student, register_student, student_class
from torch import nn

KINDS = ["bow", "cnn", "bilstm"]


def _model(kind, classes=3):
    torch.manual_seed(0)
    return build_student(kind, 50, classes, embed_dim=8, hidden=6).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,time", [(1, 1), (4, 9)])
def test_output_shape(kind, batch, time):
    ids = torch.randint(2, 50, (batch, time))
    lengths = torch.full((batch,), time)
    assert _model(kind)(ids, lengths).shape == (batch, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_a_rows_logits(kind):
    m = _model(kind)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14], [15, 16, 17, 18]]  # 2 and 1 are shorter than CNN widths
    alone = torch.cat([m(torch.tensor([r]), torch.tensor([len(r)])) for r in rows])
    for extra in (0, 5):
        width = max(map(len, rows)) + extra
        # Padding with a real word id (not 0) too: only lengths may decide what is padding.
        for pad in (0, 3):
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            batched = m(ids, torch.tensor([len(r) for r in rows]))
            torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_last_word_inside_the_length_matters(kind):
    m = _model(kind)
    a = m(torch.tensor([[5, 6, 7, 8]]), torch.tensor([4]))
    b = m(torch.tensor([[5, 6, 7, 9]]), torch.tensor([4]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_row_gives_finite_logits(kind):
    out = _model(kind)(torch.zeros(2, 1, dtype=torch.int64), torch.tensor([0, 0]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_torchscript_matches_eager(kind):
    import warnings

    m = _model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = torch.jit.script(m)
    ids, lengths = torch.randint(0, 50, (3, 6)), torch.tensor([6, 2, 0])
    torch.testing.assert_close(s(ids, lengths), m(ids, lengths))


def test_unknown_student_lists_choices_and_register_adds_one():
    with pytest.raises(ValueError, match="bilstm, bow, cnn"):
        student_class("transformer")

    class Const(nn.Module):
        def __init__(self, vocab_size, num_classes, embed_dim=1, hidden=1, dropout=0.0):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(num_classes))

        def forward(self, ids, lengths):
            return self.b.expand(ids.size(0), -1)

    register_student("const", Const)
    try:
        assert build_student("const", 10, 4)(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 1])).shape == (2, 4)
    finally:
        del STUDENTS["const"]
