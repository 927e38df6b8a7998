"""`slimflow rerun --stage label --shard ONE`: exactly that shard's label task, then only what reads its output."""

import pytest

from flows.config import load_config
from flows.pipeline import rerun_stages, run_flow
from storage.layout import RunLayout
from storage.manifest import read_manifest
from tests.flows.test_faults import _chain_config


def _hashes(out, stage):
    return {r.shard_id: r.sha256 for r in read_manifest(RunLayout(out).stage_dir(stage)).shards}


@pytest.mark.slow
def test_rerun_one_label_shard_then_only_its_dependents(tmp_path):
    config = load_config(_chain_config(tmp_path, n=120))
    out = str(tmp_path / "run")
    run_flow(config=config, out=out, until="train")
    labels = _hashes(out, "label")
    shard = sorted(labels)[0]

    rep = rerun_stages(out, "label", [shard])
    by = rep["tasks"]["by_stage"]
    assert by["label"] == {"executed": 1, "cached": len(labels) - 1}
    # the vocabularies (one per token unit) and the baselines read no label shard: cached; the distilled
    # students read it: rerun
    units = {config.student.unit(k, config.lang) for k in config.students}
    assert by["train"] == {"executed": len(config.students), "cached": len(units) + len(config.students)}
    assert _hashes(out, "label") == labels  # the other shards (and this one, recomputed) keep their hashes
    assert set(by) == {"label", "train"}
