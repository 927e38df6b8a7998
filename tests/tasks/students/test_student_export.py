import json

import numpy as np
import pytest
import torch
from slimflow.storage.schema import SEGMENT
from slimflow.storage.shards import write_shard
from slimflow.tasks.students.export import INT8_MIN_SPEEDUP, Predictor, _auto_backend, export_student, predict_lines
from slimflow.tasks.students.train import load_student, train_student
from slimflow.tasks.students.vocab import Vocab

KINDS = ["bow", "cnn", "bilstm"]
LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (train_dir, export_dir): one epoch on a few rows, then exported to ONNX + TorchScript."""
    root = tmp_path_factory.mktemp("export")
    rows = [("a", ["很", "好"], "pos"), ("b", ["太", "差"], "neg"), ("c", ["好"], "pos"), ("d", ["差", "了"], "neg")]
    table = {"id": [r[0] for r in rows], "text": ["".join(r[1]) for r in rows], "label": [r[2] for r in rows],
             "source_file": ["t"] * 4, "source_row": [1, 2, 3, 4], "words": [r[1] for r in rows],
             "pos": [["x"] * len(r[1]) for r in rows], "ws": [[False] * len(r[1]) for r in rows]}
    import pyarrow as pa

    ref = write_shard(pa.table(table), str(root), "segment/train", "train", 0, SEGMENT)
    vocab = Vocab.build([r[1] for r in rows])
    out = {}
    for kind in KINDS:
        train_dir, export_dir = root / f"train-{kind}", root / f"export-{kind}"
        train_student(str(root), kind=kind, mode="baseline", train_refs=[ref], dev_refs=[ref], vocab=vocab,
                      labels=LABELS, out_dir=str(train_dir), embed_dim=8, hidden=8, epochs=1, max_len=16,
                      threads=1)
        export_student(str(train_dir), str(export_dir), lang="zh")
        out[kind] = (str(train_dir), str(export_dir))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_matches_pytorch_on_new_batch_and_length_sizes(exported, kind):
    import onnxruntime as ort

    train_dir, export_dir = exported[kind]
    model, vocab, _, _ = load_student(train_dir)
    sess = ort.InferenceSession(f"{export_dir}/model.onnx", providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, time in [(1, 1), (5, 3), (33, 40)]:  # the export example was (2, 8)
        ids = rng.integers(0, len(vocab), (batch, time)).astype(np.int64)
        lengths = rng.integers(0, time + 1, batch).astype(np.int64)
        got = sess.run(None, {"ids": ids, "lengths": lengths})[0]
        with torch.inference_mode():
            want = model(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_predictor_backends_agree_and_map_text_to_labels(exported, kind):
    _, export_dir = exported[kind]
    meta = json.loads(open(f"{export_dir}/student.json").read())
    assert meta["lang"] == "zh" and meta["max_len"] == 16 and meta["kind"] == kind
    texts = ["很好", "太差了", "", "好" * 50, "差差", "好差好"]
    p_onnx = Predictor(export_dir, backend="onnx", batch_size=5, rows_per_call=2)  # steps, sorted sub-calls
    p_ts = Predictor(export_dir, backend="torchscript", rows_per_call=64)
    # auto: TorchScript's embedding_bag for a BOW, onnxruntime for the others (the BiLSTM's int8 where its export
    # measured int8 faster)
    fast_int8 = meta.get("int8", {}).get("speedup", 0) >= INT8_MIN_SPEEDUP
    auto = "torchscript" if kind == "bow" else "onnx_int8" if kind == "bilstm" and fast_int8 else "onnx"
    assert p_onnx.backend == "onnx" and Predictor(export_dir).backend == auto
    np.testing.assert_allclose(p_onnx.predict_proba(texts), p_ts.predict_proba(texts), atol=1e-5)
    labels, probs = p_onnx.predict(texts)
    assert len(labels) == 6 and set(labels) <= set(LABELS) and probs.shape == (6, len(LABELS))
    # each label is its row's most probable class, in p.labels' column order
    assert labels == [p_onnx.labels[k] for k in probs.argmax(-1)] and np.allclose(probs.sum(-1), 1, atol=1e-5)


def test_bilstm_export_ships_an_int8_lstm_close_to_fp32_with_its_measured_speedup(exported):
    import onnx

    train_dir, export_dir = exported["bilstm"]
    meta = json.loads(open(f"{export_dir}/student.json").read())
    assert meta["int8"]["ops"] == ["LSTM"] and meta["int8"]["speedup"] > 0 and "model.int8.onnx" in meta["files"]
    ops = {n.op_type for n in onnx.load(f"{export_dir}/model.int8.onnx").graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    texts = ["很好", "太差了", "", "好" * 50, "差差", "好差好"]
    p8, p32 = Predictor(export_dir, backend="onnx_int8"), Predictor(export_dir, backend="onnx")
    np.testing.assert_allclose(p8.predict_proba(texts), p32.predict_proba(texts), atol=0.02)
    assert not json.loads(open(f"{exported['cnn'][1]}/student.json").read()).get("int8")  # CNN: fp32 only


def test_auto_backend_serves_bilstm_int8_only_where_measured_faster():
    files = {"model.onnx": "x", "model.ts": "x", "model.int8.onnx": "x"}

    def auto(kind, speedup):
        return _auto_backend({"kind": kind, "files": files, "int8": {"speedup": speedup}})

    assert auto("bilstm", INT8_MIN_SPEEDUP + 0.1) == "onnx_int8"
    assert auto("bilstm", INT8_MIN_SPEEDUP - 0.1) == "onnx"  # int8 flips ~1% of predictions: not for less
    assert auto("transformer", 0.5) == "onnx_int8" and auto("bow", 9.0) == "torchscript"
    assert _auto_backend({"kind": "bilstm", "files": {"model.onnx": "x"}}) == "onnx"  # an export before int8
    # the transformer: the file its export measured faster, where that file is there
    bf16 = {"kind": "transformer", "files": {**files, "model.bf16.ts": "x"}, "serve": {"backend": "torchscript_bf16"}}
    assert _auto_backend(bf16) == "torchscript_bf16"
    assert _auto_backend({**bf16, "serve": {"backend": "onnx_int8"}}) == "onnx_int8"
    assert _auto_backend({**bf16, "files": files}) == "onnx_int8"


def test_served_metrics_score_the_export_on_raw_test_text(exported, tmp_path):
    import pyarrow as pa
    from slimflow.tasks.evaluate import served_metrics

    _, export_dir = exported["bilstm"]
    p = Predictor(export_dir, backend="onnx")
    texts = ["很好", "太差了", "好", "差了", "好好", "差"]
    pred, _ = p.predict(texts)
    gold = [pred[0], pred[1], pred[2]] + [LABELS[1 - LABELS.index(y)] for y in pred[3:]]  # three right, three wrong
    n = len(texts)
    table = {"id": [f"t{i}" for i in range(n)], "text": texts, "label": gold, "source_file": ["t"] * n,
             "source_row": list(range(n)), "words": [list(t) for t in texts], "pos": [["x"] * len(t) for t in texts],
             "ws": [[False] * len(t) for t in texts]}
    ref = write_shard(pa.table(table), str(tmp_path), "segment/test", "test", 0, SEGMENT)
    m = served_metrics(str(tmp_path), [ref], p)
    assert m["accuracy"] == pytest.approx(0.5) and m["n"] == n


def test_predict_lines_writes_one_tsv_line_per_input(exported):
    _, export_dir = exported["bow"]
    out = list(predict_lines(export_dir, ["很好\n", "太差\t了\n", "\n"], batch_size=2))
    assert len(out) == 3
    cols = [line.split("\t") for line in out]
    assert [c[0] for c in cols] == ["很好", "太差 了", ""]
    assert all(len(c) == 3 and c[1] in LABELS and 0.5 <= float(c[2]) <= 1 for c in cols)


def test_missing_or_partial_export_dir_raises(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match="not an exported student"):
        Predictor(str(tmp_path))
    with pytest.raises(ValueError, match="unknown export format"):
        export_student(exported["bow"][0], str(tmp_path / "x"), lang="zh", formats=["tflite"])


def _snapshot(folder) -> dict:
    import os

    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_export_records_every_file_and_the_predictor_refuses_a_tampered_one(tmp_path, exported):
    import shutil

    from slimflow.storage.atomic_dir import FolderMismatch
    from slimflow.storage.hashing import sha256_file

    export_dir = tmp_path / "bow"
    shutil.copytree(exported["bow"][1], export_dir)
    meta = json.loads((export_dir / "student.json").read_text())
    assert meta["format"] == 2
    assert set(meta["files"]) == {"model.onnx", "model.ts", "vocab.json", "labels.json"}
    assert all(sha256_file(str(export_dir / n)) == r["sha256"] for n, r in meta["files"].items())
    Predictor(str(export_dir))  # whole: loads
    for name, backend in (("vocab.json", "onnx"), ("labels.json", "onnx"), ("model.onnx", "onnx"),
                          ("model.ts", "torchscript")):
        good = (export_dir / name).read_bytes()
        (export_dir / name).write_bytes(good.replace(b"]", b", \"x\"]", 1) if name.endswith(".json") else good[:-9])
        with pytest.raises(FolderMismatch, match="slimflow export") as e:
            Predictor(str(export_dir), backend=backend)
        assert str(export_dir / name) in str(e.value)  # names the file
        (export_dir / name).write_bytes(good)
    Predictor(str(export_dir), backend="onnx")  # ...and loads again once it is whole


def test_a_killed_export_leaves_the_previous_folder_whole_and_the_rerun_redoes_it(tmp_path, exported, monkeypatch):
    import os
    import shutil

    import slimflow.tasks.students.export as ex
    from slimflow.storage.atomic_dir import sweep

    train_dir = exported["cnn"][0]
    export_dir = tmp_path / "export" / "cnn"
    export_student(train_dir, str(export_dir), lang="zh")
    before = _snapshot(export_dir)
    texts = ["很好", "太差了"]
    want = Predictor(str(export_dir)).predict_proba(texts)

    # 1. the export fails after model.onnx is written (an exception standing in for a kill): nothing changes
    def boom(model, path):
        assert os.path.exists(os.path.join(os.path.dirname(path), "model.onnx"))  # some files are written
        raise RuntimeError("killed")

    monkeypatch.setattr(ex, "export_torchscript", boom)
    with pytest.raises(RuntimeError, match="killed"):
        export_student(train_dir, str(export_dir), lang="en")
    monkeypatch.undo()
    assert _snapshot(export_dir) == before and os.listdir(tmp_path / "export") == ["cnn"]

    # 2. what a SIGKILL leaves: a half-built folder beside it (a new model.onnx, no student.json)
    partial = tmp_path / "export" / "cnn.incomplete-dead"
    partial.mkdir()
    (partial / "model.onnx").write_bytes(b"half")
    assert _snapshot(export_dir) == before  # the reader never looks there
    np.testing.assert_allclose(Predictor(str(export_dir)).predict_proba(texts), want, atol=1e-6)

    # 3. the rerun (another lang: a different student.json) cleans it up and swaps its own folder in whole
    meta = export_student(train_dir, str(export_dir), lang="en")
    assert os.listdir(tmp_path / "export") == ["cnn"]
    after = _snapshot(export_dir)
    assert json.loads(after["student.json"])["lang"] == "en" and after["model.onnx"] != b"half"
    assert meta["lang"] == "en"
    np.testing.assert_allclose(Predictor(str(export_dir)).predict_proba(texts), want, atol=1e-6)

    # 4. killed between the swap's two renames: the old folder moved aside, the new one not yet in place
    os.rename(export_dir, tmp_path / "export" / "cnn.old-dead")
    shutil.copytree(tmp_path / "export" / "cnn.old-dead", tmp_path / "export" / "cnn.incomplete-done")
    sweep(str(export_dir))  # what the next build does first: the previous folder is put back as it was
    assert os.listdir(tmp_path / "export") == ["cnn"] and _snapshot(export_dir) == after
    export_student(train_dir, str(export_dir), lang="zh")
    assert os.listdir(tmp_path / "export") == ["cnn"] and _snapshot(export_dir).keys() == before.keys()


def test_torch_export_and_tracing_run_one_at_a_time(monkeypatch, tmp_path):
    """The export stage exports its students on threads; torch.export, scripting and tracing are not thread-safe
    (the full preset's BOW, CNN and transformer failed together). Each runs holding the module's lock."""
    from slimflow.tasks.students import export as ex
    from slimflow.tasks.students.models import BOW

    held = []

    def record(*args, **kwargs):
        held.append(ex.EXPORT_LOCK.locked())
        raise RuntimeError("recorded")

    monkeypatch.setattr(torch.onnx, "export", record)
    monkeypatch.setattr(torch.jit, "script", record)
    monkeypatch.setattr(torch.jit, "trace", record)
    model = BOW(20, 2, embed_dim=4, hidden=4, dropout=0.0)
    for export in (ex.export_onnx, ex.export_torchscript):
        with pytest.raises(RuntimeError, match="recorded"):
            export(model, str(tmp_path / "m"))
    head = torch.nn.Module()
    head.out = torch.nn.Linear(2, 2)  # what the bf16 export keeps fp32
    with pytest.raises(RuntimeError, match="recorded"):
        ex.export_torchscript_bf16(head, str(tmp_path / "m"))
    assert held == [True, True, True] and not ex.EXPORT_LOCK.locked()
