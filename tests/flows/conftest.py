import contextlib

import pytest


@contextlib.contextmanager
def _postgres_server(startup_timeout: int):
    """A real Prefect server (a subprocess, as `prefect_test_harness` starts) on a throwaway PostgreSQL.

    SQLite takes one writer at a time: with the ephemeral server's event services (task-run recorder, event
    persister) writing beside the API, a request can sit out SQLite's 60 s busy timeout, and the suite spent
    minutes in such waits. PostgreSQL is also what a production server runs on."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    from tests.ops.ops_servers import free_port, postgres_database

    with postgres_database() as url, temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: url}):
        server = SubprocessASGIServer(port=free_port())
        # As the harness does: code that asks for "the" ephemeral server finds this one instead of starting one.
        SubprocessASGIServer._instances[None] = server
        server.start(timeout=startup_timeout)
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}), \
                    _temporary_global_settings_context(get_settings_context()):
                try:
                    yield
                finally:
                    # logs and events still queued go out while the server can take them (else the workers
                    # retry a dead address at exit)
                    APILogWorker.drain_all(timeout=60)
                    EventsWorker.drain_all(timeout=60)
        finally:
            server.stop()
            SubprocessASGIServer._instances.pop(None, None)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One real, temporary Prefect server for every flow test in the session: on PostgreSQL where its server
    binaries are installed (`make test` installs them: scripts/ci-postgres.sh), else Prefect's SQLite harness."""
    from prefect.testing.utilities import prefect_test_harness

    from tests.ops.ops_servers import _pg_bin

    harness = _postgres_server(180) if _pg_bin() else prefect_test_harness(server_startup_timeout=180)
    with harness:
        yield
