"""The run-directory layout: one folder per stage, the report beside them.

    runs/<name>/
      ingest/{train,dev,test,unlabelled}/*.parquet  rejects.parquet  manifest.json
      segment/...  augment/...  label/...           each committed by its manifest.json
      report.json  report.md
      .prefect-cache/                               Prefect's cache records and task results, one file per key
"""

from __future__ import annotations

from dataclasses import dataclass

from slimflow.storage.fs import join

# The pipeline's stages in the order they run: the one definition (slimflow.flows.pipeline.PIPELINE and the CLI use it).
STAGES = ("ingest", "segment", "augment", "teacher", "label", "train", "export", "evaluate")


@dataclass(frozen=True)
class RunLayout:
    root: str

    def stage_dir(self, stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
        return join(self.root, stage)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def prefect_cache(self) -> str:
        """Prefect's cache records and persisted task results: in the run, so whoever sees the run sees them."""
        return join(self.root, ".prefect-cache")

    @property
    def report_json(self) -> str:
        return join(self.root, "report.json")

    @property
    def report_md(self) -> str:
        return join(self.root, "report.md")

    @property
    def rejects(self) -> str:
        return join(self.root, "ingest", "rejects.parquet")
