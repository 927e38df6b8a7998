"""Which precision the teacher runs in, by measurement: a GEMM probe of the teacher's own shapes (issue 16).

No CPU flag predicts it. Measured at 2048x384x1536 on 2 threads: an AMD EPYC with AVX512-BF16 (no AMX) ran
fp32 56, bf16 151 GFLOP/s; an Intel Xeon without AMX fp32 281, bf16 146; an AMD EPYC with AVX2 only ~25 fp32
against ~7 bf16 (emulated). ``dtype: auto`` therefore times the teacher's two FFN matmuls (tokens x hidden ->
ffn and back) in each candidate dtype on the device it will run on, and takes the fastest. The result is cached
per machine (host, CPU / GPU model, torch version, threads) and shape in ``<cache root>/precision.json``, so the
probe (tens of ms) runs once per machine, and every choice is logged and recorded with its figures.

int8 (``dtype: int8``, CPU only, never chosen by auto) is measured the same way, see ``slimflow.tasks.teacher.int8``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimflow.storage.fs import atomic_write_text

log = logging.getLogger(__name__)

CACHE_FILE = "precision.json"
PROBE_TOKENS = 512  # rows of the probe GEMMs: a typical batch's tokens (batch_tokens 4096 / ~8 per review bucket)
PROBE_BUDGET_S = 0.01  # timed seconds per dtype after one warm-up call: the whole probe stays in the tens of ms
# A lower precision changes the last bits of every logit, and a flip between two near-equal dtypes would relabel
# every shard (the dtype keys the label cache): it must beat fp32 by 10 %, well above run-to-run timing noise.
MARGIN = 1.10
CANDIDATES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
PROBE_VERSION = 1  # bump when what is measured changes: old cache entries are then ignored

Matmul = Callable[[object, object], object]  # (x [M, K], w [N, K]) -> x @ w.T, as torch.nn.functional.linear


@dataclass(frozen=True)
class GemmShape:
    """The teacher's widest matmuls: ``tokens`` x ``hidden`` -> ``ffn`` and ``tokens`` x ``ffn`` -> ``hidden``."""

    hidden: int
    ffn: int
    tokens: int = PROBE_TOKENS
    heads: int = 0  # attention heads (0: unknown, no attention probe)

    @property
    def flops(self) -> float:
        return 2 * 2.0 * self.tokens * self.hidden * self.ffn  # both matmuls, 2 FLOPs per multiply-add

    def as_list(self) -> list[int]:
        return [self.tokens, self.hidden, self.ffn]


def gemm_shape(config) -> GemmShape:
    """The probe shape of a transformers config (hidden_size / intermediate_size; dim / hidden_dim for others)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or 384
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None) or 0
    return GemmShape(int(hidden), int(ffn), heads=int(heads))


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def time_gemms(run: Callable[[], object], flops: float, *, device, budget_s: float = PROBE_BUDGET_S,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Best GFLOP/s of ``run()`` (``flops`` per call): one warm-up call, then timed calls for ``budget_s``
    (at least two)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    sync()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 2 or spent < budget_s:
        t0 = clock()
        run()
        sync()
        dt = clock() - t0
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    return float(f"{flops / max(best, 1e-12) / 1e9:.4g}")  # 4 significant digits: timing noise is larger


def measure(shape: GemmShape, dtypes, device, *, matmul: Matmul | None = None, budget_s: float = PROBE_BUDGET_S,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """GFLOP/s of the teacher's two FFN matmuls in each of ``dtypes`` on ``device``. ``matmul`` and ``clock``
    replace ``torch.nn.functional.linear`` and the timer (tests make one dtype slow with them)."""
    import torch

    linear = matmul or torch.nn.functional.linear
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in dtypes:
        dt = _torch_dtype(name)
        x = torch.randn(shape.tokens, shape.hidden, generator=g).to(device, dt)
        w1 = (torch.randn(shape.ffn, shape.hidden, generator=g) / shape.hidden**0.5).to(device, dt)
        w2 = (torch.randn(shape.hidden, shape.ffn, generator=g) / shape.ffn**0.5).to(device, dt)

        def run(x=x, w1=w1, w2=w2):
            return linear(linear(x, w1), w2)

        with torch.inference_mode():
            out[name] = time_gemms(run, shape.flops, device=device, budget_s=budget_s, clock=clock)
    return out


def choose(gflops: dict[str, float], margin: float = MARGIN) -> str:
    """The fastest dtype, in order of preference fp32, bf16, fp16: each must beat the one kept so far by ``margin``.
    fp16 has bf16's speed on GPUs but a narrower range (activations can overflow): on an H200 the two measured
    within 1 % of each other at e5's shape, and timing noise alone would otherwise pick either."""
    best = "fp32" if "fp32" in gflops else next(iter(gflops))
    for name in ("bf16", "fp16"):
        if name in gflops and gflops[name] > margin * gflops[best]:
            best = name
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_id(device) -> dict:
    """What a measurement holds for: this host, its CPU (or the GPU), torch, the thread count."""
    import torch

    ident = {"host": platform.node(), "cpu": cpu_model(), "torch": torch.__version__,
             "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        ident |= {"gpu": torch.cuda.get_device_name(idx),
                  "gpu_capability": list(torch.cuda.get_device_capability(idx))}
    return ident


def cache_path(cache_dir: str | None = None) -> Path:
    from slimflow.tasks.teacher.convert import default_cache_root

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    return root / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged cache is re-measured, never trusted
        log.warning("ignoring the precision cache %s (%s); measuring again", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def cached_measure(kind: str, shape: GemmShape, device, candidates, measure_fn: Callable[[], dict], *,
                   cache_dir: str | None = None, refresh: bool = False) -> tuple[dict, bool]:
    """(figures, from cache) for ``kind`` ("float" / "int8") at ``shape`` on ``device``: read from the
    per-machine cache, else ``measure_fn()`` and stored. Concurrent writers may drop each other's entry:
    it is then measured again, never wrong."""
    ident = {"kind": kind, "version": PROBE_VERSION, "shape": shape.as_list(), "candidates": list(candidates),
             "device": device.type, **machine_id(device)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_path(cache_dir)
    data = _read_cache(path)
    entry = data.get(key)
    if entry and not refresh and isinstance(entry.get("figures"), dict):
        return entry["figures"], True
    figures = measure_fn()
    data = _read_cache(path)  # re-read: another process may have added entries meanwhile
    data[key] = {"machine": ident, "figures": figures, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        os.makedirs(path.parent, exist_ok=True)
        atomic_write_text(str(path), json.dumps(data, indent=1, sort_keys=True))
    except OSError as e:  # a read-only cache costs a probe per load, nothing else
        log.warning("cannot write the precision cache %s (%s); the probe will run again next time", path, e)
    return figures, False


def probe(shape: GemmShape, device, *, cache_dir: str | None = None, refresh: bool = False,
          matmul: Matmul | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """``dtype: auto`` on ``device``: the fastest of fp32 / bf16 (and fp16 on GPUs) at the teacher's ``shape``.

    Returns the record kept in teacher.json and the label manifest: ``{"requested": "auto", "dtype", "device",
    "gflops": {dtype: GFLOP/s}, "shape": [tokens, hidden, ffn], "cached", "margin"}``.
    """
    import torch

    candidates = CANDIDATES["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        candidates = ("fp32", "fp16")
    t0 = time.perf_counter()
    gflops, cached = cached_measure("float", shape, device, candidates,
                                    lambda: measure(shape, candidates, device, matmul=matmul, clock=clock),
                                    cache_dir=cache_dir, refresh=refresh)
    chosen = choose(gflops)
    figures = ", ".join(f"{k} {v:.0f}" for k, v in gflops.items())
    how = "cached" if cached else f"measured in {1000 * (time.perf_counter() - t0):.0f} ms"
    log.info("teacher dtype auto on %s: %s (GFLOP/s at %s: %s; %s)", device, chosen,
             "x".join(map(str, shape.as_list())), figures, how)
    return {"requested": "auto", "dtype": chosen, "device": str(device), "gflops": gflops, "shape": shape.as_list(),
            "cached": cached, "margin": MARGIN}


# ------------------------------------------------------------------------------------------- attention
# Which attention implementation a float teacher runs (issue 16). torch's fused CPU kernel (sdpa) is not always
# the fastest: on an AMD EPYC with AVX512-BF16 it took 35 % of a bf16 forward, and matmul + softmax ("eager") ran
# the same attention 2.1-2.5x faster up to 128 tokens, slower at 512; in fp32 eager lost by 4x at 256 tokens.
# So it is measured too, at the teacher's max_length (the longest a batch gets: eager's lead shrinks with length).
ATTENTION = ("sdpa", "eager")
ATTENTION_TOKENS = 2048  # tokens of the probe batch (batch x max_length)

Attend = Callable[[object, object, object, object], object]  # (q, k, v, additive mask) -> attention output


def _eager(q, k, v, mask):
    import torch

    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask
    return torch.matmul(scores.softmax(-1), v)


def _sdpa(q, k, v, mask):
    import torch

    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def measure_attention(shape: GemmShape, dtype: str, device, length: int, *, attend: dict[str, Attend] | None = None,
                      budget_s: float = PROBE_BUDGET_S, clock: Callable[[], float] = time.perf_counter) -> dict:
    """GFLOP/s of one attention layer (QK^T, softmax with a padding mask, AV) of the teacher's heads at
    ``length`` tokens per row in ``dtype``, each way of ``ATTENTION``; ``attend`` and ``clock`` replace the
    implementations and the timer (tests)."""
    import torch

    impls = attend or {"sdpa": _sdpa, "eager": _eager}
    head_dim = shape.hidden // shape.heads
    batch = max(1, ATTENTION_TOKENS // length)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, shape.heads, length, head_dim, generator=g).to(device, _torch_dtype(dtype))
               for _ in range(3))
    mask = torch.zeros(batch, 1, 1, length)
    mask[batch // 2 :, :, :, length // 2 :] = torch.finfo(torch.float32).min  # half the rows padded to half
    mask = mask.to(device, q.dtype)
    flops = 4.0 * batch * shape.heads * length * length * head_dim
    with torch.inference_mode():
        return {name: time_gemms(lambda f=f: f(q, k, v, mask), flops, device=device, budget_s=budget_s, clock=clock)
                for name, f in impls.items()}


def attention_probe(shape: GemmShape, dtype: str, device, length: int, *, cache_dir: str | None = None,
                    refresh: bool = False, attend: dict[str, Attend] | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> dict:
    """The attention implementation to run a ``dtype`` teacher with on ``device`` at ``max_length`` ``length``:
    the model's default (sdpa) unless eager beats it by ``MARGIN``; measured once per machine and cached like the
    dtype probe. Returns ``{"attention", "attention_gflops", "attention_shape": [heads, length, head_dim]}``."""
    figures, cached = cached_measure(f"attention:{dtype}:{shape.heads}x{length}", shape, device, ATTENTION,
                                     lambda: measure_attention(shape, dtype, device, length, attend=attend,
                                                               clock=clock),
                                     cache_dir=cache_dir, refresh=refresh)
    chosen = "eager" if figures.get("eager", 0.0) > MARGIN * figures.get("sdpa", 0.0) else "sdpa"
    log.info("teacher attention in %s at %d tokens on %s: %s (GFLOP/s: %s; %s)", dtype, length, device, chosen,
             ", ".join(f"{k} {v:.0f}" for k, v in figures.items()), "cached" if cached else "measured")
    return {"attention": chosen, "attention_gflops": figures,
            "attention_shape": [shape.heads, length, shape.hidden // shape.heads]}


def switch_attention(model, name: str) -> str | None:
    """Switch a transformers ``model`` to attention ``name`` (``set_attn_implementation``); None when it runs
    ``name`` now, else why it keeps its own (no switch, another implementation, or the switch refused)."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if current == name:
        return None
    if switch is None or current not in ATTENTION:
        return f"the model has no sdpa / eager switch (it runs {current})"
    try:
        switch(name)
    except (ValueError, AttributeError, NotImplementedError) as e:
        return str(e)
    return None
