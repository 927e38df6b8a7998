"""Online distillation: the students' data come from a running teacher service (``tasks/service.py``) while
they train, instead of from the offline label stage (ERNIE Slim's 在线蒸馏; issue 6).

Every answer is kept: an input shard (original, augmented or unlabelled rows) is asked of the service once,
``server_batch_size`` texts a request with at most ``concurrency`` requests in flight (the seeds'
``--server_batch_size`` / ``--num_coroutine``), and written as a LABELLED shard in ``label/<kind>/`` exactly as
the offline label stage writes it, once all its rows are answered. A small receipt
(``label/online/<key>.json``) records it, so a restarted training, a second student, or a later offline
``label`` stage (``find_labelled``) reuse it instead of asking again.

``OnlineLabeller`` labels the shards in the background, the one a reader waits for first; its ``refs()``
give ``ShardStream`` one lazy ref per input shard, resolved on first read (the first epoch trains on shard k
while shards k+1.. are being labelled; later epochs read the files). A failed or restarting service is retried
with exponential backoff; only ``retries`` failures in a row of one request fail the training (which then
resumes from its checkpoint and the shards already written).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from slimflow.storage.fs import atomic_write_text, exists, join, read_bytes
from slimflow.storage.hashing import fingerprint
from slimflow.storage.manifest import read_manifest
from slimflow.storage.schema import LABELLED
from slimflow.storage.shards import ShardRef, read_shard, shard_ok, write_shard
from slimflow.tasks.service import TOKEN_ENV  # the service's bearer token; never in a config file or a manifest
from slimflow.tasks.teacher.label import KINDS, _input_columns, labelled_table

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})  # the service is busy, restarting or failed: ask again


class OnlineError(RuntimeError):
    """The teacher service refused a request, answered for another teacher, or stayed down past the retries."""


@dataclass
class ClientStats:
    requests: int = 0
    texts: int = 0
    retries: int = 0
    seconds: float = 0.0


class TeacherClient:
    """Asks a teacher service for logits: chunks of ``server_batch_size`` texts, ``concurrency`` in flight,
    each retried ``retries`` times with exponential backoff (``backoff_s`` doubling, capped at 10 s, jittered)
    on connection errors, timeouts and 429/5xx answers. Any other 4xx is a bug on this side: raised at once."""

    def __init__(self, url: str, *, concurrency: int = 4, server_batch_size: int = 64, retries: int = 5,
                 timeout_s: float = 120.0, backoff_s: float = 0.5, token: str | None = None):
        import httpx

        if concurrency < 1 or server_batch_size < 1 or retries < 0:
            raise ValueError(f"concurrency and server_batch_size must be >= 1 and retries >= 0, got "
                             f"{concurrency}, {server_batch_size}, {retries}")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url, self.batch, self.retries, self.backoff_s = url.rstrip("/"), server_batch_size, retries, backoff_s
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                                  limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="teacher-client")
        self._lock = threading.Lock()
        self.stats = ClientStats()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        err = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0) * random.uniform(0.5, 1.0))
            try:
                r = self._http.request(method, path, json=body)
            except httpx.TransportError as e:  # refused (restarting), reset, timed out
                err = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 200:
                return r.json()
            detail = _detail(r)
            if r.status_code not in _RETRY_STATUS:
                raise OnlineError(f"teacher service {self.url}{path} answered {r.status_code}: {detail}")
            err = f"HTTP {r.status_code}: {detail}"
        raise OnlineError(f"teacher service {self.url}{path} failed {self.retries + 1} times in a row (last: {err}); "
                          "is `slimflow teacher serve` running there? (distill.retries sets the patience)")

    def info(self) -> dict:
        return self._call("GET", "/v1/info")

    def logits(self, texts: Sequence[str]) -> tuple[np.ndarray, str]:
        """([N, C] float32 logits in input order, the answering teacher's weights hash)."""
        t0 = time.perf_counter()
        chunks = [list(texts[i : i + self.batch]) for i in range(0, len(texts), self.batch)]
        answers = list(self._pool.map(lambda c: self._call("POST", "/v1/logits", {"texts": c}), chunks))
        hashes = {a["weights_hash"] for a in answers}
        if len(hashes) > 1:
            raise OnlineError(f"the teacher service changed teachers mid-shard ({', '.join(h[:12] for h in hashes)})")
        rows = [row for a in answers for row in a["logits"]]
        if len(rows) != len(texts):
            raise OnlineError(f"the teacher service answered {len(rows)} rows for {len(texts)} texts")
        with self._lock:
            self.stats.requests += len(chunks)
            self.stats.texts += len(texts)
            self.stats.seconds += time.perf_counter() - t0
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), -1), (hashes.pop() if hashes else "")


def _detail(r) -> str:
    try:
        return str(r.json().get("detail", ""))[:200]
    except ValueError:
        return r.text[:200]


# ------------------------------------------------------------------------------------------- shards + receipts
def label_key(kind: str, in_ref: ShardRef, weights_hash: str) -> str:
    """What determines a labelled shard: its input shard's content and the teacher's weights."""
    return fingerprint("online-label", kind, in_ref.sha256, weights_hash)


def _receipt_path(run_dir: str, key: str) -> str:
    return join(run_dir, "label", "online", f"{key[:32]}.json")


def find_labelled(run_dir: str, kind: str, in_ref: ShardRef, weights_hash: str) -> ShardRef | None:
    """The LABELLED shard of ``in_ref`` by this teacher, if one is on disk and intact: written online (receipt)
    or by a committed offline label stage. None when it still has to be asked."""
    path = _receipt_path(run_dir, label_key(kind, in_ref, weights_hash))
    candidates = []
    if exists(path):
        candidates.append(ShardRef.from_dict(json.loads(read_bytes(path).decode("utf-8"))["shard"]))
    m = read_manifest(join(run_dir, "label"))
    if m is not None:
        candidates += [r for r in m.shards if r.split == kind and r.inputs == (in_ref.sha256, weights_hash)]
    for ref in candidates:
        if ref.rows == in_ref.rows and shard_ok(run_dir, ref):
            return ref
    return None


_KEY_LOCKS: dict[str, threading.Lock] = {}
_KEY_LOCKS_GUARD = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    with _KEY_LOCKS_GUARD:
        return _KEY_LOCKS.setdefault(key, threading.Lock())


def label_shard_online(run_dir: str, kind: str, in_ref: ShardRef, client: TeacherClient, weights_hash: str,
                       labels: Sequence[str]) -> ShardRef:
    """One input shard labelled by the service (or found on disk), written as ``label/<kind>/...``.

    Two trainings in one process that need the same shard wait for each other (a per-shard lock), so the
    service is asked once; the receipt is written after the shard, so a kill in between only costs a re-ask.
    """
    if kind not in KINDS:
        raise OnlineError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    key = label_key(kind, in_ref, weights_hash)
    with _key_lock(key):
        found = find_labelled(run_dir, kind, in_ref, weights_hash)
        if found is not None:
            return found
        table = read_shard(run_dir, in_ref)
        _, _, texts = _input_columns(table, kind)
        logits, answered_by = client.logits(texts.to_pylist())
        if table.num_rows and answered_by != weights_hash:
            raise OnlineError(f"the teacher service at {client.url} serves weights {answered_by[:12]}, but this run's "
                              f"teacher is {weights_hash[:12]}; serve this run's teacher (`slimflow teacher serve "
                              "CONFIG --out RUN_DIR`)")
        if logits.shape != (table.num_rows, len(labels)):
            raise OnlineError(f"the teacher service answered logits of shape {logits.shape} for {table.num_rows} "
                              f"rows and {len(labels)} labels")
        out = labelled_table(table, kind, logits, labels)
        ref = write_shard(out, run_dir, f"label/{kind}", kind, in_ref.index, LABELLED,
                          inputs=(in_ref.sha256, weights_hash))
        atomic_write_text(_receipt_path(run_dir, key), json.dumps({
            "kind": kind, "input": in_ref.to_dict(), "weights_hash": weights_hash, "service": client.url,
            "shard": ref.to_dict(), "created_at": time.time()}, indent=1))
        return ref


# ----------------------------------------------------------------------------------------- background labelling
@dataclass(frozen=True)
class OnlineRef:
    """A LABELLED shard that may still have to be asked of the service. ``ShardStream`` calls ``resolve``
    before reading it. ``sha256`` is ``label_key`` (input shard + teacher), standing in for the content hash
    in the students' fingerprints: it is known before the shard exists, and stable across restarts."""

    split: str
    index: int
    rows: int
    sha256: str
    labeller: OnlineLabeller = field(compare=False, repr=False)
    position: int = field(compare=False, repr=False)

    @property
    def path(self) -> str:
        return f"label/{self.split}/{self.split}-{self.index:05d} (online)"

    def resolve(self) -> ShardRef:
        return self.labeller.resolve(self.position)


class OnlineLabeller:
    """Labels ``inputs`` ((kind, input shard) pairs) through ``client`` in a background thread, in order, but
    the shard a reader is waiting for first. ``refs()`` are the lazy refs for ``ShardStream``."""

    def __init__(self, run_dir: str, inputs: Sequence[tuple[str, ShardRef]], client: TeacherClient, *,
                 weights_hash: str, labels: Sequence[str]):
        self.run_dir, self.inputs, self.client = run_dir, list(inputs), client
        self.weights_hash, self.labels = weights_hash, list(labels)
        self._done: dict[int, ShardRef] = {}
        self._todo = list(range(len(self.inputs)))
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.waited_s = 0.0  # time readers spent waiting for a shard (the service kept training waiting)

    def refs(self) -> list[OnlineRef]:
        return [OnlineRef(kind, r.index, r.rows, label_key(kind, r, self.weights_hash), self, i)
                for i, (kind, r) in enumerate(self.inputs)]

    def _check_teacher(self) -> None:
        info = self.client.info()
        if info.get("weights_hash") != self.weights_hash or list(info.get("labels", [])) != self.labels:
            raise OnlineError(f"the teacher service at {self.client.url} serves {info.get('teacher')} "
                              f"({str(info.get('weights_hash'))[:12]}, labels {info.get('labels')}), not this run's "
                              f"teacher ({self.weights_hash[:12]}, labels {self.labels}); serve this run's teacher "
                              "(`slimflow teacher serve CONFIG --out RUN_DIR`)")

    def start(self) -> OnlineLabeller:
        # Shards already on disk need no service; check the teacher only when one has to be asked.
        pending = [i for i, (k, r) in enumerate(self.inputs)
                   if find_labelled(self.run_dir, k, r, self.weights_hash) is None]
        if pending:
            self._check_teacher()
        self._thread = threading.Thread(target=self._work, name="online-labeller", daemon=True)
        self._thread.start()
        return self

    def _work(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._closed or not self._todo:
                        return
                    i = self._todo.pop(0)
                kind, ref = self.inputs[i]
                out = label_shard_online(self.run_dir, kind, ref, self.client, self.weights_hash, self.labels)
                with self._cv:
                    self._done[i] = out
                    self._cv.notify_all()
        except BaseException as e:  # handed to the readers, who re-raise it
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def resolve(self, i: int) -> ShardRef:
        """The labelled shard of input ``i``, waiting for it (and moving it to the front) when needed."""
        t0 = time.perf_counter()
        with self._cv:
            if i in self._todo:
                self._todo.remove(i)
                self._todo.insert(0, i)
            while i not in self._done:
                if self._error is not None:
                    raise OnlineError(f"online labelling failed: {self._error}") from self._error
                if self._thread is None or self._closed:
                    raise OnlineError("the online labeller is not running (call start(), or it was closed)")
                self._cv.wait(timeout=1.0)
            self.waited_s += time.perf_counter() - t0
            return self._done[i]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> OnlineLabeller:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
