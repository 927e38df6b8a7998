import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from slimflow.flows.cli_ops import add_ops_commands
from slimflow.flows.config import Config
from slimflow.flows.deploy import DeployError, build_deployments, register_deployments
from slimflow.flows.pipeline import PIPELINE, STAGE_FLOWS, run_flow

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path, runner=None) -> Config:
    return Config(name="dep", data={"train": str(tmp_path / "train.csv")}, runner=runner or {})


def _entrypoint(flow) -> str:
    return f"slimflow.flows.pipeline.{flow.fn.__name__}"


def test_deployments_carry_the_config_and_follow_the_pipeline(tmp_path):
    cfg = _config(tmp_path, {"kind": "dask", "workers": 2})
    deps = build_deployments(cfg, str(tmp_path / "run"), "nightly", cron="0 3 * * *", timezone="Europe/Berlin")
    by_flow = {d.flow_name: d for d in deps}
    assert set(by_flow) == {run_flow.name, *(f.name for f in STAGE_FLOWS.values())}
    assert all(d.name == "nightly" for d in by_flow.values())
    pipe = by_flow[run_flow.name]
    assert pipe.entrypoint == _entrypoint(run_flow)
    assert pipe.parameters == {"config": cfg.model_dump(mode="json"), "out": str(tmp_path / "run")}
    assert Config.model_validate(pipe.parameters["config"]) == cfg  # what the UI form submits comes back whole
    (schedule,) = pipe.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    # the UI form is generated from this schema: every config section, the runner included
    assert {"config", "out", "until"} <= set(pipe._parameter_openapi_schema.properties)
    assert "RunnerConfig" in pipe._parameter_openapi_schema.definitions
    for stage, stage_flow in STAGE_FLOWS.items():
        d = by_flow[stage_flow.name]
        assert d.entrypoint == _entrypoint(stage_flow) and not d.schedules
        assert f"stage:{stage}" in d.tags and "until" not in d.parameters
    # one run of each deployment at a time; across deployments the run-directory lock keeps them apart
    assert all(d.concurrency_limit == 1 for d in deps)


def test_until_must_name_a_stage(tmp_path):
    with pytest.raises(DeployError, match="choose one of: " + ", ".join(PIPELINE)):
        build_deployments(_config(tmp_path), str(tmp_path), "x", until="labelx")
    (pipe, *_) = build_deployments(_config(tmp_path), str(tmp_path), "x", until=PIPELINE[0])
    assert pipe.parameters["until"] == PIPELINE[0]


def test_register_with_a_process_pool_is_idempotent(tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate

    deps = build_deployments(_config(tmp_path), str(tmp_path / "run"), "pool-test")
    first = register_deployments(deps, "slimflow-test-pool")
    assert register_deployments(deps, "slimflow-test-pool") == first  # re-registering updates in place
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("slimflow-test-pool").type == "process"
        pipe = client.read_deployment_by_name(f"{run_flow.name}/pool-test")
        assert pipe.work_pool_name == "slimflow-test-pool" and pipe.entrypoint == _entrypoint(run_flow)
        assert pipe.global_concurrency_limit.limit == 1
        client.create_work_pool(WorkPoolCreate(name="not-a-process-pool", type="kubernetes"))
    with pytest.raises(DeployError, match="'kubernetes' pool"):
        register_deployments(deps, "not-a-process-pool")


def test_prefect_yaml_declares_the_same_deployments(tmp_path):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = spec["deployments"]
    assert {d["entrypoint"] for d in deps} == {_entrypoint(run_flow), *map(_entrypoint, STAGE_FLOWS.values())}, \
        "prefect.yaml lists a deployment per flow in slimflow.flows.pipeline: add the new stage's flow there"
    for d in deps:
        Config.model_validate(d["parameters"]["config"])

    # `prefect deploy` itself, against the test server, from a copy (it may write into its folder)
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="slimflow", type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    shutil.copy(REPO / "prefect.yaml", tmp_path / "prefect.yaml")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HOME": str(tmp_path)}
    done = subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        pipe = client.read_deployment_by_name(f"{run_flow.name}/demo")
        assert pipe.work_pool_name == "slimflow" and pipe.parameters["out"] == "runs/demo"
        assert [s.active for s in pipe.schedules] == [False]
        assert pipe.global_concurrency_limit.limit == 1  # a cron run never overlaps the previous one
        for stage_flow in STAGE_FLOWS.values():
            dep = client.read_deployment_by_name(f"{stage_flow.name}/demo")
            assert dep.entrypoint == _entrypoint(stage_flow) and dep.global_concurrency_limit.limit == 1


def test_deploy_without_a_server_says_how_to_start_one(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_ops_commands(p.add_subparsers(dest="command"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: {tmp_path / 'train.csv'}}}\n")
    args = p.parse_args(["deploy", str(cfg), "--cron", "0 3 * * *"])
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(DeployError, match="prefect server start"):
            args.func(args)
