"""Export a trained student for serving, and the :class:`Predictor` that serves it.

An export directory is self-contained::

    model.onnx     ONNX, dynamic batch and length axes (served with onnxruntime when it is installed)
    model.ts       TorchScript (the fallback without onnxruntime; loads with torch alone)
    model.int8.onnx  the transformer and BiLSTM students: int8 dynamic quantisation of model.onnx (the
                   transformer's is served by default and it has no model.ts; the BiLSTM's where the export
                   measured it faster than fp32 on this machine)
    vocab.json     labels.json
    student.json   written last: kind, sizes, segmentation settings (lang, unit, max_len, lowercase), files

Raw text goes through the vocabulary's own tokeniser (tasks/students/tokens.py: words, characters or the
teacher's subword pieces), the one the student was trained through: no tagger or parser runs when serving.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
from slimflow.storage.atomic_dir import FolderMismatch, build_dir, check_blob, file_hashes
from slimflow.storage.fs import atomic_write_text, exists, join, read_bytes
from slimflow.storage.hashing import sha256_file
from slimflow.storage.schema import UNK_ID
from slimflow.tasks.students.vocab import Vocab, tokenizer_path

FORMATS = ("onnx", "torchscript", "onnx_int8", "torchscript_bf16")
FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "onnx_int8": "model.int8.onnx",
         "torchscript_bf16": "model.bf16.ts"}
ONNX_BACKENDS = ("onnx", "onnx_int8")
# The served precision of the backends that are not fp32 (the report names it beside the model).
REDUCED = {"onnx_int8": "int8", "torchscript_bf16": "bf16"}
log = logging.getLogger(__name__)
# torch.export (the ONNX exporter's first step), TorchScript scripting and tracing keep process-wide state and are
# not thread-safe: the export stage runs its students' tasks on threads, and the full preset's BOW, CNN and
# transformer exported at once failed in torch.export ("always_classified is unsupported"). One at a time.
EXPORT_LOCK = threading.Lock()
INT8_RECORD = "int8-choices.json"  # in a training's folder: its checkpoint's measured int8 / served-file choices


def default_formats(kind: str) -> tuple[str, ...]:
    """ONNX + TorchScript; the transformer student ONNX fp32 + int8 (issue 15) + bf16 TorchScript; the BiLSTM
    ONNX fp32 + int8 + TorchScript."""
    if kind == "transformer":
        return (*ONNX_BACKENDS, "torchscript_bf16")
    return ("onnx", "torchscript", "onnx_int8") if kind == "bilstm" else ("onnx", "torchscript")


# The ops made int8 per kind. The BiLSTM's one bidirectional LSTM op (onnx_lstm.py) becomes onnxruntime's
# DynamicQuantizeLSTM: on the quick demo's zh BiLSTM (AVX512-VNNI EPYC) 1.6x fp32's texts/s, 98.9% of the test
# predictions unchanged and accuracy 0.809 vs 0.804; also quantising its Gather and MatMul gave 98.4%.
INT8_OPS = {"bilstm": ("LSTM",)}
INT8_OPS_DEFAULT = ("MatMul", "Gather")
INT8_MIN_SPEEDUP = 1.2
META = "student.json"
INPUTS = ("ids", "lengths")


def _example_inputs():
    import torch

    # B = 2, T = 8: neither 0 nor 1, so torch.export does not specialise the dynamic axes to a constant.
    return torch.randint(2, 10, (2, 8), dtype=torch.int64), torch.tensor([8, 3], dtype=torch.int64)


def export_onnx(model, path: str, opset: int = 18) -> None:
    """Write ``model`` as one ONNX file (weights inside) with dynamic batch and length axes."""
    import torch
    from slimflow.tasks.students.models import BiLSTM

    if isinstance(model, BiLSTM):  # one native bidirectional LSTM op (tasks/students/onnx_lstm.py)
        from slimflow.tasks.students.onnx_lstm import bilstm_onnx

        with open(path, "wb") as fh:
            fh.write(bilstm_onnx(model.eval(), opset).SerializeToString())
        return

    import logging

    # "torchvision is not installed. Skipping torchvision::nms" x4 per export: true and irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    with EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (torchvision ops not registered, etc.)
        program = torch.onnx.export(model.eval(), _example_inputs(), dynamo=True, input_names=list(INPUTS),
                                    output_names=["logits"], dynamic_shapes=({0: batch, 1: time}, {0: batch}),
                                    opset_version=opset, verbose=False)
    program.save(path, external_data=False)


# onnxruntime's two int8 weight types for dynamic quantisation (activations are uint8 either way): U8S8, the
# kernel VNNI / AMX run natively, and U8U8. On x86 without VNNI the U8S8 kernel sums pairs of u8 x s8 products
# in int16 (VPMADDUBSW), which saturates; U8U8 does not. Measured on the partial transformer bench (AMD EPYC,
# AVX2 only, 1,000 test reviews): int8/fp32 agreement 0.922 with U8S8, 0.977 with U8S8 and 7-bit weights
# (reduce_range), 0.992 with U8U8, at the same texts/s.
INT8_WEIGHTS = ("int8", "uint8")
# U8S8 is kept unless U8U8 deviates from fp32 clearly less: where both are faithful, U8S8 is the faster kernel.
INT8_CLEARLY_BETTER = 0.75


def quantize_onnx(fp32_path: str, path: str, n_vocab: int, max_len: int,
                  op_types: tuple[str, ...] = INT8_OPS_DEFAULT, prior: dict | None = None) -> dict:
    """int8 weights, activations quantised per call (onnxruntime's dynamic quantisation: ERNIE 3.0's PTQ step for
    its served tiny models). MatMul and Gather: the layers' weights and the embedding table both shrink 4x, one
    scale per output column (per_channel: agreement 0.898 -> 0.935 against one scale per tensor, same size).
    The FFN down-projections are not quantised this way (:func:`down_projections`): they stay fp32, or run as
    int8 with blockwise activation scales where that measures faster here (:func:`blockwise_down_projections`).

    The weight type is measured on this machine, not assumed: each of :data:`INT8_WEIGHTS` is quantised and run
    on the same random batch of token ids as the fp32 model, and :func:`choose_int8` picks by the mean absolute
    difference of the class probabilities. The chosen file and fp32 are then timed on that batch (best of a few
    runs each): ``speedup`` is int8's texts/s over fp32's here. Returns what student.json records: the choice, the
    deviations and the speedup. ``prior``: that record from an earlier export of the same model: its choices are
    applied as they were, unmeasured, so every export of one checkpoint is the same file (timings near a
    threshold could otherwise choose differently each time)."""
    import logging
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "consider pre-processing": optional
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    kept = down_projections(fp32_path) if "MatMul" in op_types else []

    def quantize(weights: str, out: str) -> None:
        quantize_dynamic(fp32_path, out, weight_type=types[weights], op_types_to_quantize=list(op_types),
                         per_channel=True, nodes_to_exclude=kept)

    if prior is not None and prior.get("ops") == list(op_types):
        quantize(prior["weights"], path)
        if prior.get("down_projections", {}).get("chosen"):
            _blockwise(path, kept).save_model_to_file(path, False)
        return prior
    inputs = _probe_inputs(n_vocab, max_len)
    reference = _probabilities(fp32_path, inputs)
    deviation = {}
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        for name in INT8_WEIGHTS:
            candidate = os.path.join(tmp, f"{name}.onnx")
            quantize(name, candidate)
            deviation[name] = float(abs(_probabilities(candidate, inputs) - reference).mean())
        chosen = choose_int8(deviation)
        os.replace(os.path.join(tmp, f"{chosen}.onnx"), path)
        down = blockwise_down_projections(path, kept, os.path.join(tmp, "blockwise.onnx"), inputs, reference,
                                          deviation[chosen]) if kept else None
    speedup = _seconds(fp32_path, inputs) / _seconds(path, inputs)
    return {"weights": chosen, "ops": list(op_types),
            "fp32_matmuls": 0 if down and down["chosen"] else len(kept),
            "deviation": {k: round(v, 6) for k, v in deviation.items()},
            "speedup": round(speedup, 3),
            **({"down_projections": down} if down else {}),
            "probe": f"{len(inputs[0])} random sequences of up to {inputs[0].shape[1]} ids"}


# onnxruntime's MatMulNBits with 8-bit weights in blocks of DOWN_BLOCK inputs, run at accuracy_level 4: the
# activations are quantised to int8 per row and block at run time, so the GELU output's outlier channels spoil
# only their own block of their own token, not the whole call (what made per-call scales move labels).
DOWN_BLOCK = 128
# The blockwise file is kept only if it does not deviate from fp32 noticeably more than the fp32-down file.
DOWN_MAX_DEVIATION = 1.25


def blockwise_down_projections(path: str, nodes: list[str], candidate: str, inputs, reference,
                               deviation: float) -> dict:
    """Replace ``path`` (int8, its down-projections ``nodes`` in fp32) by the same model with those MatMuls as
    8-bit blockwise MatMulNBits, where that measures faster on the probe ``inputs`` and its mean |p - p_fp32|
    stays within DOWN_MAX_DEVIATION x ``deviation`` (the fp32-down file's). Measured, not assumed: the kernel
    behind it differs by CPU (VNNI / AMX / AVX2) and onnxruntime version. On the quick demo's 4-layer student
    (AVX512-VNNI EPYC, 1,000 test reviews): 1.14-1.22x the texts/s of fp32 down-projections at the same int8/fp32
    agreement (99.1% against 99.0%), and 19 -> 12 MB. Returns what student.json records (with the reason where
    this onnxruntime has no such kernel)."""
    try:
        _blockwise(path, nodes).save_model_to_file(candidate, False)
        dev = float(abs(_probabilities(candidate, inputs) - reference).mean())
        speedup = _seconds(path, inputs) / _seconds(candidate, inputs)
    except Exception as e:  # noqa: BLE001 -- an onnxruntime without 8-bit MatMulNBits: fp32 stays, and says why
        return {"chosen": False, "as": "fp32", "reason": f"{type(e).__name__}: {e}"[:200]}
    chosen = speedup > 1.0 and dev <= DOWN_MAX_DEVIATION * max(deviation, 1e-6)
    if chosen:
        os.replace(candidate, path)
    return {"chosen": chosen, "as": "int8 blockwise" if chosen else "fp32", "block": DOWN_BLOCK,
            "speedup_over_fp32_down": round(speedup, 3), "deviation": round(dev, 6)}


def _blockwise(path: str, nodes: list[str]):
    """The model at ``path`` with MatMuls ``nodes`` as 8-bit blockwise MatMulNBits (an onnxruntime ONNXModel)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(path), bits=8, block_size=DOWN_BLOCK, is_symmetric=True, accuracy_level=4,
                             nodes_to_include=list(nodes))
    q.process()
    return q.model


def down_projections(onnx_path: str) -> list[str]:
    """Names of the MatMul nodes whose constant weight has more inputs than outputs: a transformer's FFN
    down-projections (BERT's ``output.dense``). Their input, the GELU output, has a few outlier channels
    (Bondarenko et al. 2021), and one activation scale per call crushes the rest. On the quick demo's 4-layer
    student (AVX512-VNNI EPYC, 1,000 test reviews) keeping them fp32 moved int8/fp32 agreement from 98.9% to
    99.9%, for 6% of int8's texts/s and 11 -> 18 MB on disk; blockwise int8 (:func:`blockwise_down_projections`)
    gets the speed back where it measures faster."""
    from slimflow.tasks.teacher.int8 import matmul_weights

    return [name for name, n_in, n_out in matmul_weights(onnx_path) if n_in > n_out]


def choose_int8(deviation: dict[str, float]) -> str:
    """The int8 weight type to ship, from each candidate's mean |p_int8 - p_fp32| on the probe batch."""
    if deviation["uint8"] < INT8_CLEARLY_BETTER * deviation["int8"]:
        return "uint8"
    return "int8"


def _probe_inputs(n_vocab: int, max_len: int, batch: int = 32, seed: int = 0):
    """Random ids past the special rows (PAD, UNK, ...) and random lengths: activations of the model's own
    scale, which is what decides whether a kernel saturates."""
    rng = np.random.default_rng(seed)
    t = max(2, min(max_len, 64))
    ids = rng.integers(min(UNK_ID + 1, n_vocab - 1), n_vocab, size=(batch, t)).astype(np.int64)
    lengths = rng.integers(1, t + 1, size=batch).astype(np.int64)
    for row, n in zip(ids, lengths):
        row[n:] = 0  # PAD past each length, as the predictor feeds them
    return ids, lengths


def _seconds(model_path: str, inputs, runs: int = 5) -> float:
    """Best of ``runs`` timed calls on ``inputs`` (after one warm-up), as the Predictor's session runs them."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    feed = dict(zip(INPUTS, inputs))
    return _best_of(lambda: session.run(None, feed), runs, warmup=1)


def _probabilities(model_path: str, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, dict(zip(INPUTS, inputs)))
    return _softmax(logits)


def export_torchscript(model, path: str) -> None:
    import torch

    with EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices; the scripted module works as is
        torch.jit.save(torch.jit.script(model.eval()), path)


def export_torchscript_bf16(model, path: str) -> None:
    """The transformer student in bf16 as traced TorchScript, its classifier in fp32 (``pool`` hands it fp32).
    Traced, not scripted: the layer code (closures, a dict of activations) is not TorchScript; tracing records
    shape-generic ops, so any batch and length run (tests check new sizes against the eager model)."""
    import copy

    import torch

    served = copy.deepcopy(model).eval().to(torch.bfloat16)
    served.out.float()
    with EXPORT_LOCK, warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic that stays symbolic
        traced = torch.jit.freeze(torch.jit.trace(served, _example_inputs()))
    torch.jit.save(traced, path)


# The served file of a transformer student is measured at export, not assumed: bf16 TorchScript (oneDNN's AMX or
# AVX512-BF16 kernels through torch) against the int8 ONNX file (onnxruntime's VNNI / AMX-int8 kernels) on the
# same probe batch. bf16 is served where it runs at least this much faster and deviates from fp32 no more than
# int8 does (by DOWN_MAX_DEVIATION). On the quick demo's 4-layer students, on a 2-core Xeon with AMX: bf16 2.6-4.1x
# int8's speed on the probe, a quarter to a tenth of its deviation, 469 against 251 texts/s served (README).
BF16_MIN_SPEEDUP = 1.1


def choose_served(model, export_dir: str, n_vocab: int, max_len: int, int8: dict) -> dict:
    """Which of ``export_dir``'s int8 ONNX and bf16 TorchScript files the Predictor serves by default: what
    student.json records as ``serve`` (the choice, both files' seconds on the probe batch, bf16's deviation)."""
    import torch

    inputs = _probe_inputs(n_vocab, max_len)
    feed = [torch.from_numpy(x) for x in inputs]
    bf16_path = os.path.join(export_dir, FILES["torchscript_bf16"])
    with torch.inference_mode():
        reference = _softmax(model.eval()(*feed).float().numpy())
        bf16 = _softmax(torch.jit.load(bf16_path, map_location="cpu")(*feed).float().numpy())
    seconds = {"onnx_int8": _seconds(os.path.join(export_dir, FILES["onnx_int8"]), inputs),
               "torchscript_bf16": _ts_seconds(bf16_path, inputs)}
    deviation = float(abs(bf16 - reference).mean())
    int8_dev = int8["deviation"][int8["weights"]]
    faithful = deviation <= DOWN_MAX_DEVIATION * max(int8_dev, 1e-6)
    return {"backend": _faster(seconds, faithful), "bf16_faithful": faithful,
            "machine": serving_machine(),
            "seconds": {k: round(v, 6) for k, v in seconds.items()},
            "bf16_speedup_over_int8": round(seconds["onnx_int8"] / seconds["torchscript_bf16"], 3),
            "deviation": {"bf16": round(deviation, 6), "int8": round(int8_dev, 6)},
            "probe": f"{len(inputs[0])} random sequences of up to {inputs[0].shape[1]} ids"}


def serving_machine() -> dict:
    """What a timing of the served files holds for: the CPU and the instruction sets its kernels pick from."""
    import torch
    from slimflow.tasks.teacher.precision import cpu_model

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        pass
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": sorted(flags & {"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni"})}


def served_here(meta: dict, int8: bytes, bf16: bytes) -> dict:
    """The ``serve`` choice re-timed on this machine, for an export timed on another: the kernels behind int8 and
    bf16 differ by CPU (a file served bf16 on AMX would crawl where bf16 is emulated). bf16 stays refused where the
    export found it less faithful than int8."""
    import io

    import onnxruntime as ort
    import torch

    inputs = _probe_inputs(int(meta["model"]["vocab_size"]), int(meta["max_len"]))
    session = ort.InferenceSession(int8, providers=["CPUExecutionProvider"])
    module = torch.jit.load(io.BytesIO(bf16), map_location="cpu")
    seconds = {"onnx_int8": _best_of(lambda: session.run(None, dict(zip(INPUTS, inputs)))),
               "torchscript_bf16": _best_of(lambda: module(*(torch.from_numpy(x) for x in inputs)))}
    faithful = meta["serve"].get("bf16_faithful", meta["serve"]["backend"] == "torchscript_bf16")
    return {**meta["serve"], "backend": _faster(seconds, faithful),
            "seconds": {k: round(v, 6) for k, v in seconds.items()}, "machine": serving_machine()}


def _faster(seconds: dict[str, float], bf16_faithful: bool) -> str:
    """The backend to serve from both files' probe seconds: bf16 where faithful and BF16_MIN_SPEEDUP faster."""
    fast = seconds["onnx_int8"] >= BF16_MIN_SPEEDUP * seconds["torchscript_bf16"]
    return "torchscript_bf16" if fast and bf16_faithful else "onnx_int8"


def _best_of(call, runs: int = 5, warmup: int = 3) -> float:
    """Best of ``runs`` timed ``call()``s after ``warmup`` untimed ones (TorchScript's executor profiles and
    optimises its first few runs)."""
    import time

    import torch

    best = float("inf")
    with torch.inference_mode():
        for _ in range(warmup):
            call()
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
    return best


def _ts_seconds(path: str, inputs) -> float:
    """Best timed call of a TorchScript file on ``inputs`` (:func:`_best_of`)."""
    import torch

    module = torch.jit.load(path, map_location="cpu")
    feed = [torch.from_numpy(x) for x in inputs]
    return _best_of(lambda: module(*feed))


def export_student(train_dir: str, export_dir: str, *, lang: str,
                   formats: Iterable[str] | None = None) -> dict:
    """Export ``train_dir``'s best.pt (from train_student) into ``export_dir``; returns the student.json dict."""
    from slimflow.tasks.students.train import load_student

    model, vocab, labels, cfg = load_student(train_dir)
    # The measured int8 choices are kept beside the checkpoint: the export stage and the evaluate stage (which
    # exports again to measure) then serve the same file.
    record = os.path.join(train_dir, INT8_RECORD)
    ckpt = sha256_file(os.path.join(train_dir, "best.pt"))
    prior = json.loads(read_bytes(record)) if exists(record) else {}
    same = prior.get("best_sha256") == ckpt
    meta = export_model(model, vocab, labels, cfg, export_dir, lang=lang, formats=formats,
                        int8_prior=prior.get("int8") if same else None,
                        serve_prior=prior.get("serve") if same else None)
    chosen = {k: meta[k] for k in ("int8", "serve") if k in meta}
    if chosen and chosen != {k: prior[k] for k in ("int8", "serve") if k in prior}:
        atomic_write_text(record, json.dumps({"best_sha256": ckpt, **chosen}, indent=1))
    return meta


def export_model(model, vocab: Vocab, labels: list[str], model_config: dict, export_dir: str, *, lang: str,
                 formats: Iterable[str] | None = None, int8_prior: dict | None = None,
                 serve_prior: dict | None = None) -> dict:
    """Export a student module (``model_config`` as in best.pt) with its vocab, labels and segmentation
    settings. ``int8_prior`` / ``serve_prior``: an earlier export's measured choices for the same checkpoint,
    applied as they were (see :func:`quantize_onnx`). The folder is built beside ``export_dir`` and swapped in
    whole (storage/atomic_dir.py): student.json, written last, records every file's sha256, and a kill midway
    leaves the previous export as it was."""
    formats = list(formats) if formats is not None else list(default_formats(model_config["kind"]))
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown export format {f!r}; choose from: {', '.join(FORMATS)}")
    if "torchscript_bf16" in formats and model_config["kind"] != "transformer":
        raise ValueError(f"torchscript_bf16 is the transformer student's format; a {model_config['kind']} exports "
                         f"as {', '.join(default_formats(model_config['kind']))}")
    # A BOW is served with its first dense layer folded into the embedding table (models.FoldedBOW): the same
    # logits from a table hidden-wide instead of embed_dim-wide (half at the default sizes).
    served = model.eval().folded() if hasattr(model, "folded") else model
    from slimflow.tasks.students.evaluate import count_params

    int8 = None
    with build_dir(export_dir) as tmp:
        for f in sorted(formats, key=lambda f: f == "onnx_int8"):  # int8 is quantised from the fp32 file
            if f == "onnx_int8":
                fp32 = os.path.join(tmp, FILES["onnx"])
                if "onnx" not in formats:
                    fp32 = os.path.join(tmp, "fp32.onnx.tmp")
                    export_onnx(served, fp32)
                int8 = quantize_onnx(fp32, os.path.join(tmp, FILES[f]), len(vocab), model_config["max_len"],
                                     INT8_OPS.get(model_config["kind"], INT8_OPS_DEFAULT), prior=int8_prior)
                if "onnx" not in formats:
                    os.remove(fp32)
            else:
                writer = {"onnx": export_onnx, "torchscript": export_torchscript,
                          "torchscript_bf16": export_torchscript_bf16}[f]
                writer(served, os.path.join(tmp, FILES[f]))
        serve = None
        if {"onnx_int8", "torchscript_bf16"} <= set(formats) and int8:
            serve = serve_prior or choose_served(served, tmp, len(vocab), model_config["max_len"], int8)
        vocab.save(os.path.join(tmp, "vocab.json"))
        atomic_write_text(os.path.join(tmp, "labels.json"), json.dumps(list(labels), ensure_ascii=False))
        # format 2: "files" holds every file of the folder (1: the model files only), checked by the Predictor
        meta = {"format": 2, "kind": model_config["kind"], "model": model_config, "params": count_params(model),
                "served_params": count_params(served),
                "labels": list(labels),
                "lang": lang, "max_len": model_config["max_len"], "lowercase": vocab.lowercase, "unit": vocab.unit,
                "files": file_hashes(tmp, exclude=(META,)),
                "inputs": {"ids": "[batch, time] int64", "lengths": "[batch] int64"},
                "outputs": {"logits": "[batch, C]"},
                **({"int8": int8} if int8 else {}), **({"serve": serve} if serve else {})}
        atomic_write_text(os.path.join(tmp, META), json.dumps(meta, indent=1, ensure_ascii=False))
    return meta


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


class Predictor:
    """Raw text -> (label, confidence) with an exported student.

    backend "auto": TorchScript for a BOW, else onnxruntime when importable and model.onnx exists (see
    _auto_backend).
    ``threads``: intra-op threads of the runtime (None: its default, all cores; the TorchScript backend sets
    torch's process-wide count). "auto": all cores for the BiLSTM, whose one bidirectional LSTM op runs its
    two directions on two threads, and 1 for BOW and CNN, whose ops are too small to split (1 thread
    beat 2 for them in every bench/students.py run here). ``batch_size``: texts segmented and run per step.
    ``rows_per_call``: rows per runtime call after sorting a step's rows by length (default: 8 for CNN/BiLSTM,
    whose cost grows with the padded length: ~15% faster on the review corpus at batch 32; whole steps for BOW,
    whose cost is per call).
    """

    def __init__(self, model_dir: str, backend: str = "auto", threads: int | str | None = "auto", batch_size: int = 64,
                 rows_per_call: int | None = None):
        try:
            loaded = _read_export(model_dir, backend)
        except (FolderMismatch, FileNotFoundError):
            # Read across a swap (a new export was moved in between two reads: storage/atomic_dir.py): the
            # folder is whole again at once; a second mismatch is a real one.
            loaded = _read_export(model_dir, backend)
        self.meta, backend, vocab, labels, data = loaded
        self.vocab = vocab
        self.labels: list[str] = labels
        self.lang, self.max_len, self.batch_size = self.meta["lang"], int(self.meta["max_len"]), batch_size
        self.backend = backend
        if threads == "auto":  # the transformer's matrix products split over cores too
            threads = None if self.meta["kind"] in ("bilstm", "transformer") else 1
        self.threads = threads
        self.rows_per_call = rows_per_call or (batch_size if self.meta["kind"] == "bow" else 8)
        if backend in ONNX_BACKENDS:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            self._sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        else:
            import io

            import torch

            if threads:
                torch.set_num_threads(threads)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit deprecation notice; TorchScript is the no-ORT path
                self._module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            self._module.eval()

    def logits_ids(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """[B, C] float32 logits of encoded rows."""
        if self.backend in ONNX_BACKENDS:
            return self._sess.run(None, {"ids": ids, "lengths": lengths})[0]
        import torch

        with torch.inference_mode():  # float(): a bf16 module hands back fp32 logits already; a no-op then
            return self._module(torch.from_numpy(ids), torch.from_numpy(lengths)).float().numpy()

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths) of raw texts, through the vocabulary's tokeniser (as in training)."""
        return self.vocab.encode_texts(texts, self.max_len)

    def count_truncated(self, texts: list[str]) -> int:
        """How many of ``texts`` this student reads cut to its ``max_len`` tokens."""
        n = 0
        for i in range(0, len(texts), 1024):
            n += int((self.vocab.token_counts(texts[i : i + 1024]) > self.max_len).sum())
        return n

    def logits_words(self, word_lists: list[list[str]]) -> np.ndarray:
        """[N, C] logits of already tokenised texts, in input order (bench: the model without its tokeniser)."""
        return self.logits_encoded(*self.vocab.encode_batch(word_lists, self.max_len))

    def logits_encoded(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """[N, C] logits of encoded rows, in input order, ``rows_per_call`` rows of similar length at a time."""
        if len(lengths) <= self.rows_per_call:
            return self.logits_ids(ids, lengths)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(lengths), len(self.labels)), dtype=np.float32)
        for k in range(0, len(order), self.rows_per_call):
            idx = order[k : k + self.rows_per_call]
            width = max(1, int(lengths[idx].max()))  # this group's own longest row: less padding to run
            out[idx] = self.logits_ids(np.ascontiguousarray(ids[idx, :width]), lengths[idx])
        return out

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """[N, C] class probabilities of raw texts (segmented here, batch_size at a time)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            out.append(_softmax(self.logits_encoded(*self.encode(chunk))))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """(labels, probabilities) of raw texts: the best label of each, and the [N, C] probabilities with
        columns in ``self.labels`` order."""
        probs = self.predict_proba(texts)
        return [self.labels[k] for k in probs.argmax(-1)], probs


def _read_export(model_dir: str, backend: str) -> tuple[dict, str, Vocab, list[str], bytes]:
    """(student.json, backend, vocab, labels, model bytes) of an export directory, each file checked against the
    sha256 student.json records (format 2 records every file; format 1 only the model files)."""
    meta_path = join(model_dir, META)
    if not exists(meta_path):
        raise FileNotFoundError(f"{model_dir} has no {META}: not an exported student (run `slimflow export`)")
    meta = json.loads(read_bytes(meta_path).decode("utf-8"))
    auto = backend == "auto"
    if auto:
        backend = _auto_backend(meta)
    if backend not in FORMATS:
        raise ValueError(f"unknown backend {backend!r}; choose auto, {', '.join(FORMATS)}")
    if FILES[backend] not in meta["files"]:
        raise FileNotFoundError(f"{model_dir} has no {FILES[backend]}; export with formats including {backend}")
    fix = "re-run `slimflow export CONFIG --out RUN_DIR` to write the folder again"

    def read(name: str, required: bool = True) -> bytes | None:
        path = join(model_dir, name)
        if not required and name not in meta["files"] and not exists(path):
            return None
        data = read_bytes(path)
        if meta.get("format", 1) >= 2 or name in meta["files"]:
            check_blob(path, data, meta["files"].get(name), fix)
        return data

    vocab_json = read("vocab.json").decode("utf-8")
    tok = read(os.path.basename(tokenizer_path("vocab.json")), required=False)
    if tok is None and json.loads(vocab_json).get("unit") == "subword":
        raise FileNotFoundError(f"{model_dir} has no {tokenizer_path('vocab.json')}: a subword vocabulary needs "
                                f"its tokenizer beside it; {fix}")
    vocab = Vocab.from_json(vocab_json, tokenizer=tok.decode("utf-8") if tok is not None else None)
    labels = json.loads(read("labels.json").decode("utf-8"))
    serve = meta.get("serve")
    if auto and serve and serve.get("machine") not in (None, serving_machine()) and all(
            FILES[b] in meta["files"] for b in ("onnx_int8", "torchscript_bf16")) and _has_onnxruntime():
        meta = {**meta, "serve": served_here(meta, read(FILES["onnx_int8"]), read(FILES["torchscript_bf16"]))}
        backend = meta["serve"]["backend"]
        log.info("%s was exported on another machine (%s); re-timed here: serving %s (%s)", model_dir,
                    serve["machine"].get("cpu"), backend, meta["serve"]["seconds"])
    return meta, backend, vocab, labels, read(FILES[backend])


def _auto_backend(meta: dict) -> str:
    """onnxruntime for CNN/BiLSTM (faster than TorchScript here on every bench/students.py run); TorchScript for
    a BOW, whose sum of embeddings TorchScript runs as one embedding_bag while ONNX has only gather + sum.
    The transformer: the file its export measured faster of int8 ONNX and bf16 TorchScript (``serve``), int8 for
    an export without that record; the BiLSTM int8 where its export measured it faster than fp32 (by
    INT8_MIN_SPEEDUP: int8 changes ~1% of its predictions, worth it only for real speed)."""
    has_onnx = FILES["onnx"] in meta["files"] and _has_onnxruntime()
    has_ts = FILES["torchscript"] in meta["files"]
    serve = meta.get("serve", {}).get("backend")
    if meta["kind"] == "transformer" and serve == "torchscript_bf16" and FILES[serve] in meta["files"]:
        return serve
    if FILES["onnx_int8"] in meta["files"] and _has_onnxruntime() and (
            meta["kind"] == "transformer"
            or (meta["kind"] == "bilstm" and meta.get("int8", {}).get("speedup", 0.0) >= INT8_MIN_SPEEDUP)):
        return "onnx_int8"  # the transformer is served int8 (~2x fp32's speed at ~1/4 of its size)
    if meta["kind"] == "bow" and has_ts:
        return "torchscript"
    return "onnx" if has_onnx else "torchscript"


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def predict_lines(model_dir: str, lines: Iterable[str | bytes], *, batch_size: int = 256,
                  backend: str = "auto", undecodable: list[int] | None = None) -> Iterator[str]:
    """``text<TAB>label<TAB>confidence`` per input line, streaming ``batch_size`` lines at a time
    (for ``slimflow predict MODEL_DIR``: stdin in, stdout out). Empty lines are classified too, so output
    line k always answers input line k.

    Lines may be bytes (stdin as read): a line that is not UTF-8 (or a str holding lone surrogates) is answered
    ``text<TAB>!error<TAB>not UTF-8 (byte N)`` on its own output line, its text shown with U+FFFD, and its
    1-based number appended to ``undecodable``; it never reaches the model, so it cannot cost its batch (issue 12).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    predictor = Predictor(model_dir, backend=backend, batch_size=batch_size)
    chunk: list[tuple[str, str | None]] = []  # (text as shown, why it is undecodable, or None)

    def flush() -> Iterator[str]:
        good = [text for text, why in chunk if why is None]
        labels, probs = predictor.predict(good) if good else ([], None)
        answers = iter((lab, float(probs[i].max())) for i, lab in enumerate(labels))
        for text, why in chunk:
            # A tab inside the text would shift the columns: show it as a space.
            shown = text.replace(chr(9), " ")
            if why is not None:
                yield f"{shown}\t{UNDECODABLE}\t{why}"
            else:
                label, conf = next(answers)
                yield f"{shown}\t{label}\t{conf:.4f}"

    for n, line in enumerate(lines, start=1):
        chunk.append(_decode_line(line))
        if chunk[-1][1] is not None and undecodable is not None:
            undecodable.append(n)
        if len(chunk) == batch_size:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


# predict's label for an input line that is not UTF-8 ("!" starts no label a config lists in practice)
UNDECODABLE = "!error"


def _decode_line(line: str | bytes) -> tuple[str, str | None]:
    if isinstance(line, bytes):
        line = line.rstrip(b"\r\n")
        try:
            return line.decode("utf-8"), None
        except UnicodeDecodeError as e:
            return line.decode("utf-8", errors="replace"), f"not UTF-8 (byte {e.start})"
    line = line.rstrip("\r\n")
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes escaped as lone surrogates by a text stream (surrogateescape)
        return line.encode("utf-8", "replace").decode("utf-8"), f"not UTF-8 (character {e.start})"
    return line, None

