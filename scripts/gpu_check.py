"""The teacher's GPU path on a CUDA machine: device placement, the dtype auto picks, pinned-memory batches,
agreement with the CPU in fp32, the per-GPU worker plan, static token vectors on the device.

Needs only torch, transformers, tokenizers, numpy and pyarrow (no Prefect, no segmenter): it runs on a bare
GPU box with the repository checked out. Teachers are random, built here: a tiny BERT classifier for the
agreement check, and an encoder of multilingual-e5-small's shape (12 layers, hidden 384, a 250k vocabulary)
for the throughput figure. Prints one JSON object; exits 1 when a check fails.

    python scripts/gpu_check.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "tasks" / "teacher"))


def _checkout_namespace() -> None:
    """Make ``slimflow.*`` importable from a bare checkout (a GPU box where nothing is pip-installed): the
    folders linked under a temporary ``slimflow/``, as pyproject's package-dir maps them."""
    import importlib.util

    if importlib.util.find_spec("slimflow") is not None:
        return
    pkg = Path(tempfile.mkdtemp(prefix="slimflow-ns-")) / "slimflow"
    pkg.mkdir()
    for name in ("__init__.py", "api.py"):
        (pkg / name).symlink_to(ROOT / "slimflow" / name)
    for name in ("flows", "tasks", "storage"):
        (pkg / name).symlink_to(ROOT / name)
    sys.path.insert(0, str(pkg.parent))


_checkout_namespace()


def main() -> int:
    import torch
    from slimflow.tasks.students.static import static_vectors
    from slimflow.tasks.students.vocab import Vocab
    from slimflow.tasks.teacher.fit import adopt_pretrained
    from slimflow.tasks.teacher.infer import BatchStats
    from slimflow.tasks.teacher.label import available_devices, label_texts
    from slimflow.tasks.teacher.model import load_base_teacher, load_teacher
    from teacher_fixtures import LABELS, build_seqcls_dir, random_texts

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "devices_auto": available_devices("auto")}
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tdir = str(Path(tmp) / "teacher")
        adopt_pretrained(tdir, labels=LABELS, model=build_seqcls_dir(Path(tmp) / "bert"))
        texts = random_texts(4000, seed=1)
        cpu = load_teacher(tdir, device="cpu", dtype="fp32", reuse=False)
        gpu = load_teacher(tdir, device="auto", dtype="auto", reuse=False)
        out["auto"] = {"device": str(gpu.device), "dtype": str(gpu.dtype), "autocast": gpu.autocast}
        checks["auto places the teacher on cuda"] = gpu.device.type == "cuda"
        y_cpu = label_texts(cpu, texts, batch_tokens=4096)
        stats = BatchStats()
        y_gpu = label_texts(gpu, texts, batch_tokens=16384, stats=stats)
        agree = float((y_cpu.argmax(1) == y_gpu.argmax(1)).mean())
        out["tiny_teacher"] = {"hard_label_agreement_gpu_vs_cpu_fp32": agree,
                               "max_abs_logit_diff": float(np.abs(y_cpu - y_gpu).max()),
                               "batches": len(stats.batches), "pad_waste": stats.pad_waste}
        checks["gpu labels agree with cpu fp32 on >= 99.5% of texts"] = agree >= 0.995
        gpu32 = load_teacher(tdir, device="cuda", dtype="fp32", reuse=False)
        y32 = label_texts(gpu32, texts, batch_tokens=16384)
        checks["gpu fp32 logits match cpu fp32 (atol 1e-3)"] = bool(np.allclose(y32, y_cpu, atol=1e-3))

        # Throughput of an e5-small-shaped encoder on the label path (random weights: speed only).
        from transformers import BertConfig, BertModel

        big = Path(tmp) / "e5-shape"
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=250002, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=1536, max_position_embeddings=514)).save_pretrained(big)
        from teacher_fixtures import build_tokenizer

        build_tokenizer().save_pretrained(big)
        enc = load_base_teacher(str(big), device="cuda", dtype="auto", max_length=128)
        long_texts = random_texts(20000, seed=2, lo=20, hi=60)
        from slimflow.tasks.teacher.infer import run_batched

        run_batched(long_texts[:2000], enc.encode, enc.embed, 384, batch_tokens=65536, device=enc.device,
                    pad_id=enc.pad_id)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = BatchStats()
        run_batched(long_texts, enc.encode, enc.embed, 384, batch_tokens=65536, device=enc.device,
                    pad_id=enc.pad_id, stats=s)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        out["e5_shape_encoder"] = {"dtype": str(enc.dtype), "texts_per_s": len(long_texts) / secs,
                                   "mean_tokens": s.real_tokens / max(s.rows, 1), "batch_tokens": 65536}
        vocab = Vocab.from_texts(long_texts[:500], unit="words", lang="en", lowercase=True)
        t0 = time.perf_counter()
        v1 = static_vectors(vocab, enc, 128)
        v2 = static_vectors(vocab, enc, 128)
        out["static_vectors"] = {"tokens": len(vocab), "seconds": (time.perf_counter() - t0) / 2}
        checks["static vectors on cuda are deterministic"] = bool(np.array_equal(v1, v2))
    out["checks"] = checks
    print(json.dumps(out, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
