"""Task runners: where a stage's shard tasks execute, chosen by the config's ``runner`` section.

A stage flow is written once; :func:`with_runner` gives it a thread pool, a process pool or a Dask cluster at
call time (``flow.with_options(task_runner=...)``). The runner changes speed only: every task reads and writes
shards through ``storage/``, so the outputs are byte-identical whichever runner ran them.

Dask workers run the tasks in other processes, possibly on other machines: they need the run directory at the
same local path on each (a shared filesystem or mounted volume), the same slimflow version and the same model
cache (docs/operations.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from slimflow.flows.config import RunnerConfig

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.task_runners import TaskRunner

_DASK_MISSING = ("runner.kind: dask needs prefect-dask: `pip install 'slimflow[dask]'` "
                 "(or set runner.kind: thread | process)")


def _dask_runner_class():
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:
        raise RuntimeError(_DASK_MISSING) from e
    return DaskTaskRunner


def _local_cluster_kwargs(runner: RunnerConfig) -> dict:
    kwargs = {"threads_per_worker": runner.threads_per_worker,
              # no dashboard: it needs bokeh, and a fixed port (8787) clashes between concurrent runs
              "dashboard_address": None}
    if runner.workers is not None:
        kwargs["n_workers"] = runner.workers
    if runner.gpu:
        # Each local worker advertises one GPU, so GPU tasks still find a worker; set `workers` to the number
        # of GPUs (and pin devices with CUDA_VISIBLE_DEVICES / dask-cuda for more than one).
        kwargs["resources"] = {"GPU": 1}
    return kwargs


def task_runner(runner: RunnerConfig) -> TaskRunner:
    """A fresh, unstarted Prefect task runner for ``runner`` (each flow run starts and stops its own)."""
    if runner.kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "dask":
        dask_runner = _dask_runner_class()
        if runner.address:
            return dask_runner(address=runner.address)
        return dask_runner(cluster_kwargs=_local_cluster_kwargs(runner))
    raise AssertionError(f"unhandled runner kind {runner.kind!r}")  # the config's Literal rules this out


def with_runner(flow: Flow, runner: RunnerConfig) -> Flow:
    """``flow`` with its shard tasks on ``runner``: the one place a stage flow gets its task runner."""
    return flow.with_options(task_runner=task_runner(runner))


@contextlib.contextmanager
def shared_cluster(runner: RunnerConfig) -> Iterator[RunnerConfig]:
    """For ``kind: dask`` without an address: start one local cluster for a whole run and yield a runner
    config pointing at it, so the stages share warm workers instead of starting a cluster each (~seconds per
    stage, plus each worker importing Prefect). Any other runner is yielded unchanged."""
    if runner.kind != "dask" or runner.address:
        yield runner
        return
    _dask_runner_class()  # the clear error first, not distributed's ImportError
    from distributed import LocalCluster

    with LocalCluster(**_local_cluster_kwargs(runner)) as cluster:
        yield runner.model_copy(update={"address": cluster.scheduler_address})


@contextlib.contextmanager
def gpu_tasks(runner: RunnerConfig) -> Iterator[None]:
    """Wrap the submission of GPU tasks (the teacher's embedding, fine-tuning and scoring, labelling, and its
    timing in the evaluate stage): on Dask with ``runner.gpu`` set, each task asks for that much of the workers'
    ``GPU`` resource, so no worker runs more GPU tasks than it has GPUs. A no-op for the other runners (they
    share one machine's GPUs through ``teacher.device``)."""
    if runner.kind != "dask" or not runner.gpu:
        yield
        return
    import dask

    with dask.annotate(resources={"GPU": runner.gpu}):
        yield
