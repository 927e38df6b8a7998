"""What a student reads: raw text -> tokens, one function per unit, the same for training rows and served text.

Every student, in training and when served, reads *text*: a training row's ``text`` (gold rows) or
``text_t`` (teacher-labelled rows, masked words as ``MASK_PLACEHOLDER``), a served row's raw input. So the
ids a student trains on and the ids it is served are the output of one function (tests/tasks/students/
test_student_tokens.py asserts it per unit and language). No tagger or parser runs here: POS tags are the
augment stage's business alone.

Units:
- ``words``: zh: jieba's words through jieba-rs (tasks/fastseg.py, ~15 us a review); any other language:
  runs of word characters and single punctuation marks (``\\w+|[^\\w\\s]``, one C regex, ~6 us a review:
  spaCy's tagger pipeline cost about what the teacher does, DESIGN.md). A vocabulary encodes these tokens in
  one compiled pass instead (tasks/students/words.py, ~1 us a review, the same ids); this function defines them.
- ``chars``: characters + character bigrams, looked up in one compiled loop (tasks/students/chars.py).
- ``subword``: the teacher's own fast tokenizer (Hugging Face ``tokenizers``, Rust), its ids mapped to the
  student's trimmed vocabulary (tasks/students/subword.py). Works for any language the teacher reads.

The placeholder of a masked word is ``[UNK]`` in every unit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from slimflow.storage.schema import MASK_PLACEHOLDER, UNK

# \w: letters, digits and _ of every script (Python's re is Unicode-aware); anything else but space is a
# token of its own. The placeholder (a private-use character) is neither, so it stays one token.
_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(texts: Sequence[str], lang: str, lowercase: bool = False) -> list[list[str]]:
    """The words a ``words`` student reads in each text (masked words as ``[UNK]``)."""
    if lang == "zh":
        from slimflow.tasks import fastseg

        if fastseg.available():
            rows = fastseg.tokenize_zh(list(texts))
        else:  # the same words, ~15x slower (tasks/fastseg.py)
            from slimflow.tasks.segment import tokenize

            rows = tokenize(list(texts), "zh")
        if lowercase:
            rows = [[w.lower() for w in ws] for ws in rows]
    else:
        find = _WORD.findall
        rows = [find(t.lower()) if lowercase else find(t) for t in texts]
    # A masked word is one placeholder character: jieba and the regex both leave it a token of its own.
    return [[UNK if w == MASK_PLACEHOLDER else w for w in ws] if MASK_PLACEHOLDER in t else ws
            for t, ws in zip(texts, rows)]
