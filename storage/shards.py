"""Parquet shards: written whole and atomically, named by their content hash, verified on read."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from slimflow.storage.fs import atomic_write_bytes, exists, join, read_bytes
from slimflow.storage.hashing import sha256_bytes


class CorruptShardError(RuntimeError):
    """A shard's bytes no longer match the hash its manifest (or cache entry) recorded."""


@dataclass(frozen=True)
class ShardRef:
    """A committed shard: where it is (relative to the run directory) and what it must hash to."""

    split: str
    index: int
    path: str
    rows: int
    bytes: int
    sha256: str
    inputs: tuple[str, ...] = field(default=())  # sha256 of the shards it was computed from

    @property
    def shard_id(self) -> str:
        return f"{self.split}-{self.index:05d}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = list(self.inputs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShardRef:
        return cls(**{**d, "inputs": tuple(d.get("inputs", ()))})


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # zstd: ~2x smaller than snappy on token lists at similar speed; no statistics on list columns
    # keeps files byte-identical for identical tables (no timestamps are written by pyarrow).
    pq.write_table(table, buf, compression="zstd", row_group_size=64_000)
    return buf.getvalue()


def write_shard(table: pa.Table, run_dir: str, rel_dir: str, split: str, index: int,
                schema: pa.Schema, inputs: tuple[str, ...] = ()) -> ShardRef:
    """Cast ``table`` to ``schema`` and write it as ``rel_dir/{split}-{index}-{sha12}.parquet``.

    The name carries the content hash, so a new version never overwrites the old one: the old file stays
    valid until a new manifest points elsewhere.
    """
    table = table.select(schema.names).cast(schema)
    data = table_to_parquet_bytes(table)
    digest = sha256_bytes(data)
    rel = f"{rel_dir}/{split}-{index:05d}-{digest[:12]}.parquet"
    target = join(run_dir, rel)
    atomic_write_bytes(target, data)  # always: an existing file of that name may be a truncated copy
    return ShardRef(split=split, index=index, path=rel, rows=table.num_rows, bytes=len(data), sha256=digest,
                    inputs=tuple(inputs))


def shard_ok(run_dir: str, ref: ShardRef) -> bool:
    """True when the shard exists and its bytes hash to ``ref.sha256``."""
    path = join(run_dir, ref.path)
    if not exists(path):
        return False
    return sha256_bytes(read_bytes(path)) == ref.sha256


def read_shard(run_dir: str, ref: ShardRef, columns: list[str] | None = None) -> pa.Table:
    """Read a shard, refusing one whose bytes do not match its recorded hash."""
    path = join(run_dir, ref.path)
    try:
        data = read_bytes(path)
    except FileNotFoundError as e:
        raise CorruptShardError(f"shard {ref.path} is missing; rerun the stage that writes it") from e
    if sha256_bytes(data) != ref.sha256:
        raise CorruptShardError(
            f"shard {ref.path} does not match its recorded sha256 {ref.sha256[:12]} (truncated or edited "
            "on disk); rerun the stage to recompute it"
        )
    return pq.read_table(io.BytesIO(data), columns=columns)
