#!/bin/sh
# One image, four roles (docker/compose.yaml): the Prefect server, a process-pool worker, the one-shot
# registration of slimflow's deployments, or any command. tests/ops runs these same lines outside a container.
set -eu

POOL="${SLIMFLOW_POOL:-slimflow}"

case "${1:-}" in
server)
    shift
    # PREFECT_API_DATABASE_CONNECTION_URL picks the database (compose: PostgreSQL; unset: SQLite in PREFECT_HOME).
    exec prefect server start --host "${SLIMFLOW_SERVER_HOST:-0.0.0.0}" --port "${SLIMFLOW_SERVER_PORT:-4200}" "$@"
    ;;
worker)
    shift
    # --type process creates the pool when the registration has not yet; runs execute in this container.
    exec prefect worker start --pool "$POOL" --type process "$@"
    ;;
register)
    shift
    config="${SLIMFLOW_CONFIG:-}"
    if [ -z "$config" ]; then
        # No config given: the bundled demo (exports the Chinese reviews once, writes its config.yaml).
        demo="${SLIMFLOW_RUNS:-/srv/runs}/demo-quick"
        config=$(python -c 'import sys; from slimflow.flows.demo import write_demo_config; print(write_demo_config(sys.argv[1], "quick"))' "$demo")
        SLIMFLOW_OUT="${SLIMFLOW_OUT:-$demo}"
    fi
    set -- "$config" --pool "$POOL" "$@"
    [ -n "${SLIMFLOW_OUT:-}" ] && set -- "$@" --out "$SLIMFLOW_OUT"
    [ -n "${SLIMFLOW_NAME:-}" ] && set -- "$@" --name "$SLIMFLOW_NAME"
    [ -n "${SLIMFLOW_CRON:-}" ] && set -- "$@" --cron "$SLIMFLOW_CRON"
    exec slimflow deploy "$@"
    ;;
*)
    exec "$@"
    ;;
esac
