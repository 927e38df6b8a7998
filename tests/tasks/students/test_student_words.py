"""The compiled ``words`` encoder of languages written with spaces (tasks/students/words.py) against its
definition: the regex tokens of word_tokens, each looked up in the vocabulary's dict."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slimflow.storage.schema import MASK_PLACEHOLDER, PAD, UNK
from slimflow.tasks.students.tokens import word_tokens
from slimflow.tasks.students.vocab import PAD_ID, UNK_ID, Vocab
from slimflow.tasks.students.words import OTHER, SPACE, WORD, WordEncoder, char_classes

# Latin with case and accents (İ lowercases to two code points), Greek final sigma, digits, the underscore,
# punctuation, whitespace of several kinds, Han, emoji and a letter beyond the BMP, the placeholder.
ALPHABET = (list("abAB_9.,'-") + ["İ", "Σ", "ς", "é", "Ⅻ", "²"] + [" ", "\t", "\u3000", "\n", "\u00a0"]
            + ["好", "😀", "𝐀", MASK_PLACEHOLDER])


def reference(texts, vocab: Vocab, max_len: int) -> list[list[int]]:
    return [[vocab.stoi.get(w, UNK_ID) for w in ws[:max_len]]
            for ws in word_tokens(texts, vocab.lang, vocab.lowercase)]


def as_rows(ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(ids, lengths)]


def test_character_classes_are_pythons_own_for_every_code_point():
    """\\w and \\s of Python's re, code point by code point: the tokens cannot drift from word_tokens'."""
    classes = char_classes()
    word, space = re.compile(r"\w"), re.compile(r"\s")
    expected = np.fromiter((SPACE if space.match(chr(c)) else WORD if word.match(chr(c)) else OTHER
                            for c in range(len(classes))), dtype=np.uint8, count=len(classes))
    assert (classes == expected).all()


@pytest.mark.parametrize("lowercase", [False, True])
@settings(max_examples=150, deadline=None)
@given(texts=st.lists(st.text(alphabet=ALPHABET, max_size=40), min_size=1, max_size=6),
       max_len=st.integers(1, 12))
def test_encode_matches_regex_tokens_and_dict_lookup(lowercase, texts, max_len):
    vocab = Vocab.from_texts(["ab AB a_b 9 İ Σς é Ⅻ² 好😀𝐀 ab9.", "b, ba - 'a'"], unit="words", lang="en",
                             lowercase=lowercase)
    ids, lengths = vocab.encode_texts(texts, max_len)
    assert as_rows(ids, lengths) == reference(texts, vocab, max_len)
    assert ids.shape[1] == max(1, int(lengths.max()))
    assert (ids[np.arange(ids.shape[1]) >= lengths[:, None]] == PAD_ID).all()


def test_masked_words_unknown_words_and_empty_texts():
    vocab = Vocab.from_texts(["a good film"], unit="words", lang="en", lowercase=True)
    ids, lengths = vocab.encode_texts(["A " + MASK_PLACEHOLDER + " FILM", "", "unseen good", "  \t"], 8)
    good, film = vocab.stoi["good"], vocab.stoi["film"]
    assert as_rows(ids, lengths) == [[vocab.stoi["a"], UNK_ID, film], [], [UNK_ID, good], []]
    enc = WordEncoder(vocab.itos, lowercase=True)
    assert enc.lookup("good") == good and enc.lookup(PAD) == UNK_ID and enc.lookup(UNK) == UNK_ID
    assert enc.lookup("goo") == UNK_ID and enc.lookup("goodd") == UNK_ID


def test_a_large_vocabulary_finds_every_word_and_nothing_else():
    words = [f"w{i}x" for i in range(30000)]
    vocab = Vocab(itos=(PAD, UNK, *words), lang="en")
    ids, lengths = vocab.encode_texts([" ".join(words[i : i + 100]) for i in range(0, 30000, 100)], 100)
    assert (ids.ravel() == np.arange(2, 30002)).all()
    ids, _ = vocab.encode_texts([" ".join(f"w{i}y" for i in range(1000))], 1000)
    assert (ids == UNK_ID).all()


def test_zh_words_and_other_units_have_no_compiled_word_encoder():
    with pytest.raises(ValueError, match="no compiled word encoder"):
        _ = Vocab.from_texts(["好"], unit="words", lang="zh").words
