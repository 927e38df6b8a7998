"""The teacher's precision (issue 16): auto measured by a GEMM probe, cached per machine; int8 on the CPU."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from slimflow.storage.shards import read_shard
from slimflow.tasks.teacher import int8, precision
from slimflow.tasks.teacher.label import label_precision, label_shard
from slimflow.tasks.teacher.model import TeacherError, load_teacher, resolve_dtype, resolve_precision
from slimflow.tasks.teacher.precision import GemmShape, probe
from teacher_fixtures import random_texts, write_segment

SHAPE = GemmShape(hidden=32, ffn=64, tokens=16)


class FakeClock:
    """A clock that only the injected matmul moves: each GEMM costs what ``cost`` says for its dtype."""

    def __init__(self, cost: dict):
        self.now, self.cost, self.calls = 0.0, cost, 0

    def __call__(self) -> float:
        return self.now

    def matmul(self, x, w):
        self.calls += 1
        self.now += self.cost[x.dtype]
        return torch.nn.functional.linear(x, w)


@pytest.mark.parametrize("slow, expect", [(torch.bfloat16, "fp32"), (torch.float32, "bf16")])
def test_probe_picks_the_faster_dtype_when_one_is_made_slow(tmp_path, slow, expect):
    clock = FakeClock({torch.float32: 1e-3, torch.bfloat16: 1e-3})
    clock.cost[slow] = 50e-3
    rec = probe(SHAPE, torch.device("cpu"), cache_dir=str(tmp_path), matmul=clock.matmul, clock=clock)
    assert rec["dtype"] == expect and rec["requested"] == "auto" and not rec["cached"]
    # GFLOP/s as timed: both FFN matmuls per call, 2 FLOPs per multiply-add
    fast = min(clock.cost.values())
    assert rec["gflops"][expect] == pytest.approx(SHAPE.flops / (2 * fast) / 1e9, rel=1e-3)
    assert rec["gflops"]["fp32" if expect == "bf16" else "bf16"] < rec["gflops"][expect] / 10
    # cached per machine: the second probe measures nothing and says so
    calls = clock.calls
    again = probe(SHAPE, torch.device("cpu"), cache_dir=str(tmp_path), matmul=clock.matmul, clock=clock)
    assert clock.calls == calls and again["cached"] and again["dtype"] == expect
    (entry,) = json.loads((tmp_path / precision.CACHE_FILE).read_text()).values()
    assert entry["machine"]["cpu"] == precision.cpu_model() and entry["machine"]["shape"] == SHAPE.as_list()


def test_a_lower_precision_must_beat_fp32_by_the_margin():
    assert precision.choose({"fp32": 100.0, "bf16": 105.0}) == "fp32"  # within timing noise: keep fp32
    assert precision.choose({"fp32": 100.0, "bf16": 120.0}) == "bf16"
    assert precision.choose({"fp32": 100.0, "bf16": 90.0, "fp16": 300.0}) == "fp16"
    assert precision.choose({"fp32": 100.0, "bf16": 200.0, "fp16": 210.0}) == "bf16"  # H200: 25,120 vs 24,870


def test_a_damaged_cache_is_measured_again(tmp_path):
    (tmp_path / precision.CACHE_FILE).write_text("{not json")
    clock = FakeClock({torch.float32: 1e-3, torch.bfloat16: 5e-3})
    rec = probe(SHAPE, torch.device("cpu"), cache_dir=str(tmp_path), matmul=clock.matmul, clock=clock)
    assert rec["dtype"] == "fp32" and not rec["cached"]
    assert len(json.loads((tmp_path / precision.CACHE_FILE).read_text())) == 1


def test_explicit_dtypes_and_errors():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_precision("bf16", cpu) == {"requested": "bf16", "dtype": "bf16", "device": "cpu"}
    with pytest.raises(TeacherError, match="dtype 'int4' is not one of auto, fp32, bf16, fp16, int8"):
        resolve_precision("int4", cpu)
    with pytest.raises(TeacherError, match="int8 is a CPU path"):
        resolve_precision("int8", torch.device("cuda:0"))


def test_auto_load_records_what_it_measured(tmp_path, fitted_dir):
    t = load_teacher(fitted_dir, device="cpu", dtype="auto", cache_dir=str(tmp_path), reuse=False)
    rec = t.precision
    assert rec["requested"] == "auto" and rec["dtype"] in ("fp32", "bf16") and set(rec["gflops"]) == {"fp32", "bf16"}
    assert rec["shape"][1:] == [32, 64]  # the tiny BERT's own hidden and FFN widths
    assert t.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[rec["dtype"]]
    assert next(t.model.parameters()).dtype == t.dtype
    # the label stage resolves the same choice from the config alone, from the cache
    before = label_precision(fitted_dir, device="cpu", dtype="auto", cache_dir=str(tmp_path))
    assert before["dtype"] == rec["dtype"] and before["cached"] and before["gflops"] == rec["gflops"]


class SlowAttention:
    """Attention implementations timed by a fake clock: each call costs what ``cost`` says for its name."""

    def __init__(self, cost: dict):
        self.now, self.cost, self.calls = 0.0, cost, 0

    def __call__(self) -> float:
        return self.now

    def impls(self):
        def timed(name, f):
            def run(*a):
                self.calls += 1
                self.now += self.cost[name]
                return f(*a)
            return run
        return {n: timed(n, f) for n, f in (("sdpa", precision._sdpa), ("eager", precision._eager))}


@pytest.mark.parametrize("slow, expect", [("eager", "sdpa"), ("sdpa", "eager")])
def test_the_attention_probe_picks_the_faster_implementation(tmp_path, slow, expect):
    clock = SlowAttention({"sdpa": 1e-3, "eager": 1e-3})
    clock.cost[slow] = 5e-3
    shape = GemmShape(hidden=32, ffn=64, tokens=16, heads=4)
    rec = precision.attention_probe(shape, "fp32", torch.device("cpu"), 12, cache_dir=str(tmp_path),
                                    attend=clock.impls(), clock=clock)
    assert rec["attention"] == expect and rec["attention_shape"] == [4, 12, 8]
    assert rec["attention_gflops"][expect] == pytest.approx(5 * rec["attention_gflops"][slow], rel=1e-3)
    calls = clock.calls
    again = precision.attention_probe(shape, "fp32", torch.device("cpu"), 12, cache_dir=str(tmp_path),
                                      attend=clock.impls(), clock=clock)
    assert again == rec and clock.calls == calls  # cached per machine, dtype and length
    # a tie within the margin keeps the model's own (sdpa): a flip would only add noise
    tie = SlowAttention({"sdpa": 1e-3, "eager": 0.95e-3})
    assert precision.attention_probe(shape, "bf16", torch.device("cpu"), 12, cache_dir=str(tmp_path),
                                     attend=tie.impls(), clock=tie)["attention"] == "sdpa"


def test_both_attention_implementations_compute_the_same_padded_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 6)
    mask[1, :, :, 3:] = torch.finfo(torch.float32).min
    torch.testing.assert_close(precision._eager(q, k, v, mask), precision._sdpa(q, k, v, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chosen", ["eager", "sdpa"])
def test_the_loaded_teacher_runs_the_attention_the_probe_chose(tmp_path, fitted_dir, monkeypatch, chosen):
    def fake_probe(shape, dtype, device, length, **_):
        assert shape.heads > 0 and length == 64  # the teacher's heads, at the max_length it reads
        return {"attention": chosen, "attention_gflops": {}, "attention_shape": [shape.heads, length, 0]}

    monkeypatch.setattr(precision, "attention_probe", fake_probe)
    t = load_teacher(fitted_dir, device="cpu", dtype="fp32", max_length=64, cache_dir=str(tmp_path), reuse=False)
    assert t.model.config._attn_implementation == chosen and t.precision["attention"] == chosen
    texts = random_texts(8, seed=1)
    ref = load_teacher(fitted_dir, device="cpu", dtype="fp32", max_length=64, cache_dir=str(tmp_path), reuse=False)
    ref.model.set_attn_implementation("sdpa")
    from slimflow.tasks.teacher.label import label_texts

    np.testing.assert_allclose(label_texts(t, texts), label_texts(ref, texts), atol=1e-4)
    rec = label_precision(fitted_dir, device="cpu", dtype="fp32", cache_dir=str(tmp_path), max_length=64)
    assert rec["attention"] == chosen  # the label stage records what its tasks run


# ------------------------------------------------------------------------------------------------------ int8
def _int8_paths() -> list[str]:
    engines = [f"tensor:{e}" for e in int8.ENGINES if e in torch.backends.quantized.supported_engines]
    return [int8.TOKEN, *engines, *([int8.ORT] if int8.has_onnxruntime() else [])]


def _tiny_seqcls(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(5, 23, (16, 12))
    mask = torch.ones_like(ids)
    mask[8:, 6:] = 0
    return model, ids, mask


@pytest.mark.parametrize("path", _int8_paths())
def test_int8_logits_close_to_fp32_on_a_tiny_random_bert(tiny_model_dir, tmp_path, path):
    import copy

    model, ids, mask = _tiny_seqcls(tiny_model_dir)
    q = int8.quantize_linears(copy.deepcopy(model), path, output="logits", cache_dir=str(tmp_path))
    if path == int8.ORT:
        import onnx

        graph = onnx.load(q.path).graph
        ops = [n.op_type for n in graph.node]
        # the body's 2 layers x (q, k, v, attention output, FFN up) are int8; the FFN down-projections stay fp32
        assert ops.count("MatMulInteger") == 2 * 5
        assert sum(n.op_type == "MatMul" and "/output/dense/" in n.name and "attention" not in n.name
                   for n in graph.node) == 2
    else:
        assert type(q.classifier) is torch.nn.Linear  # the classifier stays fp32 ...
        body = q.bert.encoder.layer[0].intermediate.dense  # ... the body is int8
        kind = type(body).__name__ if path == int8.TOKEN else type(body).__module__
        assert kind == "TokenInt8Linear" or kind.startswith("torch.ao.nn.quantized.dynamic")
        down = type(q.bert.encoder.layer[0].output.dense).__name__
        # one activation scale per tensor would crush the GELU output's non-outlier channels: fp32 there
        assert down == ("TokenInt8Linear" if path == int8.TOKEN else "Linear")
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits
        got = q(input_ids=ids, attention_mask=mask).logits
    scale = ref.abs().max().item()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 0.05 * scale + 1e-3
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


@pytest.mark.skipif(not int8.has_onnxruntime(), reason="onnxruntime is the export extra")
def test_the_ort_export_is_made_once_per_weights_and_again_for_other_weights(tiny_model_dir, tmp_path, monkeypatch):
    import copy

    model, ids, mask = _tiny_seqcls(tiny_model_dir)
    exports = []
    real = int8._export
    monkeypatch.setattr(int8, "_export", lambda *a, **kw: (exports.append(a[2]), real(*a, **kw)))
    first = int8.ort_body(copy.deepcopy(model), output="logits", cache_dir=str(tmp_path))
    again = int8.ort_body(copy.deepcopy(model), output="logits", cache_dir=str(tmp_path))
    assert len(exports) == 1 and again.path == first.path
    # what the report shows as the served teacher's size: the int8 file, its weights counted from the graph
    from slimflow.tasks.evaluate import served_weights

    params, size = served_weights(first)
    assert size == os.path.getsize(first.path) and sum(p.numel() for p in model.parameters()) <= params
    assert [p.name for p in (tmp_path / "int8").iterdir()] == [first.path.rsplit("/", 1)[1]]  # no temp left
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.bias.add_(torch.tensor([1.0, -1.0]))
    changed = int8.ort_body(other, output="logits", cache_dir=str(tmp_path))
    assert len(exports) == 2 and changed.path != first.path
    with torch.inference_mode():
        a, b = first(input_ids=ids, attention_mask=mask).logits, changed(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, b)


@pytest.mark.skipif(not int8.has_onnxruntime(), reason="onnxruntime is the export extra")
def test_the_ort_export_writes_attention_out_and_leaves_the_model_as_it_was(tiny_model_dir, tmp_path):
    import onnx

    model, ids, mask = _tiny_seqcls(tiny_model_dir)
    model.set_attn_implementation("sdpa")
    body = int8.ort_body(model, output="logits", cache_dir=str(tmp_path))
    ops = {n.op_type for n in onnx.load(body.path).graph.node}
    # traced sdpa guards every attention row with IsNaN/Where; the eager graph is matmul + softmax (faster in ort)
    assert "Softmax" in ops and "IsNaN" not in ops
    assert model.config._attn_implementation == "sdpa"  # the torch model the caller holds is unchanged


def test_the_export_cache_keeps_the_most_recently_used_exports(tmp_path):
    files = [tmp_path / f"{i}.onnx" for i in range(6)]
    for i, f in enumerate(files):
        f.write_bytes(b"x")
        os.utime(f, (1000 + i, 1000 + i))  # 5.onnx the most recently used
    os.utime(files[0], (2000, 2000))  # 0.onnx used last of all
    (tmp_path / "notes.txt").write_text("not an export")
    gone = int8.evict_exports(tmp_path, keep=3, current=files[1])  # 1.onnx: the one just written or loaded
    assert sorted(p.name for p in gone) == ["2.onnx", "3.onnx", "4.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.onnx", "1.onnx", "5.onnx", "notes.txt"]


def test_int8_refuses_where_no_path_beats_fp32():
    slow = {"fp32": 50.0, "token": 1.3, "tensor:fbgemm": 40.0}
    with pytest.raises(int8.Int8Error, match=r"no int8 path is faster than fp32.*token 1.*teacher.dtype auto"):
        int8.plan(SHAPE, figures=slow)
    rec = int8.plan(SHAPE, figures={**slow, "tensor:onednn": 200.0})
    assert rec["path"] == "tensor:onednn" and rec["dtype"] == "int8" and rec["gops"]["fp32"] == 50.0


def test_int8_prefers_per_token_scales_wherever_they_beat_fp32():
    # per-token activation scales move fewer labels than one scale per tensor: taken even when ort is faster
    assert int8.plan(SHAPE, figures={"fp32": 50.0, "token": 60.0, "ort": 200.0})["path"] == "token"
    # where the token path is slower than fp32 (no VNNI kernel), the fastest per-tensor path that beats fp32
    rec = int8.plan(SHAPE, figures={"fp32": 50.0, "token": 1.0, "tensor:x86": 70.0, "ort": 90.0})
    assert rec["path"] == "ort"


def test_int8_labels_end_to_end(tmp_path, fitted_dir, monkeypatch):
    # whatever this CPU measures, run the token path (the figures are injected: the path is what is under test)
    monkeypatch.setattr(int8, "measure", lambda shape, **kw: {"fp32": 1.0, "token": 2.0})
    texts = random_texts(40, seed=5)
    ref = write_segment(tmp_path, texts)
    kw = dict(device="cpu", cache_dir=str(tmp_path / "cache"))
    a = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "original", fitted_dir, "label/a", dtype="fp32",
                                              **kw))
    b = read_shard(str(tmp_path), label_shard(str(tmp_path), ref, "original", fitted_dir, "label/b", dtype="int8",
                                              **kw))
    la, lb = np.asarray(a.column("logits").to_pylist()), np.asarray(b.column("logits").to_pylist())
    assert np.abs(la - lb).max() <= 0.05 * np.abs(la).max() + 1e-3
    t = load_teacher(fitted_dir, dtype="int8", **kw)
    assert t.precision["path"] == "token" and t.dtype == torch.qint8
    with pytest.raises(TeacherError, match="cannot train"):
        load_teacher(fitted_dir, dtype="int8", autocast=True, reuse=False, **kw)


def test_a_failed_ort_export_falls_back_to_the_fastest_torch_path_and_says_so(tmp_path, fitted_dir, monkeypatch):
    def cannot_trace(*a, **kw):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(int8, "_export", cannot_trace)
    # ort planned (the token path slower than fp32 here), its export fails: the torch per-tensor path instead
    monkeypatch.setattr(int8, "measure",
                        lambda shape, **kw: {"fp32": 1.0, "token": 0.5, "tensor:x86": 2.0, "ort": 3.0})
    kw = dict(device="cpu", dtype="int8", reuse=False)
    t = load_teacher(fitted_dir, cache_dir=str(tmp_path / "a"), **kw)
    assert t.precision["path"] == "tensor:x86" and "cannot trace this model" in t.precision["fallback"]
    ids = torch.randint(5, 23, (4, 7))
    assert t.logits(ids, torch.ones_like(ids)).shape == (4, len(t.labels))
    # and where no torch path beats fp32 either, a clear refusal instead of a slow int8
    monkeypatch.setattr(int8, "measure", lambda shape, **kw: {"fp32": 1.0, "token": 0.5, "ort": 3.0})
    with pytest.raises(TeacherError, match="could not export this teacher.*use teacher.dtype auto"):
        load_teacher(fitted_dir, cache_dir=str(tmp_path / "b"), **kw)


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory, tiny_model_dir):
    from slimflow.tasks.teacher.fit import adopt_pretrained
    from teacher_fixtures import LABELS

    d = str(tmp_path_factory.mktemp("teacher"))
    adopt_pretrained(d, labels=LABELS, model=tiny_model_dir)
    return d
