"""Stage manifests: the only proof that a stage is complete.

A stage writes its shards first and its ``manifest.json`` last, atomically. A stage directory without a
manifest (a killed run) is never trusted; its stray shard files are swept once a manifest is committed.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass, field
from typing import Any

from slimflow.storage.fs import atomic_write_text, exists, join, listdir, read_bytes, remove
from slimflow.storage.shards import ShardRef

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _installed_version() -> str:
    try:
        return importlib.metadata.version("slimflow")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "0+unknown"


# slimflow's version (slimflow.__version__), recorded in every manifest: which release wrote a run directory.
SLIMFLOW_VERSION = _installed_version()


@dataclass
class Manifest:
    stage: str
    fingerprint: str  # hash of (inputs, params, code version): equal fingerprints mean equal outputs
    params: dict[str, Any]
    code_version: str
    shards: list[ShardRef]
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific facts (labels, counts, files)
    created_at: float = field(default_factory=time.time)
    slimflow_version: str = SLIMFLOW_VERSION

    def split(self, name: str) -> list[ShardRef]:
        return [s for s in self.shards if s.split == name]

    def rows(self, split: str | None = None) -> int:
        return sum(s.rows for s in self.shards if split is None or s.split == split)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "stage": self.stage,
                "fingerprint": self.fingerprint,
                "code_version": self.code_version,
                "slimflow_version": self.slimflow_version,
                "created_at": self.created_at,
                "params": self.params,
                "extra": self.extra,
                "shards": [s.to_dict() for s in self.shards],
            },
            indent=1,
            ensure_ascii=False,
            default=str,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"manifest format {d.get('format')} is not {FORMAT_VERSION}; rerun the stage")
        return cls(
            stage=d["stage"],
            fingerprint=d["fingerprint"],
            params=d["params"],
            code_version=d["code_version"],
            shards=[ShardRef.from_dict(s) for s in d["shards"]],
            extra=d.get("extra", {}),
            created_at=d.get("created_at", 0.0),
            slimflow_version=d.get("slimflow_version", "unknown"),
        )


def manifest_path(stage_dir: str) -> str:
    return join(stage_dir, MANIFEST)


def read_manifest(stage_dir: str) -> Manifest | None:
    """The committed manifest of a stage, or None when the stage never completed."""
    path = manifest_path(stage_dir)
    if not exists(path):
        return None
    return Manifest.from_json(read_bytes(path).decode("utf-8"))


def commit_manifest(stage_dir: str, manifest: Manifest, keep: tuple[str, ...] = ()) -> None:
    """Atomically publish ``manifest`` as the stage's state, then sweep unreferenced shard files.

    The sweep runs after the commit, so the previous state stays whole until the new one is in place.
    ``keep`` names extra files (relative to the stage dir) that are part of the stage, e.g. rejects.parquet.
    """
    atomic_write_text(manifest_path(stage_dir), manifest.to_json())
    stage_name = stage_dir.rstrip("/").rsplit("/", 1)[-1]
    referenced = {s.path for s in manifest.shards} | {f"{stage_name}/{k}" for k in keep}
    for sub in listdir(stage_dir):
        sub_path = join(stage_dir, sub)
        if sub.endswith(".parquet"):
            if f"{stage_name}/{sub}" not in referenced:
                remove(sub_path)
            continue
        for name in listdir(sub_path):
            if name.endswith(".parquet") and f"{stage_name}/{sub}/{name}" not in referenced:
                remove(join(sub_path, name))
