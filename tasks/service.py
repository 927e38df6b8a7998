"""The teacher as an HTTP service, for online distillation (ERNIE Slim's 在线蒸馏; issue 6).

Students' data loaders (``tasks/online.py``) ask it for logits while they train, instead of reading a label
stage from disk. One process holds the fitted teacher of a run (``RUN_DIR/teacher/model``):

    POST /v1/logits  {"texts": [...]}  ->  {"logits": [[...], ...], "labels": [...], "teacher", "weights_hash"}
    GET  /v1/info    teacher name, weights hash, labels, limits        GET /v1/stats  batching figures
    GET  /healthz

Dynamic batching: each request's texts go into one asyncio queue; a single batcher coroutine takes the first
waiting request, adds whatever else is queued (waiting at most ``max_wait_ms``) up to a token budget, and runs
the group through ``label_texts`` in a worker thread (length-sorted token-budget batches, out-of-memory split
in halves, see ``tasks/teacher/infer.py``). While the model runs, new requests queue up, so concurrent
clients share forward passes. The budget counts characters capped at the teacher's ``max_length`` (+2 for
the specials): an upper bound of the tokens for CJK text, and ``label_texts`` re-batches by true token counts.

Safety: JSON only (no pickle on the wire); bad input is a 4xx with a one-line ``detail``, never a 5xx; a
token (``Authorization: Bearer T``) is checked on every request with a constant-time compare and never
logged or echoed; off loopback a token is required (``check_bind``).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from slimflow.tasks.teacher.infer import BatchStats, OomHook

log = logging.getLogger(__name__)

TOKEN_ENV = "SLIMFLOW_TOKEN"


class ServiceError(ValueError):
    """The service cannot start as asked (no fitted teacher, no token off loopback): the message says why."""


@dataclass(frozen=True)
class Limits:
    # A client sends server_batch_size (64) texts at a time, each at most data.max_chars (the data stage
    # quarantines longer ones as pathological input, not as too long for the teacher: it truncates them itself);
    # anything larger is a client bug, answered 413.
    max_texts: int = 1024
    max_chars: int = 500_000  # data.max_chars' default
    # 64 texts of ~40,000 CJK characters JSON-escaped (~6 bytes a char); longer ones: a smaller server_batch_size
    max_body_bytes: int = 16 * 2**20
    batch_tokens: int = 4096  # coalescing budget per model call; teacher.batch_tokens (cache-sized on CPU)
    max_wait_ms: float = 2.0  # how long the batcher waits for more requests once it holds one
    max_pending_texts: int = 64 * 1024  # queued texts beyond this are answered 503 (back-pressure), not held
    # A whole body (16 MiB at most) crosses a LAN in well under a second; a client that sends part of one and
    # stalls would otherwise hold its connection forever (issue 12). Answered 408, and the connection closed.
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ServiceError(f"service limit {name} must be positive, got {value}")


@dataclass
class ServiceStats:
    requests: int = 0
    texts: int = 0
    batches: int = 0  # model calls (coalesced groups of requests)
    forward_passes: int = 0
    oom_splits: int = 0
    busy_s: float = 0.0
    started_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_batch_texts"] = self.texts / self.batches if self.batches else 0.0
        d["mean_batch_requests"] = self.requests / self.batches if self.batches else 0.0
        d["texts_per_s_busy"] = self.texts / self.busy_s if self.busy_s else 0.0
        return d


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ServiceError(f"binding {host} exposes the teacher beyond this machine: set a token with --token or "
                           f"the {TOKEN_ENV} environment variable (or bind 127.0.0.1)")


@dataclass
class _Pending:
    texts: list[str]
    tokens: int
    future: asyncio.Future


def create_app(teacher_dir: str, *, token: str | None = None, limits: Limits = Limits(), device: str = "auto",
               dtype: str = "auto", threads: int | None = None, cache_dir: str | None = None,
               trust_remote_code: bool = False, oom: OomHook | None = None,
               on_queued: Callable[[int], None] | None = None):
    """The FastAPI app serving the fitted teacher in ``teacher_dir``; the teacher loads at startup.

    ``oom`` forces out-of-memory errors in the model (tests). ``on_queued(pending_texts)`` is called in the
    event loop each time a request joins the batching queue, with the texts now queued or in a model call
    (tests synchronise on it). ``app.state.stats`` holds the batching figures.
    """
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from slimflow.storage.fs import exists, join
    from slimflow.tasks.teacher.model import TEACHER_JSON

    if not exists(join(teacher_dir, TEACHER_JSON)):
        raise ServiceError(f"no fitted teacher in {teacher_dir}; run `slimflow run CONFIG --until teacher` first")
    token_b = token.encode("utf-8") if token else None
    stats = ServiceStats()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        from slimflow.tasks.teacher.model import load_teacher

        teacher = await asyncio.to_thread(load_teacher, teacher_dir, device=device, dtype=dtype, threads=threads,
                                          cache_dir=cache_dir, trust_remote_code=trust_remote_code)
        state.update(teacher=teacher, queue=asyncio.Queue(), pending=0)
        task = asyncio.create_task(_batcher(teacher))
        log.info("teacher %s (%s) ready", teacher.name, teacher.weights_hash[:12])
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="slimflow teacher", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stats = stats

    async def _batcher(teacher) -> None:
        from slimflow.tasks.teacher.label import label_texts

        queue: asyncio.Queue = state["queue"]
        loop = asyncio.get_running_loop()
        while True:
            group = [await queue.get()]
            tokens = group[0].tokens
            deadline = loop.time() + limits.max_wait_ms / 1000
            while tokens < limits.batch_tokens:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), remaining)
                    # Python 3.10 (still supported) raises asyncio.TimeoutError, a separate class there;
                    # from 3.11 on it is the builtin TimeoutError.
                    except (TimeoutError, asyncio.TimeoutError):
                        break
                group.append(item)
                tokens += item.tokens
            texts = [t for p in group for t in p.texts]
            bs = BatchStats()
            t0 = time.perf_counter()
            try:
                logits = await asyncio.to_thread(label_texts, teacher, texts, batch_tokens=limits.batch_tokens,
                                                 oom=oom, stats=bs)
            except Exception as e:  # the model failed (e.g. out of memory on one row): every request in the group
                log.exception("teacher failed on a batch of %d texts", len(texts))
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            finally:
                state["pending"] -= len(texts)
                stats.busy_s += time.perf_counter() - t0
                stats.batches += 1
                stats.requests += len(group)
                stats.texts += len(texts)
                stats.forward_passes += len(bs.batches)
                stats.oom_splits += bs.oom_splits
            start = 0
            for p in group:
                if not p.future.done():  # the client may have gone away
                    p.future.set_result(logits[start : start + len(p.texts)])
                start += len(p.texts)

    def _auth(request: Request) -> None:
        if token_b is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        # compare_digest on bytes: constant time whatever the value; the value is never logged or echoed.
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("utf-8", "replace"), token_b):
            raise HTTPException(401, "missing or wrong token: send `Authorization: Bearer <token>`",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):  # a bug or a model failure: no internals in the body
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the service log"}, 500)

    @app.get("/healthz", dependencies=[Depends(_auth)])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", dependencies=[Depends(_auth)])
    async def info() -> dict:
        t = state["teacher"]
        return {"teacher": t.name, "kind": t.kind, "weights_hash": t.weights_hash, "labels": list(t.labels),
                "max_length": t.max_length, "device": str(t.device), "dtype": str(t.dtype).replace("torch.", ""),
                "limits": asdict(limits)}

    @app.get("/v1/stats", dependencies=[Depends(_auth)])
    async def get_stats() -> dict:
        return stats.to_dict()

    @app.post("/v1/logits", dependencies=[Depends(_auth)])
    async def logits(request: Request) -> dict:
        texts = _parse(await _read_body(request), limits)
        t = state["teacher"]
        out = {"labels": list(t.labels), "teacher": t.name, "weights_hash": t.weights_hash}
        if not texts:
            return {"logits": [], **out}
        if state["pending"] + len(texts) > limits.max_pending_texts:
            raise HTTPException(503, "teacher busy: too many texts queued; retry later", headers={"Retry-After": "1"})
        fut = asyncio.get_running_loop().create_future()
        cap = t.max_length
        state["pending"] += len(texts)
        state["queue"].put_nowait(_Pending(texts, sum(min(len(x), cap) + 2 for x in texts), fut))
        if on_queued is not None:
            on_queued(state["pending"])
        try:
            y = await fut
        except Exception as e:
            from slimflow.tasks.teacher.infer import is_oom

            if isinstance(e, RuntimeError) and is_oom(e.__cause__ or e):
                raise HTTPException(503, "teacher out of memory on a single text; lower the client's "
                                    "server_batch_size or the teacher's max_length") from None
            raise
        return {"logits": y.tolist(), **out}

    async def _read_body(request: Request) -> bytes:
        from fastapi import HTTPException
        from starlette.requests import ClientDisconnect

        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPException(415, "send JSON: Content-Type: application/json")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise HTTPException(413, f"body over {limits.max_body_bytes} bytes; send fewer texts per request")
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.body_timeout_s
        stream = request.stream().__aiter__()
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0.0))
            except StopAsyncIteration:
                break
            # Python 3.10 raises asyncio.TimeoutError, a separate class there (see _batcher).
            except (TimeoutError, asyncio.TimeoutError):
                log.warning("%s sent %d bytes of its request body in %g s and stalled: answered 408, connection "
                            "closed", client, size, limits.body_timeout_s)
                raise HTTPException(408, f"request body not complete within {limits.body_timeout_s:g} s; send the "
                                    "whole body at once", headers={"Connection": "close"}) from None
            except ClientDisconnect:  # one line, not an ASGI traceback: a client going away is not a bug
                log.info("%s disconnected after %d bytes of its request body", client, size)
                raise HTTPException(400, "client disconnected before its body was complete") from None
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise HTTPException(413, f"body over {limits.max_body_bytes} bytes; send fewer texts per request")
            chunks.append(chunk)
        return b"".join(chunks)

    return app


def _parse(body: bytes, limits: Limits) -> list[str]:
    """The ``texts`` of a request body, or an HTTPException (400 / 413 / 422) saying what is wrong."""
    from fastapi import HTTPException

    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPException(400, "body is not valid UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise HTTPException(400, f"body is not JSON ({str(e)[:80]}); send {{\"texts\": [\"...\"]}}") from None
    if not isinstance(payload, dict):
        raise HTTPException(422, f"body must be a JSON object {{\"texts\": [...]}}, got {type(payload).__name__}")
    if "texts" not in payload:
        raise HTTPException(422, "missing field `texts`: send {\"texts\": [\"...\"]}")
    extra = sorted(k for k in payload if k != "texts")
    if extra:
        raise HTTPException(422, f"unknown field(s) {', '.join(repr(k[:40]) for k in extra[:5])}; only `texts`")
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise HTTPException(422, f"`texts` must be a list of strings, got {type(texts).__name__}")
    if len(texts) > limits.max_texts:
        raise HTTPException(413, f"{len(texts)} texts in one request, over max_texts {limits.max_texts}; "
                            "split the request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise HTTPException(422, f"texts[{i}] must be a string, got {type(t).__name__}")
        if len(t) > limits.max_chars:
            raise HTTPException(413, f"texts[{i}] has {len(t)} characters, over max_chars {limits.max_chars}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no tokenizer can read it
            raise HTTPException(422, f"texts[{i}] is not valid Unicode (lone surrogate)") from None
    return texts


def serve(teacher_dir: str, *, host: str = "127.0.0.1", port: int = 8500, token: str | None = None,
          limits: Limits = Limits(), log_level: str = "info", **teacher_kwargs) -> None:
    """Run the service in the foreground until interrupted (``slimflow teacher serve``)."""
    import uvicorn

    check_bind(host, token)
    app = create_app(teacher_dir, token=token, limits=limits, **teacher_kwargs)
    # The access log shows method, path and status only: the Authorization header is never logged.
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
