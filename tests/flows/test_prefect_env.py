"""The temporary Prefect server's environment: set by every entry point before the server starts, never over the
user's own settings."""

from __future__ import annotations

import os

import pytest
from slimflow.flows.prefect_env import prefect_env

KEYS = ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")


def test_defaults_are_set_and_the_users_own_are_kept(monkeypatch):
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    prefect_env()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY"] == "false"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "60"


@pytest.mark.parametrize("entry", ["api", "run_stages"])
def test_the_python_entry_points_set_them_before_any_flow_runs(monkeypatch, tmp_path, entry):
    from slimflow.flows import pipeline
    from slimflow.flows.config import Config

    import slimflow.api as api

    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    seen = {}

    class Started(Exception):
        pass

    def first_flow(*_, **__):  # stands in for the first flow call, where Prefect starts its server
        seen.update({k: os.environ.get(k) for k in KEYS})
        raise Started

    config = Config.model_validate({"name": "t", "data": {"train": str(tmp_path / "train.csv")}})
    if entry == "api":
        monkeypatch.setattr(api, "run_flow", first_flow)
        with pytest.raises(Started):
            api.run(config, tmp_path / "run")
    else:
        monkeypatch.setattr(pipeline, "_run_stages", first_flow)
        with pytest.raises(Started):
            pipeline.run_stages(config, str(tmp_path / "run"), ["ingest"])
    assert seen["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
