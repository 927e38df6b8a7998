"""Tiny random teachers built in the test: a word-level tokenizer and a 2-layer BERT, never a download."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from slimflow.storage.schema import AUGMENT, MASK_PLACEHOLDER, SEGMENT
from slimflow.storage.shards import write_shard

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "movie", "book", "food", "the", "very",
         "not", "a", "is", "was", "really"]
LABELS = ["neg", "pos"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def build_seqcls_dir(path, id2label=None, seed=0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tok = build_tokenizer()
    id2label = id2label or {0: "neg", 1: "pos"}
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def random_texts(n, seed=0, lo=1, hi=20):
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def segment_table(texts, labels=None, prefix="r"):
    labels = labels or [LABELS[i % 2] for i in range(len(texts))]
    return pa.table({
        "id": [f"{prefix}{i:04d}" for i in range(len(texts))], "text": texts, "label": labels,
        "source_file": ["t.csv"] * len(texts), "source_row": list(range(1, len(texts) + 1)),
        "words": [t.split() for t in texts], "pos": [["x"] * len(t.split()) for t in texts],
        "ws": [[True] * len(t.split()) for t in texts],
    })


def write_segment(run_dir, texts, split="train", index=0, labels=None, rel="segment/train"):
    return write_shard(segment_table(texts, labels, prefix=f"{split}{index}-"), str(run_dir), rel, split, index,
                       SEGMENT)


def write_augment(run_dir, texts, split="train", index=0):
    n = len(texts)
    t = pa.table({
        "id": [f"s{i:04d}-a00" for i in range(n)], "source_id": [f"s{i:04d}" for i in range(n)],
        "aug_ops": ["mask"] * n, "aug_copy": pa.array([0] * n, pa.int16()), "label": [LABELS[i % 2] for i in range(n)],
        "text_t": texts, "words": [t.replace(MASK_PLACEHOLDER, "[UNK]").split() for t in texts],
    })
    return write_shard(t, str(run_dir), "augment/train", split, index, AUGMENT)


def fitted_teacher_dir(root) -> str:
    """A fitted teacher directory (`fit: none` on the tiny random BERT) under ``root``, ready for label_texts."""
    from slimflow.tasks.teacher.fit import adopt_pretrained

    d = str(Path(root) / "teacher")
    adopt_pretrained(d, labels=LABELS, model=build_seqcls_dir(Path(root) / "tiny-bert"))
    return d
