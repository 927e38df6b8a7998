import os

# Nothing in the test run may phone home, and a busy CI machine needs longer than 20 s for the ephemeral
# server's first database migration.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# Under pytest-xdist (`make test` runs two workers), each worker gets its share of the cores for torch / OpenMP,
# so the workers do not oversubscribe the machine; code that sets its own thread count (teacher.threads) still does.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _share = str(max(1, (os.cpu_count() or 1) // _workers))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _share)
