"""Speed timings run in a fresh process, except where no child may be started (a daemonic Dask worker)."""

import multiprocessing
import os

from slimflow.tasks.evaluate import isolated


def test_isolated_runs_in_another_process_and_returns_the_result():
    assert isolated(os.getpid) != os.getpid()
    assert isolated(divmod, 17, 5) == (3, 2)


def _in_daemon(queue):
    queue.put((os.getpid(), isolated(os.getpid)))


def test_isolated_runs_inline_in_a_daemonic_process():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_in_daemon, args=(queue,), daemon=True)
    p.start()
    own, got = queue.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0 and got == own
