"""The teacher service (tasks/service.py) on a real uvicorn server in a thread, with a tiny random BERT teacher:
answers match offline labelling, concurrent requests are coalesced, OOM splits, bad input is a 4xx, tokens."""

from __future__ import annotations

import json
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "teacher"))
from slimflow.tasks.service import Limits, ServiceError, check_bind, create_app  # noqa: E402
from teacher_fixtures import LABELS, fitted_teacher_dir, random_texts  # noqa: E402


class ServerThread:
    """uvicorn on a free loopback port in a daemon thread; ``url`` once it accepts connections."""

    def __init__(self, app):
        import uvicorn

        ready = self.ready = threading.Event()  # set once uvicorn has started, or given up starting

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None):
                try:
                    await super().startup(sockets=sockets)
                finally:
                    ready.set()

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.ready.set()  # a failed lifespan returns before startup: do not leave __enter__ waiting

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(timeout=60) and self.server.started, "the service did not start"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return fitted_teacher_dir(tmp_path_factory.mktemp("teacher"))


def _serve(teacher_dir, **kw):
    return ServerThread(create_app(teacher_dir, device="cpu", dtype="fp32", threads=1, **kw))


@pytest.fixture(scope="module")
def server(teacher_dir):
    limits = Limits(max_texts=16, max_chars=200, max_body_bytes=8192, batch_tokens=512)
    with _serve(teacher_dir, limits=limits) as s:
        yield s


def test_answers_match_offline_labelling(server, teacher_dir):
    from slimflow.tasks.teacher.label import label_texts
    from slimflow.tasks.teacher.model import load_teacher

    texts = random_texts(12, seed=3) + ["", "   ", "the \x00 movie \x07"]
    r = httpx.post(f"{server.url}/v1/logits", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    want = label_texts(load_teacher(teacher_dir, device="cpu", dtype="fp32", threads=1), texts)
    np.testing.assert_allclose(np.asarray(body["logits"], np.float32), want, atol=1e-5)
    assert body["labels"] == LABELS
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["weights_hash"] == body["weights_hash"] and info["labels"] == LABELS
    assert info["limits"]["max_texts"] == 16
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.post(f"{server.url}/v1/logits", json={"texts": []}).json()["logits"] == []


def test_concurrent_requests_are_coalesced(teacher_dir):
    # The first model call is held until every client's request is in the service's queue (``on_queued``
    # counts them), so the rest must share model calls: no timing involved.
    n = 16
    texts = random_texts(n, seed=4)
    all_queued, first_call = threading.Event(), threading.Event()

    def on_queued(pending_texts):  # event loop: texts queued or in a model call, one per request here
        if pending_texts >= n:
            all_queued.set()

    def hold_first_call(rows, width):  # worker thread, before each forward pass (never an OOM)
        if not first_call.is_set():
            first_call.set()
            assert all_queued.wait(timeout=60), "the clients' requests never all reached the queue"
        return False

    # A budget over the service's estimate for all n texts (chars + 2 specials, before the max_length cap):
    # everything queued behind the first call fits one group.
    limits = Limits(batch_tokens=sum(len(t) + 2 for t in texts))
    with _serve(teacher_dir, limits=limits, oom=hold_first_call, on_queued=on_queued) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c, ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda t: c.post("/v1/logits", json={"texts": [t]}), texts))
        stats = c.get("/v1/stats").json()
    assert all_queued.is_set() and first_call.is_set()
    assert all(a.status_code == 200 and len(a.json()["logits"]) == 1 for a in answers)
    assert stats["requests"] == n
    # The first call took the request(s) queued when it started; all others waited for it and formed one group.
    assert stats["batches"] <= 2, stats
    assert stats["mean_batch_requests"] >= n / 2, stats


def test_oom_inside_a_batch_is_split_and_answered(teacher_dir):
    from slimflow.tasks.teacher.label import label_texts
    from slimflow.tasks.teacher.model import load_teacher

    texts = random_texts(10, seed=5)
    with _serve(teacher_dir, oom=lambda rows, width: rows > 1) as s:
        r = httpx.post(f"{s.url}/v1/logits", json={"texts": texts})
        stats = httpx.get(f"{s.url}/v1/stats").json()
    assert r.status_code == 200
    want = label_texts(load_teacher(teacher_dir, device="cpu", dtype="fp32", threads=1), texts)
    np.testing.assert_allclose(np.asarray(r.json()["logits"], np.float32), want, atol=1e-5)
    assert stats["oom_splits"] > 0 and stats["forward_passes"] == 10


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                            lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
                            max_leaves=8)
_texts = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=260)
_bodies = st.one_of(
    st.binary(max_size=300),  # arbitrary bytes: non-JSON, invalid UTF-8
    _json_values.map(lambda v: json.dumps(v).encode()),  # wrong shapes and types
    st.lists(_texts, max_size=20).map(lambda ts: json.dumps({"texts": ts}).encode()),  # surrogates, controls, long
    st.lists(_texts, max_size=3).map(lambda ts: json.dumps({"texts": ts}, ensure_ascii=False)
                                     .encode("utf-8", "surrogatepass")),  # raw surrogates: invalid UTF-8
    st.dictionaries(st.sampled_from(["texts", "text", "x"]), _json_values, max_size=2)
    .map(lambda d: json.dumps(d).encode()),
    st.just(json.dumps({"texts": ["a" * 9000]}).encode()),  # over max_body_bytes
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=_bodies, ctype=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]))
def test_bad_input_is_a_4xx_never_a_5xx(server, body, ctype):
    r = httpx.post(f"{server.url}/v1/logits", content=body, headers={"content-type": ctype})
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    if r.status_code != 200:
        assert r.status_code in (400, 413, 415, 422) and r.json()["detail"]
        return
    payload = json.loads(body)
    assert ctype.startswith("application/json") and len(r.json()["logits"]) == len(payload["texts"])


def test_limits_answer_413_and_422(server):
    post = lambda body: httpx.post(f"{server.url}/v1/logits", content=body,  # noqa: E731
                                   headers={"content-type": "application/json"})
    assert post(json.dumps({"texts": ["x"] * 17})).status_code == 413
    assert post(json.dumps({"texts": ["x" * 201]})).status_code == 413
    assert post(b"{" * 5000).status_code in (400, 413)
    assert post(json.dumps({"texts": ["\ud800"]})).status_code == 422
    assert post(json.dumps({"texts": [1]})).status_code == 422
    assert post(json.dumps({"text": ["a"]})).status_code == 422
    assert post(b"\xff\xfe").status_code == 400
    assert post(b"pickle\x80\x04").status_code == 400


def test_token_is_required_off_loopback_and_checked(teacher_dir, tmp_path):
    with pytest.raises(ServiceError, match="token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "s3cret-token")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    with pytest.raises(ServiceError, match="until teacher"):
        create_app(str(tmp_path))
    secret = "s3cret-token-value"
    with _serve(teacher_dir, token=secret) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret},
                        {"Authorization": f"Basic {secret}"}, {"Authorization": "Bearer \u00e9".encode("latin-1")}):
            for r in (httpx.post(f"{s.url}/v1/logits", json={"texts": ["good"]}, headers=headers),
                      httpx.get(f"{s.url}/v1/info", headers=headers), httpx.get(f"{s.url}/healthz", headers=headers)):
                assert r.status_code == 401 and secret not in r.text
        ok = {"Authorization": f"Bearer {secret}"}
        r = httpx.post(f"{s.url}/v1/logits", json={"texts": ["good"]}, headers=ok)
        assert r.status_code == 200 and secret not in r.text
        assert secret not in httpx.get(f"{s.url}/v1/info", headers=ok).text
