"""The Python API: what a notebook or another orchestrator calls instead of the CLI.

    import slimflow
    config = slimflow.Config.from_yaml("demo.yaml")          # or slimflow.Config(data={"train": ...}, ...)
    report = slimflow.run(config, "runs/demo", until="train")
    report.students["bow"]["distilled_accuracy"]
    labels, probs = slimflow.load_student("runs/demo/export/bow").predict(["很好用", "太差了"])

``run`` is ``slimflow run`` without the console: the same flows, the same run directory, the same report. The
stage flows are here too (``slimflow.flows.pipeline.ingest_flow`` ...) for those who compose their own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from slimflow.flows.config import Config
from slimflow.flows.pipeline import PIPELINE, run_flow
from slimflow.flows.prefect_env import prefect_env
from slimflow.storage.fs import exists, read_bytes
from slimflow.storage.layout import RunLayout
from slimflow.tasks.students.export import Predictor


@dataclass(frozen=True)
class Report:
    """A run directory's report.json as an object (the same numbers): row counts, the teacher's and each
    student's accuracy, speed and size, seconds per stage, and the tasks this invocation executed / reused."""

    out: str
    rows: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    students: dict[str, dict[str, Any]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)  # seconds per stage, as report.json's timing_s
    tasks: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # report.json whole

    @classmethod
    def from_dict(cls, report: dict[str, Any], out: str) -> Report:
        return cls(out=out, rows=report.get("rows", {}), teacher=report.get("teacher") or {},
                   students=report.get("students", {}), timing=report.get("timing_s", {}),
                   tasks=report.get("tasks", {}), raw=report)

    @classmethod
    def load(cls, out: str | os.PathLike) -> Report:
        """The report of an existing run directory."""
        path = RunLayout(str(out)).report_json
        if not exists(path):
            raise FileNotFoundError(f"{out} has no report.json: run `slimflow run CONFIG --out {out}` first")
        return cls.from_dict(json.loads(read_bytes(path)), str(out))


def run(config: Config | str | os.PathLike, out: str | os.PathLike, until: str | None = None) -> Report:
    """Run the pipeline on ``config`` (a Config, or the path of a YAML file) into ``out`` up to and including
    the stage ``until`` (the whole pipeline when None); returns its Report. Rerunning resumes: what the run
    directory already holds is not recomputed."""
    if not isinstance(config, Config):
        config = Config.from_yaml(config)
    if until is not None and until not in PIPELINE:
        raise ValueError(f"until={until!r} is not a stage; choose one of: {', '.join(PIPELINE)}")
    out = os.path.abspath(os.fspath(out))
    prefect_env()  # before run_flow starts the temporary server
    report = run_flow(config=config, out=out, until=until or PIPELINE[-1])
    return Report.from_dict(report, out)


def load_student(path: str | os.PathLike, backend: str = "auto") -> Predictor:
    """An exported student (``<run>/export/<kind>``), ready to serve: ``predict(texts) -> (labels,
    probabilities)``. ``backend``: auto (ONNX Runtime when installed), onnx or torch."""
    return Predictor(os.fspath(path), backend=backend)
