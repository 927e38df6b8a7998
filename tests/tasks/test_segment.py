import pytest
from slimflow.tasks.segment import segment_parallel, segment_texts, tokenize

ZH = ["这本书很好看，推荐！ 真的 OK 123", "质量太差了，不推荐购买。", "物流很快，包装也好"]


def _rebuild(words, ws):
    return "".join(w + (" " if s else "") for w, s in zip(words, ws)).strip()


@pytest.mark.parametrize("lang,texts", [("zh", ZH), ("en", ["I don't like it.  Really bad movie", "Great!"])])
def test_one_tag_per_word_and_text_rebuilds(lang, texts):
    for text, (words, pos, ws) in zip(texts, segment_texts(texts, lang)):
        assert len(words) == len(pos) == len(ws) > 0
        assert all(w.strip() == w and w for w in words)
        assert _rebuild(words, ws) == " ".join(text.split())


def test_zh_tags_follow_jieba_dictionary_and_shape_classes():
    words, pos, _ = segment_texts(["推荐！ OK 123"], "zh")[0]
    tags = dict(zip(words, pos))
    assert tags["推荐"] == "v" and tags["！"] == "x" and tags["OK"] == "eng" and tags["123"] == "m"


def test_en_uses_spacy_universal_tags():
    words, pos, _ = segment_texts(["The movie was great"], "en")[0]
    assert words == ["The", "movie", "was", "great"]
    assert pos == ["DET", "NOUN", "AUX", "ADJ"]


def test_parallel_equals_serial():
    texts = [f"{t}{i}" for i in range(500) for t in ZH][:1200]
    assert segment_parallel(texts, "zh", workers=2) == segment_texts(texts, "zh")


def test_tokenize_and_unknown_lang():
    assert tokenize(["好看"], "zh") == [["好看"]]
    with pytest.raises(ValueError, match="choose one of: zh, en"):
        segment_texts(["x"], "fr")
