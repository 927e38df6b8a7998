import csv

import pytest
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from slimflow.flows.config import Config, ConfigError, RunnerConfig, load_config
from slimflow.flows.pipeline import STAGE_FLOWS
from slimflow.flows.runners import gpu_tasks, shared_cluster, task_runner, with_runner
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import read_manifest
from slimflow.tasks.datasets import load_rows

STAGES = ("ingest", "segment", "augment")  # the CPU stages: enough to move every kind of shard task


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory) -> str:
    # One input file for every run: ingest records where its rows came from in the shards' metadata.
    rows = load_rows("zh-reviews")
    train = tmp_path_factory.mktemp("data") / "train.csv"
    with open(train, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        w.writerows([r for r in rows if r[1] == "pos"][:60] + [r for r in rows if r[1] == "neg"][:60])
    return str(train)


def _config(train: str, runner: dict) -> Config:
    return Config(name="runners", data={"train": train}, shards={"rows": 40}, augment={"n_iter": 2},
                  segment={"workers": 1}, runner=runner)


def _run(config: Config, out: str) -> dict:
    with shared_cluster(config.runner) as runner:
        for stage in STAGES:
            with_runner(STAGE_FLOWS[stage], runner)(config=config, out=out)
    layout = RunLayout(out)
    return {stage: {r.shard_id: r.sha256 for r in read_manifest(layout.stage_dir(stage)).shards}
            for stage in STAGES}


@pytest.fixture(scope="module")
def thread_hashes(tmp_path_factory, train_csv):
    return _run(_config(train_csv, {"kind": "thread"}), str(tmp_path_factory.mktemp("thread") / "run"))


@pytest.mark.slow
def test_dask_cluster_writes_the_same_shards_as_threads(tmp_path, train_csv, thread_hashes):
    pytest.importorskip("prefect_dask", reason="runner.kind: dask needs the dask extra: pip install slimflow[dask]")
    hashes = _run(_config(train_csv, {"kind": "dask", "workers": 2}), str(tmp_path / "run"))
    assert hashes == thread_hashes
    assert len(thread_hashes["segment"]) == 5 and len(thread_hashes["augment"]) == 3


def test_runner_kinds_map_to_prefect_task_runners():
    assert isinstance(task_runner(RunnerConfig()), ThreadPoolTaskRunner)
    assert task_runner(RunnerConfig(kind="process", workers=3))._max_workers == 3
    assert isinstance(task_runner(RunnerConfig(kind="process")), ProcessPoolTaskRunner)
    pytest.importorskip("prefect_dask")
    local = task_runner(RunnerConfig(kind="dask", workers=2, gpu=1))
    assert local.cluster_kwargs == {"threads_per_worker": 1, "dashboard_address": None, "n_workers": 2,
                                    "resources": {"GPU": 1}}
    remote = task_runner(RunnerConfig(kind="dask", address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs
    flow = with_runner(STAGE_FLOWS["segment"], RunnerConfig(kind="dask", workers=2))
    assert flow.name == "segment" and type(flow.task_runner).__name__ == "DaskTaskRunner"


def test_gpu_tasks_ask_for_the_gpu_resource_only_on_dask():
    import dask

    with gpu_tasks(RunnerConfig(kind="dask", gpu=1)):
        assert dask.get_annotations() == {"resources": {"GPU": 1}}
    with gpu_tasks(RunnerConfig(kind="thread", gpu=1)), gpu_tasks(RunnerConfig(kind="dask")):
        assert dask.get_annotations() == {}


def test_runner_config_errors_name_the_fix(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {train: t.csv}\nrunner: {kind: ray}\n")
    with pytest.raises(ConfigError, match=r"runner\.kind.*'ray'"):
        load_config(cfg)
    cfg.write_text("data: {train: t.csv}\nrunner: {kind: thread, address: 'tcp://h:8786'}\n")
    with pytest.raises(ConfigError, match="only used with kind: dask"):
        load_config(cfg)
