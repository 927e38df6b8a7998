"""`slimflow rerun --stage label --shard ONE`: exactly that shard's label task, then only what reads its output."""

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from slimflow.flows.config import Config, load_config
from slimflow.flows.pipeline import rerun_stages, run_flow
from slimflow.storage.fs import atomic_write_text
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import read_manifest

from tests.flows.test_faults import _chain_config, _env, _slimflow


def _hashes(out, stage):
    return {r.shard_id: r.sha256 for r in read_manifest(RunLayout(out).stage_dir(stage)).shards}


@dataclass(frozen=True)
class ChainRun:
    cfg: str  # the YAML config
    out: Path  # the run directory, through train: tests copy it, never change it
    report: dict  # the run's report
    home: Path  # the PREFECT_HOME it ran under

    def copy(self, dest: Path) -> str:
        """The run directory copied to ``dest`` (a moved run directory, as far as any cache can tell)."""
        shutil.copytree(self.out, dest)
        return str(dest)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One run of the chain config (tiny random BERT, 120 zh reviews) up to train, shared by this module's tests:
    each whole-pipeline run costs tens of seconds of Prefect bookkeeping, and the tests below only need one
    finished run to change something on."""
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    root = tmp_path_factory.mktemp("chain")
    cfg = _chain_config(root, n=120)
    home = root / "home-0"
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}):
        report = run_flow(config=load_config(cfg), out=str(root / "run"), until="train")
    return ChainRun(cfg, root / "run", report, home)


@pytest.mark.slow
def test_rerun_one_label_shard_then_only_its_dependents(chain, tmp_path):
    config = load_config(chain.cfg)
    out = chain.copy(tmp_path / "run")
    labels = _hashes(out, "label")
    shard = sorted(labels)[0]

    rep = rerun_stages(out, "label", [shard])
    by = rep["tasks"]["by_stage"]
    assert by["label"] == {"executed": 1, "cached": len(labels) - 1}
    # the vocabularies (one per token unit), their teacher vectors (student.init: teacher) and the baselines
    # read no label shard: cached; the distilled students read it: rerun
    units = {config.student.unit_of(k, config.lang) for k in config.students}
    per_unit = 2 if config.student.init == "teacher" else 1
    assert by["train"] == {"executed": len(config.students),
                           "cached": per_unit * len(units) + len(config.students)}
    assert _hashes(out, "label") == labels  # the other shards (and this one, recomputed) keep their hashes
    assert set(by) == {"label", "train"}


@pytest.mark.parametrize("stage", ["ingest", "train", "export", "evaluate"])
def test_shard_is_refused_for_a_stage_without_shard_tasks(tmp_path, stage):
    # checked before anything is read or run: no run directory is needed
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match=f"--shard does not apply to the {stage} stage") as e:
        rerun_stages(out, stage, ["train-00000"])
    assert "segment, augment, label, and teacher with teacher.fit: head" in str(e.value)
    assert not os.path.exists(out)


@pytest.mark.parametrize("fit", ["finetune", "none"])
def test_shard_is_refused_for_the_teacher_stage_unless_it_embeds_per_shard(tmp_path, fit):
    out = str(tmp_path / "run")
    config = Config(name="r", data={"train": "t.csv"}, teacher={"fit": fit})
    atomic_write_text(os.path.join(out, "config.json"), config.model_dump_json())
    with pytest.raises(ValueError, match=f"--shard does not apply to the teacher stage with teacher.fit: {fit}"):
        rerun_stages(out, "teacher", ["train-00000"])
    assert os.listdir(out) == ["config.json"]  # nothing ran


# ----------------------------------------------------------------------------------------------------------------
# What keys a task (issue 13): execution-only settings never do; a stage param re-executes exactly its dependents.


@pytest.mark.slow
def test_execution_only_settings_re_execute_no_task(chain, tmp_path):
    config = load_config(chain.cfg)
    out = chain.copy(tmp_path / "run")
    first = run_flow(config=config, out=out)  # every stage: label and evaluate read the teacher's settings
    assert first["tasks"]["by_stage"]["evaluate"]["executed"] > 0  # export and evaluate ran on top of the copy
    # All four at once, one rerun (each is ~30 s here): a setting that keyed any task would make that task
    # execute, so one run with every setting changed proves each of them keys nothing.
    change = {"teacher": config.teacher.model_copy(update={"threads": 2, "cache_dir": str(tmp_path / "other")}),
              "runner": config.runner.model_copy(update={"workers": 2}),
              "segment": config.segment.model_copy(update={"workers": 2})}
    rep = run_flow(config=config.model_copy(update=change), out=out)
    assert rep["tasks"]["executed"] == 0, rep["tasks"]["by_stage"]
    assert rep["tasks"]["cached"] == first["tasks"]["executed"] + first["tasks"]["cached"]


@pytest.mark.slow
def test_p_mask_re_executes_augment_its_labels_and_training_only(chain, tmp_path):
    config = load_config(chain.cfg)
    out = chain.copy(tmp_path / "run")
    upstream = ("ingest", "segment", "teacher")
    before = {s: _hashes(out, s) for s in upstream}
    n_label = len(_hashes(out, "label"))

    changed = config.model_copy(update={"augment": config.augment.model_copy(update={"p_mask": 0.3})})
    by = run_flow(config=changed, out=out, until="train")["tasks"]["by_stage"]
    n_aug = len(_hashes(out, "augment"))
    assert {s: by[s]["executed"] for s in upstream} == dict.fromkeys(upstream, 0)
    assert by["augment"] == {"executed": n_aug, "cached": 1}  # every augment shard; the POS table reads no p_mask
    assert by["label"] == {"executed": n_aug, "cached": n_label - n_aug}  # the augmented rows' labels only
    units = {config.student.unit_of(k, config.lang) for k in config.students}
    per_unit = 2 if config.student.init == "teacher" else 1  # a vocabulary and its teacher vectors per unit
    # the distilled students read the new labels; the vocabularies, vectors and baselines read no augmented row
    assert by["train"] == {"executed": len(config.students), "cached": per_unit * len(units) + len(config.students)}
    assert {s: _hashes(out, s) for s in upstream} == before


@pytest.mark.slow
def test_the_cache_lives_in_the_run_directory(chain, tmp_path):
    """A fresh PREFECT_HOME (a recreated container) and a moved run directory: the run executes no task."""
    first = chain.report["tasks"]
    assert first["executed"] > 0
    assert not [p for p in (chain.home / "storage").rglob("*") if p.is_file()]  # nothing in Prefect's home
    assert len(list((chain.out / ".prefect-cache").iterdir())) >= first["executed"]

    # In a new process, as a recreated container or another machine would be, with a PREFECT_HOME that never
    # saw the run, on the run directory moved elsewhere: any cache record kept outside the run directory, or
    # keyed by its path, would make a task execute here.
    moved = Path(chain.copy(tmp_path / "elsewhere" / "run"))
    home = tmp_path / "home-1"
    env = {**_env(), "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage")}
    proc = subprocess.run(_slimflow("run", chain.cfg, "--out", str(moved), "--until", "train"), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads((moved / "report.json").read_text())["tasks"]
    assert (there["executed"], there["cached"]) == (0, first["executed"] + first["cached"]), there["by_stage"]


@pytest.mark.slow
def test_train_student_in_run_with_the_stage_inputs_reproduces_the_stage_student(chain, tmp_path):
    # bench/label.py trains further student seeds this way: the same function, the train manifest's own settings,
    # vocabulary and vectors. Same seed -> the stage's student, bit for bit; another seed -> another student.
    from slimflow.storage.hashing import sha256_file
    from slimflow.tasks.prefect_tasks import train_stage_inputs, train_student_in_run

    config = load_config(chain.cfg)
    out = chain.copy(tmp_path / "run")
    train = read_manifest(RunLayout(out).stage_dir("train"))
    kind = config.students[0]
    x = train_stage_inputs(out, config.student.unit_of(kind, config.lang))
    s = x["student"]
    assert x["vectors"] is None or os.path.exists(os.path.join(out, x["vectors"]["path"]))

    def again(seed: int, rel: str) -> str:
        train_student_in_run(out, kind, "distilled", x["train"], x["dev"], x["vocab"], x["labels"],
                             {**s, "seed": seed}, x["distill"], threads=1, vectors=x["vectors"], out_rel=rel)
        return sha256_file(os.path.join(out, rel, "best.pt"))

    stage_student = next(t for t in train.extra["students"] if (t["kind"], t["mode"]) == (kind, "distilled"))
    assert again(s["seed"], "bench-seeds/same") == stage_student["best"]["sha256"]
    assert again(s["seed"] + 1, "bench-seeds/other") != stage_student["best"]["sha256"]
