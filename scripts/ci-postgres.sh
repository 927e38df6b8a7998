#!/usr/bin/env bash
# CI: install Debian's PostgreSQL server binaries for tests/ops (a real PostgreSQL behind the Prefect server).
# Idempotent: does nothing when initdb is already there. The tests start and stop their own throwaway cluster
# (initdb into a temp folder, a free loopback port); the package's system service is not used.
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ci-postgres.sh: PostgreSQL is missing and this is not root; install it with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y postgresql" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
# postgresql-contrib (pulled in by postgresql) carries pg_trgm, which Prefect needs
apt-get install -y --no-install-recommends postgresql postgresql-contrib
# A cluster Debian may start on 5432 does not matter: the tests use their own on a free port.
