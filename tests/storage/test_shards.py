import pyarrow as pa
import pytest
from slimflow.storage.schema import INGEST
from slimflow.storage.shards import CorruptShardError, ShardRef, read_shard, shard_ok, write_shard


def _table(n):
    return pa.table({"id": [f"{i:016x}" for i in range(n)], "text": [f"t{i}" for i in range(n)],
                     "label": ["a"] * n, "source_file": ["f"] * n, "source_row": list(range(1, n + 1))})


@pytest.mark.parametrize("n", [0, 1, 257])
def test_roundtrip_and_content_address(tmp_path, n):
    ref = write_shard(_table(n), str(tmp_path), "ingest/train", "train", 3, INGEST)
    assert ref.rows == n and ref.shard_id == "train-00003"
    assert ref.path.endswith(f"{ref.sha256[:12]}.parquet")
    assert read_shard(str(tmp_path), ref).to_pylist() == _table(n).to_pylist()
    again = write_shard(_table(n), str(tmp_path), "ingest/train", "train", 3, INGEST)
    assert again == ref  # deterministic bytes: same rows, same hash, same file


def test_truncated_shard_is_detected(tmp_path):
    ref = write_shard(_table(50), str(tmp_path), "ingest/train", "train", 0, INGEST)
    path = tmp_path / ref.path
    path.write_bytes(path.read_bytes()[:-10])
    assert not shard_ok(str(tmp_path), ref)
    with pytest.raises(CorruptShardError, match="does not match its recorded sha256"):
        read_shard(str(tmp_path), ref)


def test_missing_shard_is_detected(tmp_path):
    ref = ShardRef("train", 0, "ingest/train/nope.parquet", 1, 1, "0" * 64)
    with pytest.raises(CorruptShardError, match="missing"):
        read_shard(str(tmp_path), ref)


def test_schema_is_enforced(tmp_path):
    bad = _table(2).drop_columns(["text"])
    with pytest.raises(KeyError):
        write_shard(bad, str(tmp_path), "ingest/train", "train", 0, INGEST)
