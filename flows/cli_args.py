"""Argument types and flags shared by the ``slimflow`` command modules (``flows/cli*.py``)."""

from __future__ import annotations

import argparse


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (a batch of 0 lines would never be sent)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def no_wait_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--no-wait", action="store_true",
                    help="when another run is writing the run directory, stop at once (exit 1, naming it) "
                    "instead of waiting for it to finish")
