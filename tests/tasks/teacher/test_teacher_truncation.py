"""teacher.truncation (issue 11): head keeps a long text's first tokens, head_tail its first and last ones (Sun et
al. 2019), with the tokenizer's own specials around them; the teacher counts the texts it reads truncated."""

import json

import pytest
from slimflow.storage.schema import MASK_PLACEHOLDER
from slimflow.tasks.teacher.fit import adopt_pretrained
from slimflow.tasks.teacher.label import label_texts
from slimflow.tasks.teacher.model import Teacher, TeacherError, head_tail, load_teacher
from teacher_fixtures import LABELS, WORDS, build_tokenizer


def _sentence_tokenizer():
    """A second template: <s> $A </s> (RoBERTa / XLM-R / e5), built without a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<mask>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", mask_token="<mask>")


def _bert_wordpiece_tokenizer(tmp_path):
    """transformers' own BertTokenizerFast from a vocab.txt: [CLS] $A [SEP] from its BERT post-processor."""
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


TOKENIZERS = {"word-level [CLS]/[SEP]": lambda tmp: build_tokenizer(), "BertTokenizerFast": _bert_wordpiece_tokenizer,
              "<s>/</s>": lambda tmp: _sentence_tokenizer()}


def _teacher(tok, truncation, max_length=16, prefix=""):
    return Teacher(name="t", kind="encoder", labels=[], tokenizer=tok, model=None, max_length=max_length,
                   truncation=truncation, prefix=prefix)


# head "good great fine", 30 fillers, tail "bad awful poor sad": 37 words
LONG = " ".join(["good", "great", "fine"] + ["the"] * 30 + ["bad", "awful", "poor", "sad"])


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_head_tail_keeps_the_first_and_last_tokens_between_the_specials(tmp_path, name):
    tok = TOKENIZERS[name](tmp_path)
    words = LONG.split()
    ids = tok.convert_tokens_to_ids
    first, last = tok("good")["input_ids"][0], tok("good")["input_ids"][-1]  # the template's own specials
    (got,) = _teacher(tok, "head_tail").encode([LONG])
    # budget 16 - 2 specials = 14: the first (14 + 2) // 4 = 4 words, then the last 10
    assert got == [first] + ids(words[:4]) + ids(words[-10:]) + [last]
    assert got[-5:-1] == ids(["bad", "awful", "poor", "sad"])
    (head,) = _teacher(tok, "head").encode([LONG])
    assert head == [first] + ids(words[:14]) + [last]
    assert {first, last} == {tok.cls_token_id, tok.sep_token_id} or {first, last} == {tok.bos_token_id,
                                                                                       tok.eos_token_id}


@pytest.mark.parametrize("truncation", ["head", "head_tail"])
@pytest.mark.parametrize("n_words", [1, 13, 14])
def test_a_text_within_the_budget_is_read_whole_either_way(n_words, truncation):
    tok = build_tokenizer()
    text = " ".join(WORDS[i % len(WORDS)] for i in range(n_words))
    t = _teacher(tok, truncation)
    assert t.encode([text]) == [tok(text)["input_ids"]]
    assert t.token_counts([text]) == [n_words + 2]
    assert t.count_truncated([text]) == 0


def test_count_truncated_counts_texts_over_max_length_specials_included():
    t = _teacher(build_tokenizer(), "head")
    texts = [" ".join(["good"] * n) for n in (1, 13, 14, 15, 200)]  # 14 words + 2 specials = 16 = max_length
    assert t.token_counts(texts) == [3, 15, 16, 17, 202]
    assert t.count_truncated(texts) == 2
    assert _teacher(build_tokenizer(), "head_tail").count_truncated(texts) == 2


def test_head_tail_keeps_the_prefix_and_the_mask_token():
    tok = build_tokenizer()
    text = "very not " + " ".join(["the"] * 30) + " " + MASK_PLACEHOLDER + " sad"
    (got,) = _teacher(tok, "head_tail", prefix="really ").encode([text])
    words = ["really"] + text.replace(MASK_PLACEHOLDER, "[MASK]").split()
    # the prefix stays; of the 13 left, (13 + 2) // 4 = 3 from the head, 10 from the tail
    assert got == tok(" ".join(["really", "very", "not", "the"] + words[-10:]))["input_ids"]
    assert got[-3:-1] == tok.convert_tokens_to_ids(["[MASK]", "sad"])


@pytest.mark.parametrize("n,budget,prefix,want", [
    (10, 10, [], list(range(10))),
    (100, 10, [], [0, 1, 2] + list(range(93, 100))),
    (100, 10, [0, 1], [0, 1, 2, 3] + list(range(94, 100))),
    (100, 10, [7], [0, 1, 2] + list(range(93, 100))),  # a prefix the text does not start with is not kept apart
    (100, 10, [0, 1, 6], [0, 1, 2, 3] + list(range(94, 100))),  # as far as the text starts with it (e5's "▁")
    (1000, 510, [], list(range(128)) + list(range(1000 - 382, 1000))),  # Sun et al.: 128 + 382
])
def test_head_tail_splits_the_budget_a_quarter_head(n, budget, prefix, want):
    assert head_tail(list(range(n)), budget, prefix) == want


def test_the_fitted_teacher_records_truncation_and_labels_a_long_text(tmp_path, tiny_model_dir):
    d = str(tmp_path / "teacher")
    meta = adopt_pretrained(d, labels=LABELS, model=tiny_model_dir, max_length=32, truncation="head_tail")
    assert json.loads((tmp_path / "teacher" / "teacher.json").read_text())["truncation"] == "head_tail"
    t = load_teacher(d, device="cpu", dtype="fp32", reuse=False)
    assert (t.truncation, t.max_length) == ("head_tail", 32) and meta["truncation"] == "head_tail"
    long_text = " ".join(WORDS * 3000)  # ~160,000 characters, 54,000 tokens, far past the 64 positions
    logits = label_texts(t, [long_text, "good movie"], batch_tokens=256)
    assert logits.shape == (2, 2)
    assert t.count_truncated([long_text, "good movie"]) == 1
    # the head and the head_tail teacher read different tokens of it, so they answer differently
    head = load_teacher(d, device="cpu", dtype="fp32", truncation="head", reuse=False)
    assert (label_texts(head, [long_text]) != logits[:1]).any()


def test_an_unknown_truncation_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(TeacherError, match="teacher.truncation 'middle' is not one of head, head_tail"):
        adopt_pretrained(str(tmp_path / "t"), labels=LABELS, model=tiny_model_dir, truncation="middle")
    with pytest.raises(TeacherError, match="is not one of head, head_tail"):
        _teacher(build_tokenizer(), "tail")
