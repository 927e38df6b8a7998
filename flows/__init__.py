"""slimflow's Prefect flows, the pydantic config and the ``slimflow`` CLI."""
