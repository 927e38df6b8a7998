import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from slimflow.tasks.teacher.fit import adopt_pretrained  # noqa: E402
from slimflow.tasks.teacher.label import label_texts  # noqa: E402
from slimflow.tasks.teacher.model import load_teacher  # noqa: E402
from teacher_fixtures import build_seqcls_dir  # noqa: E402


def test_max_length_is_capped_at_the_model_positions(tmp_path):
    """The tiny BERT has 64 positions: max_length 128 must not reach the forward (a shape error there)."""
    model = build_seqcls_dir(tmp_path / "tiny")
    tdir = str(tmp_path / "teacher")
    adopt_pretrained(tdir, labels=["neg", "pos"], model=model, max_length=128)
    t = load_teacher(tdir, device="cpu", dtype="fp32", reuse=False)
    assert t.max_length == 64
    logits = label_texts(t, ["词" * 300, "短"])
    assert logits.shape == (2, 2)
