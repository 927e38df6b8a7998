import json

import pytest
import torch
from slimflow.tasks.students.train import evaluate_student, load_student, train_student
from slimflow.tasks.students.vocab import build_vocab_from_shards

LABELS = ["neg", "pos"]


class Interrupt(Exception):
    pass


@pytest.fixture
def data(make_shards):
    run_dir, train = make_shards("labelled", n_shards=3, rows=40, split="train", seed=0)
    _, dev = make_shards("segment", n_shards=1, rows=40, split="dev", seed=1)
    vocab = build_vocab_from_shards(run_dir, train)
    return run_dir, train, dev, vocab


def _train(data, out_dir, **kw):
    run_dir, train, dev, vocab = data
    args = {"kind": "bilstm", "mode": "distilled", "embed_dim": 8, "hidden": 8, "epochs": 4, "patience": 10,
            "batch_size": 16, "shuffle_buffer": 32, "dropout": 0.3, "loss": "mix", "seed": 3, "threads": 1, **kw}
    return train_student(run_dir, train_refs=train, dev_refs=dev, vocab=vocab, labels=LABELS,
                         out_dir=str(out_dir), **args)


def _weights(out_dir, name="last.pt"):
    return torch.load(f"{out_dir}/{name}", weights_only=True)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_training_is_deterministic(data, tmp_path):
    r1 = _train(data, tmp_path / "a", epochs=2)
    r2 = _train(data, tmp_path / "b", epochs=2)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert _strip(r1["history"]) == _strip(r2["history"])
    r3 = _train(data, tmp_path / "c", epochs=2, seed=4)
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    assert r3["params"]["seed"] == 4


def test_trainings_in_concurrent_threads_get_their_seeded_weights(data, tmp_path):
    # The thread runner trains students side by side in one process; torch's RNG is process-wide, so an
    # unguarded seed + init in one thread would draw from another's sequence.
    from concurrent.futures import ThreadPoolExecutor

    kw = {"kind": "bow", "mode": "baseline", "epochs": 1, "dropout": 0.0, "embed_dim": 256}
    _train(data, tmp_path / "alone", **kw)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: _train(data, tmp_path / f"t{k}", **kw), range(4)))
    for k in range(4):
        assert _same(_weights(tmp_path / "alone"), _weights(tmp_path / f"t{k}"))


def test_resume_after_interruption_equals_uninterrupted_run(data, tmp_path):
    full = _train(data, tmp_path / "full")

    def stop_after_two(entry):
        if entry["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(data, tmp_path / "cut", on_epoch_end=stop_after_two)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "cut" / "result.json").exists()
    seen = []
    resumed = _train(data, tmp_path / "cut", on_epoch_end=lambda e: seen.append(e["epoch"]))
    assert seen == [2, 3]  # only the epochs that had not completed ran again
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    assert _same(_weights(tmp_path / "full", "best.pt"), _weights(tmp_path / "cut", "best.pt"))
    assert _strip(resumed["history"]) == _strip(full["history"])
    assert resumed["best_dev_accuracy"] == full["best_dev_accuracy"]


def test_completed_training_is_returned_not_rerun_and_new_params_restart(data, tmp_path):
    first = _train(data, tmp_path / "o", epochs=1)
    again = _train(data, tmp_path / "o", epochs=1, on_epoch_end=lambda e: pytest.fail("retrained"))
    assert again == first
    seen = []
    _train(data, tmp_path / "o", epochs=1, hidden=4, on_epoch_end=lambda e: seen.append(e["epoch"]))
    assert seen == [0] and _weights(tmp_path / "o")["fc.weight"].shape == (4, 8)


@pytest.mark.parametrize("kind,lr,expect", [("bow", None, 3e-3), ("bilstm", None, 1e-3), ("bow", 5e-4, 5e-4)])
def test_adam_default_learning_rate_is_the_kinds_and_a_given_one_wins(data, tmp_path, kind, lr, expect):
    r = _train(data, tmp_path / kind, kind=kind, epochs=1, optimizer="adam", lr=lr)
    state = torch.load(tmp_path / kind / "last.pt", weights_only=True)["optimizer"]
    # Both parts (dense Adam, sparse embedding Adam) step at the recorded rate.
    assert r["params"]["lr"] == expect
    assert [g["lr"] for part in state for g in part["param_groups"]] == [expect, expect]


def test_early_stopping_after_patience_epochs_without_improvement(data, tmp_path):
    # lr 0: the weights never change, so dev accuracy never improves after epoch 0.
    r = _train(data, tmp_path / "es", epochs=10, patience=2, lr=0.0, optimizer="adadelta")
    assert r["epochs_run"] == 3 and r["best_epoch"] == 0 and r["stopped_early"]


@pytest.mark.parametrize("kind,mode,optimizer", [("bow", "baseline", "adadelta"), ("cnn", "distilled", "adam")])
def test_students_learn_the_synthetic_task(data, tmp_path, kind, mode, optimizer):
    run_dir, train, dev, vocab = data
    if mode == "baseline":
        train = [r for r in dev]  # SEGMENT shards with gold labels
    r = train_student(run_dir, kind=kind, mode=mode, train_refs=train, dev_refs=dev, vocab=vocab, labels=LABELS,
                      out_dir=str(tmp_path / kind), embed_dim=16, hidden=16, epochs=8, patience=8, batch_size=8,
                      optimizer=optimizer, loss="mse", seed=0, threads=1)
    assert r["best_dev_accuracy"] >= 0.9
    saved = json.loads((tmp_path / kind / "result.json").read_text())
    assert saved["best_dev_accuracy"] == r["best_dev_accuracy"] and saved["checkpoint"].endswith("best.pt")
    model, v, labels, cfg = load_student(str(tmp_path / kind))
    assert labels == LABELS and v == vocab and cfg["kind"] == kind
    m = evaluate_student(run_dir, dev, str(tmp_path / kind))
    assert m["accuracy"] == pytest.approx(r["best_dev_accuracy"]) and m["n"] == 40


def test_bad_arguments_raise_before_work(data, tmp_path):
    with pytest.raises(ValueError, match="unknown student 'rnn'"):
        _train(data, tmp_path / "x", kind="rnn")
    with pytest.raises(ValueError, match="unknown mode"):
        _train(data, tmp_path / "x", mode="online")
    with pytest.raises(ValueError, match="unknown distillation loss"):
        _train(data, tmp_path / "x", loss="hinge")
    with pytest.raises(ValueError, match="unknown optimizer"):
        _train(data, tmp_path / "x", optimizer="sgd")
    with pytest.raises(ValueError, match="needs train and dev"):
        train_student(data[0], kind="bow", mode="baseline", train_refs=data[1], dev_refs=[], vocab=data[3],
                      labels=LABELS, out_dir=str(tmp_path / "x"))


def test_a_result_is_trusted_only_with_the_files_it_went_with(data, tmp_path):
    from slimflow.storage.atomic_dir import FolderMismatch

    out = tmp_path / "s"
    kw = {"kind": "bow", "mode": "baseline", "epochs": 2, "dropout": 0.0}
    first = _train(data, out, **kw)
    assert set(first["files"]) == {"best.pt", "vocab.json", "labels.json"}
    best = (out / "best.pt").read_bytes()
    # A later training for other params, killed after its first epoch: its best.pt now lies under the first
    # training's result.json (same folder, as the train stage names it by kind and mode).
    with pytest.raises(Interrupt):
        def stop(entry):
            raise Interrupt
        _train(data, out, seed=9, on_epoch_end=stop, **kw)
    assert (out / "best.pt").read_bytes() != best
    with pytest.raises(FolderMismatch, match="best.pt does not match") as e:
        load_student(str(out))  # never a mismatched pair
    assert str(out / "best.pt") in str(e.value) and "slimflow rerun" in str(e.value)
    # the first training asked again: its result.json is not returned as is, the training is redone to the
    # same weights (it resumes from nothing it can trust: last.pt is the other training's)
    again = _train(data, out, **kw)
    assert (out / "best.pt").read_bytes() == best and again["files"] == first["files"]
    load_student(str(out))
    (out / "vocab.json").write_text((out / "vocab.json").read_text().replace("]", ', "x"]', 1))
    with pytest.raises(FolderMismatch, match="vocab.json does not match"):
        load_student(str(out))
    (out / "result.json").unlink()
    with pytest.raises(FileNotFoundError, match="never finished"):
        load_student(str(out))
