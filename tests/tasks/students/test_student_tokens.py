"""What a student reads: every unit, every language, the same ids for a training row and for served text."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from slimflow.storage.schema import LABELLED, MASK_PLACEHOLDER, PAD, UNK
from slimflow.storage.shards import write_shard
from slimflow.tasks.students.data import ShardStream
from slimflow.tasks.students.tokens import word_tokens
from slimflow.tasks.students.vocab import UNK_ID, Vocab, tokenizer_path

LABELS = ["neg", "pos"]
TEXTS = {
    "zh": ["这个手机很好用，电池也不错", "太差了!!! 再也不买", "快递3-4天到, www.a.com 说的C++", "",
           "屏幕" + MASK_PLACEHOLDER + "清楚", MASK_PLACEHOLDER + MASK_PLACEHOLDER + "好"],
    "en": ["A great movie, really.", "Not good -- the plot's a mess!", "It's the BEST film of 2019 :)", "",
           "a " + MASK_PLACEHOLDER + " film", "Naïve café déjà-vu", MASK_PLACEHOLDER + MASK_PLACEHOLDER],
}


def wordpiece_json() -> str:
    """A tiny BERT-style WordPiece tokenizer (lowercasing, CJK characters split), built here: no download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = ["the", "movie", "film", "good", "great", "not", "plot", "mess", "best", "really"]
    han = list("这个手机很好用电池也不错太差了再买快递天到说的屏幕清楚")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = specials + letters + ["##" + c for c in letters] + words + ["##s"] + han + list(".,!?'-:()，")
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(specials)
    return tok.to_str()


def _vocab(unit, lang, texts, **kw):
    return Vocab.from_texts(texts, unit=unit, lang=lang, lowercase=lang == "en",
                            tokenizer=wordpiece_json() if unit == "subword" else None, **kw)


CASES = [(u, lang) for lang in ("zh", "en") for u in ("words", "chars", "subword")]


@pytest.mark.parametrize(("unit", "lang"), CASES)
def test_training_rows_and_served_text_read_identical_ids(tmp_path, unit, lang):
    """The ids a student trains on (a LABELLED shard's text_t, through ShardStream) are the ids it is served
    (the same texts through an exported student's Predictor.encode), masked words included."""
    texts = TEXTS[lang]
    vocab = _vocab(unit, lang, texts[:3])  # unknown tokens too: the later texts hold words it never saw
    n = len(texts)
    table = pa.table({
        "id": [f"r{i}" for i in range(n)], "source_id": [f"r{i}" for i in range(n)], "kind": ["original"] * n,
        "text_t": texts, "words": [t.split() for t in texts], "label": [LABELS[i % 2] for i in range(n)],
        "logits": [[0.0, 1.0]] * n, "probs": [[0.5, 0.5]] * n, "label_t": ["pos"] * n, "confidence": [0.5] * n,
    })
    ref = write_shard(table, str(tmp_path), "label/original", "original", 0, LABELLED)
    stream = ShardStream(str(tmp_path), [ref], mode="distilled", vocab=vocab, labels=LABELS, batch_size=64,
                         max_len=32, shuffle=False)
    (batch,) = list(stream.epoch(0))

    from slimflow.tasks.students.export import Predictor, export_model
    from slimflow.tasks.students.models import build_student

    model = build_student("bow", len(vocab), 2, embed_dim=4, hidden=4)
    cfg = {"kind": "bow", "vocab_size": len(vocab), "num_classes": 2, "embed_dim": 4, "hidden": 4, "dropout": 0.0,
           "max_len": 32, "lowercase": vocab.lowercase}
    export_model(model, vocab, LABELS, cfg, str(tmp_path / "export"), lang=lang, formats=["torchscript"])
    served_ids, served_lengths = Predictor(str(tmp_path / "export")).encode(texts)
    assert served_lengths.tolist() == batch.lengths.tolist()
    assert served_ids.tolist() == batch.ids.tolist()
    # A masked word is [UNK] in every unit, and the unseen texts hold [UNK]s; the seen ones mostly do not.
    for i, t in enumerate(texts):
        row = served_ids[i, : served_lengths[i]].tolist()
        if MASK_PLACEHOLDER in t:
            assert UNK_ID in row
    assert served_lengths[0] > 0 and UNK_ID not in served_ids[0, : served_lengths[0]].tolist()


def test_word_tokens_need_no_tagger_and_split_at_non_word_characters():
    assert word_tokens(["It's the BEST film, really!"], "en", lowercase=True) == [
        ["it", "'", "s", "the", "best", "film", ",", "really", "!"]]
    assert word_tokens(["a " + MASK_PLACEHOLDER + "b"], "en") == [["a", UNK, "b"]]
    assert word_tokens(["屏幕" + MASK_PLACEHOLDER + "清楚"], "zh") == [["屏幕", UNK, "清楚"]]


def test_trimmed_subword_vocabulary_covers_every_piece_of_the_corpus():
    from tokenizers import Tokenizer

    corpus = TEXTS["en"] + TEXTS["zh"]
    tj = wordpiece_json()
    vocab = Vocab.from_texts(corpus, unit="subword", lang="en", tokenizer=tj)
    full = Tokenizer.from_str(tj)
    pieces = {p for t in corpus for p in full.encode(t.replace(MASK_PLACEHOLDER, "[UNK]"),
                                                     add_special_tokens=False).tokens}
    pieces.discard("[UNK]")
    assert pieces and pieces <= set(vocab.itos[2:])
    assert len(vocab) == len(pieces) + 2 < full.get_vocab_size()  # trimmed: only what the corpus uses
    # Each text reads as the full tokenizer's pieces, looked up in the trimmed table: nothing is lost but
    # what the full tokenizer itself does not know (its [UNK], the student's too) and masked words.
    ids, lengths = vocab.encode_texts(corpus, 1000)
    for i, t in enumerate(corpus):
        want = full.encode(t.replace(MASK_PLACEHOLDER, "[UNK]"), add_special_tokens=False).tokens
        assert [vocab.itos[k] for k in ids[i, : lengths[i]]] == want


def test_subword_vocabulary_round_trips_with_its_tokenizer_and_refuses_another(tmp_path):
    vocab = _vocab("subword", "en", TEXTS["en"])
    path = str(tmp_path / "vocab.json")
    vocab.save(path)
    back = Vocab.load(path)
    assert back == vocab and back.fingerprint == vocab.fingerprint
    assert back.encode_texts(TEXTS["en"], 16)[0].tolist() == vocab.encode_texts(TEXTS["en"], 16)[0].tolist()
    with open(tokenizer_path(path), "a", encoding="utf-8") as fh:
        fh.write(" ")
    with pytest.raises(ValueError, match="not the one it was built with"):
        Vocab.load(path)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        Vocab(itos=(PAD, UNK), unit="subword")


@pytest.mark.parametrize(("unit", "lang"), CASES)
def test_token_counts_say_which_texts_max_len_cuts(unit, lang):
    vocab = _vocab(unit, lang, TEXTS[lang])
    counts = vocab.token_counts(TEXTS[lang])
    _, lengths = vocab.encode_texts(TEXTS[lang], 10_000)
    want = lengths if unit != "chars" else np.asarray([len("".join(t.split())) for t in TEXTS[lang]])
    assert counts.tolist() == want.tolist()


def test_predict_path_imports_no_spacy_pipeline(tmp_path):
    """Serving an English student never loads spaCy (its tagger cost what the teacher does, issue 11)."""
    vocab = _vocab("words", "en", TEXTS["en"])
    from slimflow.tasks.students.export import export_model
    from slimflow.tasks.students.models import build_student

    model = build_student("bilstm", len(vocab), 2, embed_dim=4, hidden=4)
    cfg = {"kind": "bilstm", "vocab_size": len(vocab), "num_classes": 2, "embed_dim": 4, "hidden": 4,
           "dropout": 0.0, "max_len": 32, "lowercase": True}
    export_model(model, vocab, LABELS, cfg, str(tmp_path / "export"), lang="en")
    code = ("import sys; from slimflow.tasks.students.export import predict_lines; "
            f"out = list(predict_lines({str(tmp_path / 'export')!r}, ['a great film', 'bad'])); "
            "assert len(out) == 2, out; "
            "bad = [m for m in sys.modules if m == 'spacy' or m.startswith(('spacy.', 'en_core_web'))]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize(("unit", "lang"), [c for c in CASES if c[0] != "chars"])
def test_long_documents_read_only_their_prefix_with_the_same_ids(unit, lang):
    """A long text is tokenised only up to a whitespace past what max_len needs; its ids are the whole
    text's, and a prefix holding too few tokens (one long unbroken run) falls back to the whole text."""
    import random

    rng = random.Random(0)
    base = TEXTS[lang][:3] + TEXTS[lang][4:]
    vocab = _vocab(unit, lang, base)
    doc = " ".join(rng.choice(base) for _ in range(400))
    run = "x" * 3000 + " " + " ".join(base * 20)  # no whitespace in its first 3,000 characters: not cut
    few = "x" * 1000 + " " + "y" * 1000 + " " + " ".join(base * 20)  # cut, but 2 words in the prefix: redone
    batch = [doc, "short " + base[0], run, few, doc[:5000]]
    for max_len in (4, 32, 128):
        got_ids, got_lengths = vocab.encode_texts(batch, max_len)
        want_ids, want_lengths = vocab._encode_texts(batch, max_len)
        assert got_lengths.tolist() == want_lengths.tolist()
        assert got_ids.tolist() == want_ids.tolist()
