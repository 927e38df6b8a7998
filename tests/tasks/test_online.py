"""Online distillation (tasks/online.py) against a real teacher service in a subprocess: a student trains on
shards the service answers, the service is SIGKILLed mid-training and restarted, and the answers are kept as
LABELLED shards that a later run reuses without asking."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "teacher"))
from slimflow.storage.schema import LABELLED  # noqa: E402
from slimflow.storage.shards import read_shard  # noqa: E402
from slimflow.tasks.online import OnlineError, OnlineLabeller, TeacherClient, find_labelled  # noqa: E402
from teacher_fixtures import LABELS, fitted_teacher_dir, random_texts, write_augment, write_segment  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``slimflow.tasks.service.serve`` in a subprocess on ``port``; ``start`` returns once /healthz answers."""

    def __init__(self, teacher_dir: str, port: int):
        self.teacher_dir, self.port, self.proc = teacher_dir, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> ServiceProcess:
        code = (f"from slimflow.tasks.service import serve; serve({self.teacher_dir!r}, port={self.port}, "
                "log_level='warning', device='cpu', dtype='fp32', threads=1)")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, "the service exited"
            assert time.monotonic() < deadline, "the service did not start"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return fitted_teacher_dir(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def weights(teacher_dir):
    from slimflow.tasks.teacher.model import read_teacher_json

    return read_teacher_json(teacher_dir)["weights_hash"]


def _run(tmp_path, n_shards=4, rows=30):
    run_dir = str(tmp_path / "run")
    inputs = [("original", write_segment(run_dir, random_texts(rows, seed=k), index=k)) for k in range(n_shards)]
    inputs += [("augmented", write_augment(run_dir, [t + " \ue000" for t in random_texts(rows, seed=50 + k)],
                                           index=k)) for k in range(n_shards)]
    dev = write_segment(run_dir, random_texts(20, seed=99), split="dev", rel="segment/dev")
    return run_dir, inputs, dev


def _train(run_dir, refs, dev, out="train/bilstm-distilled"):
    from slimflow.storage.fs import join
    from slimflow.tasks.students.train import train_student
    from slimflow.tasks.students.vocab import build_vocab_from_shards

    vocab = build_vocab_from_shards(run_dir, [r for k, r in _INPUTS[run_dir] if k == "original"])
    return train_student(run_dir, kind="bilstm", mode="distilled", train_refs=refs, dev_refs=[dev], vocab=vocab,
                         labels=LABELS, out_dir=join(run_dir, out), embed_dim=8, hidden=8, epochs=2, batch_size=16,
                         progress=False)


_INPUTS: dict = {}


class GatedClient(TeacherClient):
    """Waits before its second shard until ``gate`` is set: the test kills the service in between."""

    def __init__(self, *a, gate: threading.Event, **kw):
        super().__init__(*a, **kw)
        self.gate, self.shards = gate, 0

    def logits(self, texts):
        self.shards += 1
        if self.shards == 2:
            assert self.gate.wait(timeout=60)
        return super().logits(texts)


def test_killed_service_restarts_and_training_finishes(tmp_path, teacher_dir, weights):
    from slimflow.tasks.teacher.label import label_shard

    run_dir, inputs, dev = _run(tmp_path)
    _INPUTS[run_dir] = inputs
    svc = ServiceProcess(teacher_dir, _free_port()).start()
    killed = threading.Event()

    def kill_after_first_shard():
        deadline = time.monotonic() + 60
        while not list((Path(run_dir) / "label" / "online").glob("*.json")):  # shard 0 is on disk
            assert time.monotonic() < deadline
            time.sleep(0.02)
        svc.kill()
        killed.set()  # the client now meets a dead service: connection refused until the restart
        svc.start()

    killer = threading.Thread(target=kill_after_first_shard, daemon=True)
    killer.start()
    try:
        with GatedClient(svc.url, concurrency=3, server_batch_size=8, retries=12, backoff_s=0.1,
                         gate=killed) as client:
            with OnlineLabeller(run_dir, inputs, client, weights_hash=weights, labels=LABELS) as labeller:
                result = _train(run_dir, labeller.refs(), dev)
            killer.join(timeout=120)
            assert client.stats.retries > 0  # it did meet the dead service
            assert client.stats.texts == sum(r.rows for _, r in inputs)  # every text asked exactly once
        assert result["epochs_run"] == 2 and len(result["history"]) == 2
        # Every answer is a LABELLED shard, the same as offline labelling writes.
        for kind, r in inputs:
            ref = find_labelled(run_dir, kind, r, weights)
            assert ref is not None and ref.path.startswith(f"label/{kind}/") and ref.rows == r.rows
            online = read_shard(run_dir, ref)
            assert online.column_names == LABELLED.names
            offline = read_shard(run_dir, label_shard(run_dir, r, kind, teacher_dir, f"offline/{kind}",
                                                      device="cpu", dtype="fp32"))
            np.testing.assert_allclose(np.asarray(online.column("logits").to_pylist()),
                                       np.asarray(offline.column("logits").to_pylist()), atol=1e-5)
            assert online.column("id").to_pylist() == offline.column("id").to_pylist()
        # A rerun with the service gone asks nothing: the shards are on disk, and the training result is reused.
        svc.kill()
        with TeacherClient(svc.url, retries=0) as client:
            with OnlineLabeller(run_dir, inputs, client, weights_hash=weights, labels=LABELS) as labeller:
                again = _train(run_dir, labeller.refs(), dev, out="train/bilstm-again")
            assert client.stats.requests == 0
        assert again["epochs_run"] == 2
    finally:
        if svc.proc.poll() is None:
            svc.kill()


def test_service_down_fails_clearly_after_retries(tmp_path, weights):
    run_dir, inputs, _ = _run(tmp_path, n_shards=1)
    with TeacherClient(f"http://127.0.0.1:{_free_port()}", retries=2, backoff_s=0.01) as client:
        with pytest.raises(OnlineError, match="failed 3 times"):
            OnlineLabeller(run_dir, inputs, client, weights_hash=weights, labels=LABELS).start()
        assert client.stats.retries == 2


def test_wrong_teacher_is_refused(tmp_path, teacher_dir):
    from slimflow.tasks.service import create_app

    sys.path.insert(0, str(Path(__file__).parent))
    from test_service import ServerThread

    run_dir, inputs, _ = _run(tmp_path, n_shards=1)
    with ServerThread(create_app(teacher_dir, device="cpu", dtype="fp32", threads=1)) as s:
        with TeacherClient(s.url) as client, pytest.raises(OnlineError, match="not this run's teacher"):
            OnlineLabeller(run_dir, inputs, client, weights_hash="0" * 64, labels=LABELS).start()
        with TeacherClient(s.url, token=os.environ.get("NO_SUCH_VAR")) as client:
            with pytest.raises(OnlineError, match="413"):
                client._call("POST", "/v1/logits", {"texts": ["x"] * 5000})
