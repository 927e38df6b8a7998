"""What the console shows while a ``slimflow`` command runs Prefect, and the process defaults set before it starts.

A failing stage prints one line (issue 12): Prefect's flow- and task-run failure records stay in its API log;
``--debug`` shows them and the traceback, ``--verbose`` Prefect's INFO lines. Shared by every command module
(``flows/cli*.py``), which is why it is not in ``flows/cli.py``: the subcommand modules import it, not the CLI.
"""

from __future__ import annotations

import logging
import os

from slimflow.flows.prefect_env import prefect_env

DEBUG = False  # --debug: tracebacks, Prefect's included
VERBOSE = False  # --verbose: Prefect's INFO lines (server start, each flow and task run) on the console


def configure(debug: bool, verbose: bool) -> None:
    """Set from the command line's --debug / --verbose before any command runs."""
    global DEBUG, VERBOSE
    DEBUG, VERBOSE = debug, verbose


def prefect_defaults() -> None:
    prefect_env()
    # transformers' per-load "Loading weights" bars, one per shard task, drown the stage progress bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_run_failures()
    # torch.onnx warns about torchvision ops on every export; the students use none of them.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


class _NoRunFailures(logging.Filter):
    """Keeps Prefect's flow- and task-run errors (and their tracebacks) off the console: the CLI reports the
    failure in one line (issue 12). They still reach the Prefect server's log (its API handler), and --debug
    shows them here too."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Progress bars say what runs; Prefect's INFO lines (a temporary server started, each run begun and
        # finished) are for the UI and --verbose. The server's log keeps them either way.
        if record.levelno < logging.WARNING and not VERBOSE:
            return False
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        # A failed flow run says so at INFO ("Finished in state Failed(...)"), with the whole message again.
        return record.levelno < logging.ERROR and not record.getMessage().startswith(("Finished in state Failed",
                                                                                      "Finished in state Crashed"))


def _quiet_run_failures() -> None:
    if DEBUG:
        return
    import prefect.main  # noqa: F401  (sets up Prefect's logging: its console handler sits on the root logger)

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, _NoRunFailures)
                                                                  for f in handler.filters):
            handler.addFilter(_NoRunFailures())
