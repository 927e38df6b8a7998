"""``dtype: int8``: the teacher's linear layers in dynamic int8 on the CPU (issue 16), by the fastest path measured.

Two ways to run an int8 linear, both with per-output-channel weight scales and activations quantised at run time:

- ``token``: one scale per token (row) of the activations, int8 x int8 -> int32 through ``torch._int_mm``, rescaled
  by (token scale x channel scale). The finer scales; fast where oneDNN has VNNI / AMX kernels for it (an AMD
  EPYC with AVX512-VNNI: 94 GOP/s against 56 fp32), a reference loop elsewhere (AVX2 only: ~1 GOP/s).
- ``tensor:<engine>``: torch's dynamic quantised Linear (one activation scale per batch) on a quantised engine
  (onednn, x86, fbgemm). On an AVX2-only EPYC its onednn kernels measured ~4x the fp32 GEMM.

Which one runs is measured at the teacher's shapes (``plan``), cached per machine like the float probe
(``slimflow.tasks.teacher.precision``), and recorded. When no int8 path beats fp32 here, ``plan`` refuses with the
figures: int8 changes the labels (a few % of hard labels flip), and it is only worth that when it is faster; a silent
fallback to fp32 would leave a user believing they had asked for the fast path. ``dtype: auto`` never picks int8:
whether its labels are good enough is judged by the students trained on them (bench/label.py), not by a timer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

from slimflow.tasks.teacher.errors import TeacherError
from slimflow.tasks.teacher.precision import PROBE_BUDGET_S, GemmShape, cached_measure, time_gemms

log = logging.getLogger(__name__)

TOKEN = "token"
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


def _linears(model) -> list[str]:
    from torch import nn

    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(part in KEEP_FLOAT for part in name.split("."))]


def quantize_linears(model, path: str):
    """``model`` (fp32, CPU) with its body's linear layers in int8 by ``path`` (``token`` or ``tensor:<engine>``);
    classification layers stay fp32. Returns the model (changed in place)."""
    import torch

    names = _linears(model)
    if path == TOKEN:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, token_linear(getattr(parent, child)))
        return model
    engine = path.removeprefix("tensor:")
    if not path.startswith("tensor:") or engine not in torch.backends.quantized.supported_engines:
        raise Int8Error(f"int8 path {path!r} is not 'token' or 'tensor:<engine>' with an engine torch has "
                        f"({', '.join(torch.backends.quantized.supported_engines)})")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # The weights are packed for the engine set now, and the process's engine stays on it: every int8 teacher in
    # a process runs on the same measured-fastest engine.
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # eager-mode quantisation "moves to torchao": it still works in torch 2.x
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8,
                                inplace=True)


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
    return out


def plan(shape: GemmShape, *, cache_dir: str | None = None, refresh: bool = False, figures: dict | None = None) -> dict:
    """The int8 path to run at ``shape`` on this CPU (the fastest measured), or ``Int8Error`` when none beats fp32.

    ``figures`` replaces the measurement (tests). Returns the record kept in teacher.json / the label manifest:
    ``{"requested": "int8", "dtype": "int8", "path", "device": "cpu", "gops": {path: GOP/s, "fp32": GFLOP/s},
    "shape", "cached"}``.
    """
    import torch

    cached = figures is not None
    if figures is None:
        figures, cached = cached_measure("int8", shape, torch.device("cpu"), ("fp32", TOKEN, *ENGINES),
                                         lambda: measure(shape), cache_dir=cache_dir, refresh=refresh)
    paths = {k: v for k, v in figures.items() if k != "fp32"}
    shown = ", ".join(f"{k} {v:.0f}" for k, v in figures.items())
    if not paths or max(paths.values()) <= figures.get("fp32", 0.0):
        raise Int8Error(f"teacher.dtype int8: no int8 path is faster than fp32 on this CPU (GOP/s at "
                        f"{'x'.join(map(str, shape.as_list()))}: {shown}); it has no fast int8 GEMM (VNNI / AMX "
                        "or an engine kernel for it). Use teacher.dtype auto (the fastest of fp32 / bf16 here)")
    best = max(paths, key=paths.get)
    log.info("teacher dtype int8: path %s (GOP/s: %s; %s)", best, shown, "cached" if cached else "measured")
    return {"requested": "int8", "dtype": "int8", "path": best, "device": "cpu", "gops": figures,
            "shape": shape.as_list(), "cached": cached}
