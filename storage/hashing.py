"""Content hashes and fingerprints: the cache keys of every stage are chained from these."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from slimflow.storage.fs import is_local, read_bytes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    if is_local(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    return sha256_bytes(read_bytes(path))


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always hash the same."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(*parts: Any) -> str:
    """A sha256 over any JSON-able values, e.g. (stage, input hashes, params, code version)."""
    return sha256_bytes(canonical_json(list(parts)).encode("utf-8"))
