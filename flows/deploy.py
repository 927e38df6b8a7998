"""Deployments: the pipeline flow and every stage flow, with a run's config as their default parameters.

``serve_deployments`` serves them from this process (``prefect.serve``): a person starts a run from the UI
and edits the config in its form, which Prefect generates from the pydantic ``Config`` in the flows'
signatures. ``register_deployments`` registers the same deployments with a process work pool instead, for a
``prefect worker`` to run (what ``docker/compose.yaml`` does); ``prefect.yaml`` declares them for
``prefect deploy``. The stage list comes from ``slimflow.flows.pipeline`` (``run_flow``, ``STAGE_FLOWS``), so stages
added there are deployed without a change here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from slimflow.flows.config import Config

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

TAGS = ["slimflow"]


class DeployError(RuntimeError):
    """The deployments cannot be served or registered: the message says what to set up."""


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("deployments need a Prefect server the UI can reach: start one with `prefect server start` "
                          "and point slimflow at it, e.g. `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    return url


def _check_server() -> str:
    from prefect.client.orchestration import get_client

    url = _api_url()
    with get_client(sync_client=True) as client:
        err = client.api_healthcheck()
    if err is not None:
        raise DeployError(f"the Prefect server at {url} does not answer ({err}); start it "
                          "(`prefect server start`) or fix PREFECT_API_URL")
    return url


def deployment_parameters(config: Config, out: str, until: str | None = None) -> dict:
    """The pipeline deployment's default parameters (the stage deployments take the same minus ``until``)."""
    params = {"config": config.model_dump(mode="json"), "out": out}
    if until is not None:
        params["until"] = until
    return params


def build_deployments(config: Config, out: str, name: str, cron: str | None = None, timezone: str | None = None,
                      until: str | None = None) -> list[RunnerDeployment]:
    """The pipeline deployment (``slimflow-run/NAME``, on ``cron`` when given) and one per stage flow
    (``STAGE/NAME``, started by hand), all with ``config`` and ``out`` as default parameters."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType
    from slimflow.flows.pipeline import PIPELINE, STAGE_FLOWS, run_flow

    if until is not None and until not in PIPELINE:
        raise DeployError(f"--until {until!r} is not a stage; choose one of: {', '.join(PIPELINE)}")
    # Module entrypoints (slimflow.flows.pipeline.run_flow): the run, served or on a worker, imports the flow from the
    # installed slimflow in any working directory, where a file path would tie it to this checkout. The task
    # runner comes from the run's `config.runner` when the pipeline calls each stage (flows/runners.py).
    # concurrency_limit 1: a deployment's runs are queued (Prefect's ENQUEUE), never two at once; a cron run
    # firing while the last one still runs waits for it. That alone cannot keep the pipeline and a stage
    # deployment (or a `slimflow run` in a shell) off one run directory: the run-directory lock (storage/lock.py),
    # which every stage flow takes, does.
    common = dict(name=name, entrypoint_type=EntrypointType.MODULE_PATH, concurrency_limit=1)
    deployments = [run_flow.to_deployment(
        schedules=[Cron(cron, timezone=timezone)] if cron else None,
        parameters=deployment_parameters(config, out, until), tags=TAGS,
        description=f"The slimflow pipeline ({' -> '.join(PIPELINE)}) on config {config.name!r}; "
        "`until` stops after that stage.", **common)]
    for stage, stage_flow in STAGE_FLOWS.items():
        deployments.append(stage_flow.to_deployment(
            parameters=deployment_parameters(config, out), tags=[*TAGS, f"stage:{stage}"],
            description=f"Only the {stage} stage of config {config.name!r} (the stage before it must be done).",
            **common))
    return deployments


def serve_deployments(deployments: list[RunnerDeployment], limit: int | None = None) -> None:
    """Serve ``deployments`` from this process until interrupted (Ctrl-C, SIGTERM); each run is a subprocess
    that imports its flow by entrypoint."""
    from prefect import serve

    _check_server()
    serve(*deployments, limit=limit)


def register_deployments(deployments: list[RunnerDeployment], pool: str) -> list:
    """Register ``deployments`` with the process work pool ``pool`` (created when missing) and return their ids;
    a ``prefect worker start --pool POOL`` on a machine with slimflow installed runs them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    _check_server()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            if (kind := client.read_work_pool(pool).type) != "process":
                raise DeployError(f"work pool {pool!r} is a {kind!r} pool; slimflow's deployments need a "
                                  "process pool: pass another --pool name") from None
    # Each deployment is applied directly rather than through `prefect.deploy`, whose worker query sends
    # `limit: null` that Prefect 3.8.8's own server rejects (422). Module entrypoints need no code storage.
    return [d.apply(work_pool_name=pool) for d in deployments]


def default_out(config: Config, out: str | None) -> str:
    # Absolute: the flow runs in another process (and, with a worker, maybe another working directory).
    return os.path.abspath(out or os.path.join("runs", config.name))
