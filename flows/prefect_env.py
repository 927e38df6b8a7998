"""The environment of the Prefect server slimflow starts for a run (the temporary one, when no PREFECT_API_URL
names a server): set before it starts by every entry point (the CLI, ``slimflow.run``, ``run_stages``), never
over what the user set."""

from __future__ import annotations

import os


def prefect_env() -> None:
    # The temporary server's first start runs its database migrations, which can exceed Prefect's default 20 s on
    # a busy 2-core machine; and nothing here may phone home (offline, it logs an ERROR every 10 minutes trying).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
