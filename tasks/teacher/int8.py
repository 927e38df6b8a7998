"""``dtype: int8``: the teacher's linear layers in dynamic int8 on the CPU (issue 16), by the path measured here.

Three ways to run an int8 linear, all with per-output-channel weight scales and activations quantised at run time:

- ``token``: one scale per token (row) of the activations, int8 x int8 -> int32 through ``torch._int_mm``, rescaled
  by (token scale x channel scale). The finer scales; fast where oneDNN has VNNI / AMX kernels for it (an AMD
  EPYC with AVX512-VNNI: 94 GOP/s against 56 fp32), a reference loop elsewhere (AVX2 only: ~1 GOP/s).
- ``tensor:<engine>``: torch's dynamic quantised Linear (one activation scale per batch) on a quantised engine
  (onednn, x86, fbgemm).
- ``ort``: the whole body exported to ONNX once (cached per weights in the cache directory), its linears made
  ``MatMulInteger`` by onnxruntime's dynamic quantisation (one activation scale per call), run by onnxruntime.
  On an AVX2-only EPYC its int8 GEMMs measured ~1.5x torch's best engine, and the label stage ran 1.45x its fp32
  speed with 98.5% of the hard labels unchanged (bench/label.py); torch's tensor path had reached the same 1.45x
  only with every linear in int8, at 92.8%.

The per-tensor paths (``tensor:*``, ``ort``) keep each FFN's down-projection (a linear with more inputs than
outputs: BERT's ``output.dense``, DistilBERT's ``lin2``) in fp32. Its input, the GELU output, has a few outlier
channels (Bondarenko et al. 2021, "Understanding and overcoming the challenges of efficient transformer
quantization"), and one scale for the whole tensor crushes every other channel: on e5-small with en reviews,
quantising them too moved the hard labels of 4.5% of texts against 1.8% without (layer 4's alone, 2.5 points).

Which one runs is measured at the teacher's shapes (``plan``), cached per machine like the float probe
(``slimflow.tasks.teacher.precision``), and recorded: ``token`` wherever it beats fp32, even when a per-tensor path
is faster still, else the fastest per-tensor path. The finer scales are worth more than the last GOP/s: on the
AVX512-VNNI EPYC, ``ort`` ran its GEMMs at 1,384 GOP/s against ``token``'s 1,102, but students trained on ``ort``'s
labels lost 1.07 (BOW) and 0.87 (BiLSTM) points of test accuracy to students trained on fp32 labels, and on
``token``'s 0.47 and 0.00 (bench/label.py, quick demo, mean of 3 seeds; 99.27% of hard labels equal to fp32's
against ort's 98.47%).

When no int8 path beats fp32 here, ``plan`` refuses with the figures: int8 changes the labels (a few % of hard
labels flip), and it is only worth that when it is faster; a silent fallback to fp32 would leave a user believing
they had asked for the fast path. ``dtype: auto`` never picks int8:
whether its labels are good enough is judged by the students trained on them (bench/label.py), not by a timer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path

from slimflow.tasks.teacher.errors import TeacherError
from slimflow.tasks.teacher.precision import PROBE_BUDGET_S, GemmShape, cached_measure, switch_attention, time_gemms

log = logging.getLogger(__name__)

TOKEN = "token"
ORT = "ort"
# in the cache key of an export: a change of rules exports again
ORT_RULES = "v2: eager attention, MatMul, per-channel, reduce_range, down-projections fp32"
# exports kept in the cache, the most recently used first: each is ~400 MB for e5-small, and every fitted head,
# fine-tuned teacher or change of rules makes a new one
ORT_KEEP = 4
ENGINES = ("onednn", "x86", "fbgemm")  # torch's quantised engines with int8 GEMM kernels on x86 (qnnpack: ARM)
# Modules left in fp32: the classification layers (tiny, and the logits' last step) and anything outside the body.
KEEP_FLOAT = ("classifier", "pooler", "score", "pre_classifier", "qa_outputs")


class Int8Error(TeacherError):
    """int8 cannot run (or would not be faster) here; the message gives the figures and the fix."""


def token_linear(linear):
    """An ``nn.Linear`` as int8 with per-token activation scales and per-channel weight scales (``torch._int_mm``)."""
    import torch
    from torch import nn

    class TokenInt8Linear(nn.Module):
        def __init__(self):
            super().__init__()
            w = linear.weight.detach().float().cpu()
            scale = w.abs().amax(1).clamp(min=1e-8) / 127.0  # [out]
            q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.register_buffer("w_t", q.t().contiguous())  # [in, out]: _int_mm's second operand
            self.register_buffer("w_scale", scale)
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().cpu())
            self.in_features, self.out_features = linear.in_features, linear.out_features

        def forward(self, x):
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1]).float()
            s = x2.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127.0  # [rows, 1]
            q = torch.round(x2 / s).clamp_(-127, 127).to(torch.int8)
            y = torch._int_mm(q, self.w_t).float() * s * self.w_scale
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*lead, self.out_features)

    return TokenInt8Linear()


def _runs_int8(parts: list[str], n_in: int, n_out: int, per_tensor: bool) -> bool:
    """Whether a linear layer (its name's ``parts``, its in / out widths) runs in int8: not the classification
    layers, and with one activation scale per tensor (``per_tensor``) not the down-projections either (see the
    module's docstring). One rule for torch modules and exported ONNX MatMuls."""
    return not any(part in KEEP_FLOAT for part in parts) and not (per_tensor and n_in > n_out)


def _linears(model, per_tensor: bool = False) -> list[str]:
    """The body's linear layers to run in int8 (``_runs_int8``)."""
    from torch import nn

    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and _runs_int8(name.split("."), m.in_features, m.out_features, per_tensor)]


def has_onnxruntime() -> bool:
    """onnx and onnxruntime installed (the ``export`` extra); looked up, not imported: ``plan`` asks on every load."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def quantize_linears(model, path: str, *, output: str = "last_hidden_state", cache_dir: str | None = None):
    """``model`` (fp32, CPU) with its body's linear layers in int8 by ``path`` (``token``, ``tensor:<engine>`` or
    ``ort``); classification layers stay fp32, and down-projections on the per-tensor paths. Returns the model
    (changed in place), or for ``ort`` an ``OrtBody`` called the same way that returns ``output``."""
    import torch

    if path == ORT:
        return ort_body(model, output=output, cache_dir=cache_dir)
    if path == TOKEN:
        for name in _linears(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, token_linear(getattr(parent, child)))
        return model
    engine = path.removeprefix("tensor:")
    if not path.startswith("tensor:") or engine not in torch.backends.quantized.supported_engines:
        raise Int8Error(f"int8 path {path!r} is not 'token', 'ort' or 'tensor:<engine>' with an engine torch has "
                        f"({', '.join(torch.backends.quantized.supported_engines)})")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # The weights are packed for the engine set now, and the process's engine stays on it: every int8 teacher in
    # a process runs on the same measured-fastest engine.
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # eager-mode quantisation "moves to torchao": it still works in torch 2.x
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in _linears(model, per_tensor=True)},
                                dtype=torch.qint8, inplace=True)


def quantize_planned(model, rec: dict, *, output: str = "last_hidden_state", cache_dir: str | None = None):
    """(model, plan) with ``quantize_linears`` by ``rec``'s path (``plan``'s record). An ``ort`` export that fails
    (an architecture the ONNX exporter cannot trace, a model past protobuf's 2 GB) falls back to the fastest torch
    int8 path measured, and the returned plan says so (``fallback``): never silently."""
    if rec["path"] != ORT:
        return quantize_linears(model, rec["path"]), rec
    try:
        return quantize_linears(model, ORT, output=output, cache_dir=cache_dir), rec
    except Exception as e:  # noqa: BLE001 -- whatever the exporter raises, the torch paths remain
        reason = f"{type(e).__name__}: {e}"[:300]
        path = _fastest(rec.get("gops", {}), exclude=(ORT,))
        if path is None:
            raise Int8Error(f"teacher.dtype int8: the ort path could not export this teacher ({reason}) and no "
                            "torch int8 path is faster than fp32 here; use teacher.dtype auto") from e
        log.warning("teacher dtype int8: the ort export failed (%s); running torch's %s path instead", reason, path)
        return quantize_linears(model, path), {**rec, "path": path, "fallback": f"ort failed: {reason}"}


# ------------------------------------------------------------------------------------------------ onnxruntime
class OrtBody:
    """A teacher's body as an int8 ONNX model run by onnxruntime, called like the Hugging Face model it replaces
    (``input_ids`` and ``attention_mask`` tensors in, an object with ``output`` out, a float32 tensor)."""

    def __init__(self, path: str, config, output: str, params: int):
        self.session = _session(path)
        # params: the exported model's, counted before export (the report's served size; no reload of the file)
        self.config, self.output, self.path, self.params = config, output, path, params

    def __call__(self, input_ids, attention_mask, **_):
        import torch

        out = self.session.run(None, {"input_ids": input_ids.cpu().numpy().astype("int64"),
                                      "attention_mask": attention_mask.cpu().numpy().astype("int64")})[0]
        return _Outputs(**{self.output: torch.from_numpy(out)})

    # what the float paths call on a model: nothing to move or cast, it is CPU int8 already
    def to(self, *_, **__):
        return self

    def eval(self):
        return self

    def float(self):
        return self


class _Outputs(dict):
    __getattr__ = dict.__getitem__


def _session(path: str):
    """An onnxruntime CPU session on torch's thread count (what ``set_threads`` chose for the teacher)."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def matmul_weights(onnx_path: str) -> list[tuple[str, int, int]]:
    """(node name, in, out) of an exported graph's MatMul nodes whose second input is a 2-D weight (an
    initializer: the exporter's transposed [in, out]). Shared by the teacher's ``ort`` path and the students'
    int8 export, so both apply the same down-projection rule to the same nodes."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    found = []
    for node in graph.node:
        dims = shapes.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if dims and len(dims) == 2:
            found.append((node.name, dims[0], dims[1]))
    return found


def _int8_matmuls(onnx_path: str) -> list[str]:
    """Names of the exported graph's MatMul nodes to quantise: those with a weight, but the down-projections
    (more inputs than outputs) and the classification layers."""
    return [name for name, n_in, n_out in matmul_weights(onnx_path)
            if _runs_int8(name.split("/"), n_in, n_out, per_tensor=True)]


def _quantize_onnx(fp32_path: str, out_path: str) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # reduce_range (7-bit weights): without VNNI, x86 int8 kernels add u8 x s8 pairs into int16 and can saturate;
    # 7 bits cannot, on any CPU. Per-channel scales keep the weights' error below the activations'.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().disabled, was = True, logging.getLogger().disabled  # "consider pre-processing" noise
        try:
            quantize_dynamic(fp32_path, out_path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=_int8_matmuls(fp32_path),
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.getLogger().disabled = was


def _export(module, args: tuple, path: str, input_names: list[str], dynamic_axes: dict) -> None:
    import torch

    with warnings.catch_warnings():  # the TorchScript exporter's tracer warnings about Python control flow
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, path, input_names=input_names, output_names=["out"],
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)


@contextlib.contextmanager
def _eager_attention(model):
    """``model`` with its attention written out as matmul + softmax while it is exported: onnxruntime runs that
    graph as fast as the traced ``sdpa`` one at 32x32 tokens and 8-20% faster at 32x64 and 16x128 (e5-small,
    2 threads, fp32 and int8 alike). A model without the switch is exported as it is."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    kept = switch_attention(model, "eager") if before is not None else None
    if kept is not None:
        log.info("teacher dtype int8 (ort): exporting with %s attention (%s)", before, kept)
    try:
        yield
    finally:
        if before is not None:
            switch_attention(model, before)


def ort_body(model, *, output: str = "last_hidden_state", cache_dir: str | None = None) -> OrtBody:
    """``model`` exported to ONNX and quantised for the ``ort`` path; the file is cached under the cache
    directory by the model's weights and this module's rules, so a teacher is exported once per machine (~30 s
    for e5-small), not once per run."""
    import onnxruntime as ort
    import torch
    from slimflow.storage.hashing import sha256_bytes
    from slimflow.tasks.teacher.convert import default_cache_root
    from slimflow.tasks.teacher.model import state_hash

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    key = sha256_bytes(f"{state_hash(model)}|{output}|{ORT_RULES}|{ort.__version__}|{torch.__version__}".encode())
    path = root / "int8" / f"{key[:24]}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)

        class Body(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), output)

        ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
        axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            fp32 = os.path.join(tmp, "fp32.onnx")
            log.info("teacher dtype int8 (ort): exporting the teacher to ONNX once, cached at %s", path)
            with torch.inference_mode(), _eager_attention(model):
                _export(Body(), (ids, mask), fp32, ["input_ids", "attention_mask"], axes)
            part = os.path.join(tmp, "int8.onnx")
            _quantize_onnx(fp32, part)
            os.replace(part, path)  # whole or absent: a killed export leaves no half file behind
        evict_exports(path.parent, keep=ORT_KEEP, current=path)
    else:
        os.utime(path)  # used now: the last to be evicted
    return OrtBody(str(path), getattr(model, "config", None), output, sum(p.numel() for p in model.parameters()))


def evict_exports(folder: Path, *, keep: int, current: Path) -> list[Path]:
    """Delete all but the ``keep`` most recently used exports in ``folder`` (``current`` always stays); returns
    what was deleted. A session already built from a deleted file keeps running: onnxruntime read it whole."""
    files = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    gone = [p for p in files if p != current][max(keep - 1, 0):]
    for p in gone:
        with contextlib.suppress(FileNotFoundError):  # another process evicted it first
            p.unlink()
            log.info("teacher dtype int8 (ort): evicted the unused export %s (%d kept)", p, keep)
    return gone


def _ort_ffn(shape: GemmShape, tmp: str):
    """The probe's two FFN linears as an ``ort`` int8 session (what the ``ort`` path runs, the down-projection
    in fp32 included), and an input for it."""
    import numpy as np
    import torch
    from torch import nn

    body = nn.Sequential(nn.Linear(shape.hidden, shape.ffn), nn.Linear(shape.ffn, shape.hidden))
    fp32, q = os.path.join(tmp, "ffn.onnx"), os.path.join(tmp, "ffn.int8.onnx")
    x = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(0))
    _export(body, (x,), fp32, ["x"], {"x": {0: "tokens"}})
    _quantize_onnx(fp32, q)
    session = _session(q)
    feed = {"x": x.numpy().astype(np.float32)}
    return lambda: session.run(None, feed)


def measure(shape: GemmShape, *, budget_s: float = PROBE_BUDGET_S) -> dict[str, float]:
    """GOP/s of the teacher's two FFN matmuls in fp32 and through every int8 path (quantising the activations
    included: that is what a forward pays)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape.tokens, shape.hidden, generator=g)
    body = nn.Sequential(nn.Linear(shape.hidden, shape.ffn), nn.Linear(shape.ffn, shape.hidden)).eval()
    cpu = torch.device("cpu")
    out = {}
    with torch.inference_mode():
        out["fp32"] = time_gemms(lambda: body(x), shape.flops, device=cpu, budget_s=budget_s)
        before = torch.backends.quantized.engine
        paths = [TOKEN] + [f"tensor:{e}" for e in ENGINES if e in torch.backends.quantized.supported_engines]
        for path in paths:
            try:
                q = quantize_linears(copy.deepcopy(body), path)
                out[path] = time_gemms(lambda q=q: q(x), shape.flops, device=cpu, budget_s=budget_s)
            except (RuntimeError, NotImplementedError) as e:  # an engine without kernels for this CPU
                log.info("int8 path %s does not run here: %s", path, e)
        with contextlib.suppress(RuntimeError):
            torch.backends.quantized.engine = before
    if has_onnxruntime():
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out[ORT] = time_gemms(_ort_ffn(shape, tmp), shape.flops, device=cpu, budget_s=budget_s)
        except Exception as e:  # noqa: BLE001 -- an export or session failure only removes the candidate
            log.info("int8 path ort does not run here: %s", e)
    return out


def candidates() -> tuple[str, ...]:
    """The figures ``measure`` gives here (the probe cache's key: installing onnxruntime measures again)."""
    return ("fp32", TOKEN, *ENGINES, *((ORT,) if has_onnxruntime() else ()))


def _fastest(figures: dict[str, float], exclude: tuple[str, ...] = ()) -> str | None:
    """The int8 path to run by the probe's ``figures`` (``exclude`` left out): ``token`` (per-token activation
    scales) when it beats fp32, else the fastest per-tensor path that does, else None."""
    fp32 = figures.get("fp32", 0.0)
    if TOKEN not in exclude and figures.get(TOKEN, 0.0) > fp32:
        return TOKEN
    paths = {k: v for k, v in figures.items() if k != "fp32" and k not in exclude}
    best = max(paths, key=paths.get, default=None)
    return best if best is not None and paths[best] > fp32 else None


def plan(shape: GemmShape, *, cache_dir: str | None = None, refresh: bool = False, figures: dict | None = None) -> dict:
    """The int8 path to run at ``shape`` on this CPU (``token`` where it beats fp32, else the fastest per-tensor
    path), or ``Int8Error`` when none beats fp32.

    ``figures`` replaces the measurement (tests). Returns the record kept in teacher.json / the label manifest:
    ``{"requested": "int8", "dtype": "int8", "path", "device": "cpu", "gops": {path: GOP/s, "fp32": GFLOP/s},
    "shape", "cached"}``.
    """
    import torch

    cached = figures is not None
    if figures is None:
        figures, cached = cached_measure("int8", shape, torch.device("cpu"), candidates(),
                                         lambda: measure(shape), cache_dir=cache_dir, refresh=refresh)
    best = _fastest(figures)
    shown = ", ".join(f"{k} {v:.0f}" for k, v in figures.items())
    if best is None:
        raise Int8Error(f"teacher.dtype int8: no int8 path is faster than fp32 on this CPU (GOP/s at "
                        f"{'x'.join(map(str, shape.as_list()))}: {shown}); it has no fast int8 GEMM (VNNI / AMX "
                        "or an engine kernel for it). Use teacher.dtype auto (the fastest of fp32 / bf16 here)")
    log.info("teacher dtype int8: path %s (GOP/s: %s; %s)", best, shown, "cached" if cached else "measured")
    return {"requested": "int8", "dtype": "int8", "path": best, "device": "cpu", "gops": figures,
            "shape": shape.as_list(), "cached": cached}
