import os

# Nothing in the test run may phone home, and a busy CI machine needs longer than 20 s for the ephemeral
# server's first database migration.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
