"""Explicit Arrow schemas of every stage's shards.

Every row carries a stable ``id``; augmented rows carry ``source_id`` and ``aug_ops``/``aug_copy`` so any
output row traces back to the input row it came from.
"""

from __future__ import annotations

import pyarrow as pa

# The teacher sees its tokenizer's mask token where the student sees [UNK]. Augmented teacher text holds
# this private-use character in place of a masked word; the teacher maps it to e.g. "<mask>" / "[MASK]".
MASK_PLACEHOLDER = "\ue000"
UNK = "[UNK]"
PAD = "[PAD]"
# Their ids in every student vocabulary ([PAD], [UNK] come first in vocab.json): models mask by length, but the
# embedding's padding_idx keeps [PAD] at zero too.
PAD_ID, UNK_ID = 0, 1

SPLITS = ("train", "dev", "test", "unlabelled")

INGEST = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # sha256(normalised text)[:16]: stable, unique
        pa.field("text", pa.string(), nullable=False),
        pa.field("label", pa.string()),  # label name; null for unlabelled rows
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),  # the line in source_file (CSV/TSV/JSONL), or Parquet row
    ]
)

REJECTS = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("text", pa.string()),  # as read (lossy-decoded when the bytes were not UTF-8)
        pa.field("label", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

_TOKENS = [
    pa.field("words", pa.list_(pa.string()), nullable=False),  # student tokens
    pa.field("pos", pa.list_(pa.string()), nullable=False),  # one tag per word (jieba or spaCy UPOS)
    pa.field("ws", pa.list_(pa.bool_()), nullable=False),  # word followed by whitespace in the text
]

SEGMENT = pa.schema(list(INGEST) + _TOKENS)

AUGMENT = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # f"{source_id}-a{copy:02d}"
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("aug_ops", pa.string(), nullable=False),  # ops that changed the row: "mask,pos,ngram"
        pa.field("aug_copy", pa.int16(), nullable=False),
        pa.field("label", pa.string()),  # the source row's gold label, for reference only
        pa.field("text_t", pa.string(), nullable=False),  # teacher text, MASK_PLACEHOLDER for masks
        pa.field("words", pa.list_(pa.string()), nullable=False),  # student tokens, [UNK] for masks
    ]
)

POS_TABLE = pa.schema(
    [
        pa.field("pos", pa.string(), nullable=False),
        pa.field("word", pa.string(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),
    ]
)

# Teacher-labelled rows: what a student trains on. `kind` says where the row came from.
LABELLED = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),  # == id for original and unlabelled rows
        pa.field("kind", pa.string(), nullable=False),  # original | augmented | unlabelled
        pa.field("text_t", pa.string(), nullable=False),
        pa.field("words", pa.list_(pa.string()), nullable=False),
        pa.field("label", pa.string()),  # gold label name when the row has one
        pa.field("logits", pa.list_(pa.float32()), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),
        pa.field("label_t", pa.string(), nullable=False),  # teacher's hard label name
        pa.field("confidence", pa.float32(), nullable=False),
    ]
)
