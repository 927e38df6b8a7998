"""Character + bigram tokens (student.char_students): the vectorised encoder against a plain Python reference,
the training path (segmented words, masked words as [UNK]) against the serving path (raw text)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slimflow.storage.schema import MASK_PLACEHOLDER, PAD, UNK
from slimflow.tasks.students.chars import CharEncoder, char_string
from slimflow.tasks.students.vocab import PAD_ID, UNK_ID, Vocab

# Han characters, Latin with case, digits, whitespace of several kinds, emoji beyond the BMP, the placeholder.
ALPHABET = list("好差很不太了的是") + list("aBcD19") + [" ", "\t", "\u3000", "\n"] + ["😀", "𠀀", MASK_PLACEHOLDER]


def reference_ids(text: str, vocab: Vocab, max_chars: int) -> list[int]:
    """The definition, one token at a time: non-space characters (first max_chars), then adjacent bigrams."""
    s = "".join((text.lower() if vocab.lowercase else text).split())[:max_chars]
    toks = list(s) + [s[i : i + 2] for i in range(len(s) - 1)]
    return [UNK_ID if MASK_PLACEHOLDER in t else vocab.stoi.get(t, UNK_ID) for t in toks]


def _vocab(texts, lowercase=False, max_size=50000):
    return Vocab.build([[t] for t in texts], unit="chars", lowercase=lowercase, max_size=max_size)


def test_build_counts_characters_and_bigrams_not_words():
    v = _vocab(["好好 差", "好差"])
    # 好:3, 差:2, 好好:1, 好差:2 (across the removed space in the first text too)
    assert v.unit == "chars" and v.itos[:2] == (PAD, UNK)
    assert set(v.itos[2:]) == {"好", "差", "好好", "好差"}
    assert v.itos[2] == "好"
    assert Vocab.build([["好", UNK, "差"]], unit="chars").itos[2:] == ("好", "差")  # nothing across a mask


def test_encode_texts_matches_reference_with_spaces_case_emoji_and_truncation():
    texts = ["很好 的", "Good 好😀!", "", "   ", "太差了" * 30, MASK_PLACEHOLDER + "好"]
    for lowercase in (False, True):
        v = _vocab(["很好的", "good 好😀", "太差了太", "好"], lowercase=lowercase)
        ids, lengths = v.encode_texts(texts, 20)
        assert ids.dtype == np.int64 and ids.shape[0] == len(texts) and ids.shape[1] >= 1
        for k, text in enumerate(texts):
            want = reference_ids(text, v, 20)
            assert lengths[k] == len(want) and ids[k, : lengths[k]].tolist() == want
            assert (ids[k, lengths[k] :] == PAD_ID).all()


@settings(max_examples=150, deadline=None)
@given(corpus=st.lists(st.text(alphabet=ALPHABET, max_size=30), min_size=1, max_size=40),
       batch=st.lists(st.text(alphabet=ALPHABET, max_size=40), min_size=1, max_size=12),
       max_chars=st.integers(1, 50), lowercase=st.booleans())
def test_vectorised_encoder_equals_reference(corpus, batch, max_chars, lowercase):
    v = _vocab(corpus, lowercase=lowercase)
    ids, lengths = v.encode_texts(batch, max_chars)
    for k, text in enumerate(batch):
        assert ids[k, : lengths[k]].tolist() == reference_ids(text, v, max_chars)


def test_hash_table_finds_every_token_through_collisions():
    from slimflow.tasks.students.chars import _key, _slot

    rng = np.random.default_rng(0)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    corpus = ["".join(rng.choice(han, 40)) for _ in range(400)] + ["😀𠀀😀"]
    v = _vocab(corpus)
    enc = v.chars
    homes = [_slot(_key(t), enc.bits) for t in v.itos[2:] if len(t) == 2 or ord(t) >= 0x10000]
    assert len(homes) > len(set(homes)), "a few thousand keys must share some home slots"
    assert all(enc.lookup(t) == i for i, t in enumerate(v.itos) if i >= 2)
    unknown = ["".join(rng.choice(han, 2)) for _ in range(2000)]
    ids, _ = v.encode_texts(unknown, 8)
    assert [int(ids[k, 2]) for k in range(len(unknown))] == [v.stoi.get(t, UNK_ID) for t in unknown]


def test_training_rows_and_served_text_get_the_same_ids():
    # A segmented row (whitespace dropped by the segmenter, a masked word as [UNK]) and the raw text it came
    # from, with the masked word put back as the placeholder: same ids either way.
    v = _vocab(["这个 手机 很好", "太差了"])
    words = ["这个", "手机", UNK, "好"]
    rows = v.encode_rows([words, ["太", "差", "了"], []], max_len=64)
    served, lengths = v.encode_texts(["这个 手机" + MASK_PLACEHOLDER + "好", "太差了", ""], 64)
    assert rows == [served[k, : lengths[k]].tolist() for k in range(3)]
    assert v.encode(words, 64) == rows[0]
    assert char_string(words) == "这个手机" + MASK_PLACEHOLDER + "好"
    batch_ids, batch_lengths = v.encode_batch([words, ["太", "差", "了"], []], 64)
    np.testing.assert_array_equal(batch_ids, served)
    np.testing.assert_array_equal(batch_lengths, lengths)


def test_chars_vocab_round_trips_and_bad_tokens_are_refused(tmp_path):
    v = _vocab(["好差"])
    v.save(str(tmp_path / "v.json"))
    back = Vocab.load(str(tmp_path / "v.json"))
    assert back == v and back.unit == "chars" and back.fingerprint == v.fingerprint
    assert Vocab(itos=v.itos).fingerprint != v.fingerprint  # same tokens, other unit: another vocabulary
    with pytest.raises(ValueError, match="unknown vocabulary unit"):
        Vocab(itos=(PAD, UNK), unit="bytes")
    with pytest.raises(ValueError, match="neither a character nor a bigram"):
        CharEncoder((PAD, UNK, "abc"))
    with pytest.raises(ValueError, match="no character encoder"):
        _ = Vocab.build([["好"]]).chars
