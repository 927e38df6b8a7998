"""The stages described once (flows/stage_specs.py) and run by one runner (flows/stages.py:run_stage)."""

import pytest
from slimflow.flows.config import Config
from slimflow.flows.pipeline import STAGE_FLOWS
from slimflow.flows.stage_specs import STAGE_SPECS
from slimflow.flows.stages import Output, Stage, StageOrderError, run_stage
from slimflow.storage.hashing import fingerprint
from slimflow.storage.layout import STAGES, RunLayout
from slimflow.storage.manifest import Manifest, commit_manifest, read_manifest
from slimflow.tasks.code_version import code_version


def test_every_stage_is_described_once_in_pipeline_order():
    assert tuple(s.name for s in STAGE_SPECS) == STAGES
    for spec in STAGE_SPECS:
        assert set(spec.keyed_by) <= set(spec.reads)  # only what it reads can key it
        assert all(STAGES.index(r) < STAGES.index(spec.name) for r in spec.reads)
        flow = STAGE_FLOWS[spec.name]
        # prefect.yaml's entrypoints (slimflow.flows.pipeline.<stage>_flow) and the UI's flow names
        assert flow.name == spec.name and flow.fn.__name__ == f"{spec.name}_flow"
        assert flow.flow_run_name == f"{spec.name}-{{config.name}}" and flow.description == spec.doc


def _upstream(out: str) -> Manifest:
    m = Manifest("ingest", "fp-ingest", {}, "v0", [], extra={"labels": ["neg", "pos"]})
    commit_manifest(RunLayout(out).stage_dir("ingest"), m)
    return m


def _stage(**made) -> Stage:
    def plan(run):
        assert run.inputs["ingest"].extra["labels"] == ["neg", "pos"] and run.rerun == {"stage": "segment"}
        run.result.cached += 2  # what task groups count
        return Output(**made)

    return Stage("segment", "a test stage", reads=("ingest",), keyed_by=("ingest",), tasks=(), plan=plan)


@pytest.mark.parametrize("params", [{"lang": "zh"}, {}])
def test_run_stage_commits_the_fingerprint_chain_and_the_result(tmp_path, params):
    out = str(tmp_path)
    up = _upstream(out)
    res = run_stage(_stage(params=params, extra={"n": 1}, rows={"train": 3}, summary={"words": 5}),
                    Config(name="t", data={"train": "t.csv"}), out, rerun={"stage": "segment"})
    m = read_manifest(RunLayout(out).stage_dir("segment"))
    # the upstream fingerprints, then the params when the stage has any, then the code version
    key = [up.fingerprint, params] if params else [up.fingerprint]
    assert m.fingerprint == fingerprint("segment", *key, code_version())
    assert (m.params, m.extra, m.code_version, m.shards) == (params, {"n": 1}, code_version(), [])
    assert res["stage"] == "segment" and res["cached"] == 2 and res["executed"] == 0
    assert res["rows"] == {"train": 3} and res["words"] == 5


def test_sources_key_the_output_before_its_params(tmp_path):
    out = str(tmp_path)
    up = _upstream(out)
    run_stage(_stage(params={"a": 1}, sources={"train": "sha"}), Config(name="t", data={"train": "t.csv"}), out,
              rerun={"stage": "segment"})
    m = read_manifest(RunLayout(out).stage_dir("segment"))
    assert m.fingerprint == fingerprint("segment", up.fingerprint, {"train": "sha"}, {"a": 1}, code_version())


def test_a_stage_whose_input_is_not_committed_is_refused_before_it_runs(tmp_path):
    with pytest.raises(StageOrderError, match="segment needs the ingest stage .* has not completed"):
        run_stage(_stage(params={}), Config(name="t", data={"train": "t.csv"}), str(tmp_path))
    assert read_manifest(RunLayout(str(tmp_path)).stage_dir("segment")) is None
