"""report.json (the contract in DESIGN.md) and report.md, rebuilt from the committed manifests.

Row counts come from the manifests on disk, not from what this process happened to run, so the report of a
partial rerun is still the state of the whole run directory.
"""

from __future__ import annotations

import json
import time

from flows.config import Config
from storage.fs import atomic_write_text, exists, read_bytes
from storage.layout import RunLayout
from storage.manifest import read_manifest


def _read(layout: RunLayout) -> dict:
    if exists(layout.report_json):
        try:
            return json.loads(read_bytes(layout.report_json))
        except json.JSONDecodeError:
            return {}  # a report is derived data: rebuild it rather than fail the run
    return {}


def row_counts(layout: RunLayout) -> dict:
    rows = {"labelled": 0, "unlabelled": 0, "augmented": 0, "teacher_labelled": 0, "rejected": 0}
    ing = read_manifest(layout.stage_dir("ingest"))
    if ing:
        split = ing.extra["rows"]
        rows.update(labelled=split["train"] + split["dev"] + split["test"], unlabelled=split["unlabelled"],
                    rejected=ing.extra["rejected"], splits=split)
    aug = read_manifest(layout.stage_dir("augment"))
    if aug:
        rows["augmented"] = aug.rows()
    lab = read_manifest(layout.stage_dir("label"))
    if lab:
        rows["teacher_labelled"] = lab.rows()
    return rows


def write_report(layout: RunLayout, config: Config, results: list[dict]) -> dict:
    """Merge this invocation's stage results into report.json / report.md and return the report."""
    report = _read(layout)
    timing = dict(report.get("timing_s", {}))
    by_stage = {}
    for r in results:
        timing[r["stage"]] = r["seconds"]
        by_stage[r["stage"]] = {"executed": r["executed"], "cached": r["cached"]}
    report.update(
        task=config.name,
        lang=config.lang,
        rows=row_counts(layout),
        timing_s=timing,
        tasks={"executed": sum(v["executed"] for v in by_stage.values()),
               "cached": sum(v["cached"] for v in by_stage.values()), "by_stage": by_stage},
        stages={r["stage"]: r for r in results} | {k: v for k, v in report.get("stages", {}).items()
                                                    if k not in by_stage},
        config=config.model_dump(mode="json"),
        updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    atomic_write_text(layout.report_json, json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write_text(layout.report_md, render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    rows = report.get("rows", {})
    lines = [f"# slimflow run `{report.get('task')}`", "",
             "| rows | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items() if not isinstance(v, dict)]
    lines += ["", "| stage | executed | cached | seconds |", "|---|---:|---:|---:|"]
    for stage, r in report.get("stages", {}).items():
        lines.append(f"| {stage} | {r['executed']} | {r['cached']} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
