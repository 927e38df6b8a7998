"""`slimflow deploy` against real Prefect servers (SQLite, and PostgreSQL as in docker/compose.yaml): serve the
deployments from a subprocess, start a run through the API as the UI does, and check what the UI would show.
Every wait polls the API with a deadline."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from datetime import datetime, timezone

import pytest
from ops_servers import entrypoint, postgres_database, prefect_server, stop, wait_until, write_tiny_config
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort, TaskRunSort
from prefect.exceptions import ObjectNotFound
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import read_manifest

NAME = "ops-test"
CRON = "0 3 * * *"
# ingest -> segment -> augment is the cheap part of the pipeline: enough to see tasks per stage and shard.
UNTIL = "augment"
# The sync client sends `limit: null, sort: null` unless given, which Prefect 3.8.8's server rejects (422).
_PAGE = dict(limit=200, sort=FlowRunSort.ID_DESC)



@contextlib.contextmanager
def _client(server):
    """A Prefect client of ``server`` (this process's settings may point at the flow tests' harness)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module", params=["sqlite-serve", "postgres-worker"])
def served(request, tmp_path_factory):
    """A Prefect server and the tiny config's deployments, two ways: on SQLite, served by `slimflow deploy`;
    on PostgreSQL, registered with a process pool and run by a worker, as docker/compose.yaml does it."""
    backend, mode = request.param.split("-")
    tmp = tmp_path_factory.mktemp(f"ops-{backend}")
    database = (postgres_database() if backend == "postgres"
                else contextlib.nullcontext(f"sqlite+aiosqlite:///{tmp / 'prefect.db'}"))
    with database as db_url, prefect_server(tmp / "prefect-home", db_url) as server:
        cfg = write_tiny_config(tmp / "data", NAME)
        out = tmp / "run"
        log = tmp / f"{mode}.log"
        # Runner and worker poll for work every second instead of 10, so a started run begins at once.
        env = {**server.env, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}
        if mode == "serve":
            cmd = ["slimflow", "deploy", str(cfg), "--out", str(out), "--name", NAME, "--cron", CRON]
        else:
            # the compose `register` service (one-shot), then the `worker` service
            env.update(SLIMFLOW_CONFIG=str(cfg), SLIMFLOW_OUT=str(out), SLIMFLOW_NAME=NAME, SLIMFLOW_CRON=CRON,
                       SLIMFLOW_POOL="slimflow-test")
            done = subprocess.run(entrypoint("register"), env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            cmd = entrypoint("worker")
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            with _client(server) as client:
                from slimflow.flows.pipeline import STAGE_FLOWS

                def ready():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{cmd} exited with {proc.returncode}:\n{log.read_text()}")
                    try:
                        for name in (f"slimflow-run/{NAME}", *(f"{s}/{NAME}" for s in STAGE_FLOWS)):
                            client.read_deployment_by_name(name)
                    except ObjectNotFound:
                        return False
                    return True

                wait_until(ready, 120, "the deployments")
            yield server, out, log
        finally:
            stop(proc)


@pytest.mark.slow
def test_ui_run_of_the_pipeline_deployment(served):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
    )
    from prefect.deployments import run_deployment

    server, out, log = served
    with _client(server) as client:
        # What the UI's "Quick run" does: a flow run of the deployment (its default parameters, plus ours).
        run = run_deployment(f"slimflow-run/{NAME}", parameters={"until": UNTIL}, timeout=0)

        def finished():
            r = client.read_flow_run(run.id)
            return r if r.state and r.state.is_final() else None

        done = wait_until(finished, 300, f"flow run {run.id} to finish (serve log: {log})")
        assert done.state.is_completed(), f"{done.state}\n{log.read_text()[-4000:]}"

        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])), **_PAGE)
        by_flow = {client.read_flow(c.flow_id).name: c for c in children}
        assert set(by_flow) == {"ingest", "segment", "augment"}
        assert all(c.state.is_completed() for c in children)

        # One task run per stage and shard, named after them (the UI's task list); the server records task
        # runs from events, so wait for them rather than assume they are there.
        layout = RunLayout(str(out))
        expected = {f"{stage}-{ref.shard_id}" for stage in ("segment", "augment")
                    for ref in read_manifest(layout.stage_dir(stage)).shards}
        assert len(expected) >= 5

        def task_names():
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[c.id for c in children])), limit=200, sort=TaskRunSort.ID_DESC)
            names = {t.name for t in runs if t.state and t.state.is_completed()}
            return names if expected <= names else None

        names = wait_until(task_names, 60, "the task runs of every shard")
        assert any(n.startswith("ingest") for n in names) and any(n.startswith("pos-table") for n in names)

        # Artifacts the run published (the report's, once the report stage publishes `slimflow-report`):
        # whatever exists belongs to this run's flow runs and has a valid key.
        ours = [run.id, *(c.id for c in children)]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(), flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ours)),
            task_run_filter=TaskRunFilter(), limit=200, offset=0, sort=ArtifactSort.CREATED_DESC)
        for a in artifacts:
            assert a.flow_run_id in ours
            assert a.key is None or re.fullmatch(r"[a-z0-9-]+", a.key), a.key

    report = json.loads((out / "report.json").read_text())
    assert report["rows"]["augmented"] > 0 and report["tasks"]["executed"] >= 5


@pytest.mark.slow
def test_cron_deployment_shows_its_next_runs(served):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    server, _, _ = served
    with _client(server) as client:
        dep = client.read_deployment_by_name(f"slimflow-run/{NAME}")
        assert [s.schedule.cron for s in dep.schedules] == [CRON]
        assert dep.parameters["config"]["name"] == NAME and "until" not in dep.parameters
        # The UI's parameter form is generated from this schema: the pydantic config, runner section included.
        schema = dep.parameter_openapi_schema
        assert "config" in schema["properties"] and "RunnerConfig" in json.dumps(schema)

        for stage in ("ingest", "segment", "augment"):
            stage_dep = client.read_deployment_by_name(f"{stage}/{NAME}")
            assert not stage_dep.schedules and f"stage:{stage}" in stage_dep.tags

        def scheduled():
            if "Can't evaluate bulk DML statement" in server.log.read_text(errors="replace"):
                # Prefect 3.8.8's scheduler breaks on SQLAlchemy 2.1 (executemany upsert of the new runs).
                pytest.fail(f"the server's scheduler failed (see {server.log}): install sqlalchemy<2.1")
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))), **_PAGE)

        runs = wait_until(scheduled, 90, "the scheduler to create the cron deployment's next runs")
        now = datetime.now(timezone.utc)
        for r in runs:
            t = r.expected_start_time
            assert t > now and (t.hour, t.minute, t.second) == (3, 0, 0), t
