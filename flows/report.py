"""report.json, report.md and a plot, rebuilt from the committed manifests, and published as Prefect artifacts
(``slimflow-report``, ``slimflow-report-table``).

report.json's top-level keys (see ``write_report``): ``task``, ``lang``, ``rows``, ``teacher``,
``students`` (per kind: baseline / distilled accuracy, macro-F1, MCC, texts/s, params, size, speedup, gap
recovered), ``truncated`` (per split: its rows, and how many texts the teacher and each student kind read
truncated), ``timing_s``, ``tasks`` (executed / cached, per stage under ``by_stage``), ``stages``, ``config``,
``updated_at`` (and ``plot`` when report.png was drawn).

Every figure comes from the manifests on disk, not from what this process happened to run, so the report of a
partial rerun is still the state of the whole run directory.
"""

from __future__ import annotations

import json
import logging
import time

from slimflow.flows.config import Config
from slimflow.storage.fs import atomic_write_bytes, atomic_write_text, exists, read_bytes
from slimflow.storage.layout import RunLayout
from slimflow.storage.manifest import read_manifest

log = logging.getLogger(__name__)


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


def gap_recovered(teacher: float | None, baseline: float | None, distilled: float | None) -> float | None:
    """(distilled - baseline) / (teacher - baseline): the share of the teacher's lead the student closed."""
    if None in (teacher, baseline, distilled) or teacher <= baseline:
        return None
    return (distilled - baseline) / (teacher - baseline)


def model_section(layout: RunLayout) -> tuple[dict, dict]:
    """(teacher, students) as report.json holds them; empty until the stages ran."""
    teacher: dict = {}
    t = read_manifest(layout.stage_dir("teacher"))
    if t:
        meta = t.extra["teacher"]
        test = meta.get("metrics", {}).get("test", {})
        teacher = {"name": meta["name"], "accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1"),
                   "dev_accuracy": meta.get("metrics", {}).get("dev", {}).get("accuracy"), "qps": None,
                   "weights_hash": meta["weights_hash"], "max_length": meta.get("max_length"),
                   "truncation": meta.get("truncation", "head")}
    students: dict = {}
    ev = read_manifest(layout.stage_dir("evaluate"))
    if ev:
        teacher.update({k: ev.extra["teacher"].get(k) for k in ("qps", "qps_batch1", "params", "size_bytes")})
        by = {(e["kind"], e["mode"]): e for e in ev.extra["students"]}
        for kind in dict.fromkeys(k for k, _ in by):
            b, d = by.get((kind, "baseline"), {}), by.get((kind, "distilled"), {})
            students[kind] = {
                "baseline_accuracy": b.get("accuracy"), "distilled_accuracy": d.get("accuracy"),
                "baseline_macro_f1": b.get("macro_f1"), "macro_f1": d.get("macro_f1"), "mcc": d.get("mcc"),
                "qps": d.get("qps"), "qps_batch1": d.get("qps_batch1"), "params": d.get("params"),
                "size_bytes": d.get("size_bytes"), "backend": d.get("backend"),
                "speedup_vs_teacher": d["qps"] / teacher["qps"] if d.get("qps") and teacher.get("qps") else None,
                "gap_recovered": gap_recovered(teacher.get("accuracy"), b.get("accuracy"), d.get("accuracy")),
            }
    return teacher, students


def truncation_section(layout: RunLayout) -> dict:
    """``{"rows": {split: n}, split: {"teacher": n, kind: n, ...}}``: per split, how many texts each model read
    truncated (the teacher: more tokens than its max_length; a student: as its Predictor counts, omitted while it
    cannot). Empty until the evaluate stage ran."""
    ev = read_manifest(layout.stage_dir("evaluate"))
    t = (ev.extra["teacher"].get("truncation") if ev else None) or {}
    if not t:
        return {}
    out: dict = {"rows": t["rows"], **{s: {"teacher": n} for s, n in t["truncated"].items()}}
    for e in ev.extra["students"]:
        for s, n in (e.get("truncated") or {}).items():
            out.setdefault(s, {})[e["kind"]] = n
    return out


def write_report(layout: RunLayout, config: Config, results: list[dict]) -> dict:
    """Merge this invocation's stage results into report.json / report.md (+ plot, artifacts); return it."""
    report = _read(layout)
    timing = dict(report.get("timing_s", {}))
    by_stage = {}
    for r in results:
        timing[r["stage"]] = r["seconds"]
        by_stage[r["stage"]] = {"executed": r["executed"], "cached": r["cached"]}
    teacher, students = model_section(layout)
    report.update(
        task=config.name,
        lang=config.lang,
        rows=row_counts(layout),
        teacher=teacher,
        students=students,
        truncated=truncation_section(layout),
        timing_s=timing,
        tasks={"executed": sum(v["executed"] for v in by_stage.values()),
               "cached": sum(v["cached"] for v in by_stage.values()), "by_stage": by_stage},
        stages={**report.get("stages", {}), **{r["stage"]: r for r in results}},
        config=config.model_dump(mode="json"),
        updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    plot = plot_accuracy_speed(layout, teacher, students)
    if plot:
        report["plot"] = "report.png"
    atomic_write_text(layout.report_json, json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write_text(layout.report_md, render_markdown(report))
    publish_artifacts(report)
    return report


def _f(v, fmt=".3f") -> str:
    return "—" if v is None else format(v, fmt)


def results_table(report: dict) -> list[dict]:
    """One row per model: the table in report.md and in the Prefect artifact."""
    from slimflow.tasks.students.export import REDUCED  # the served precision named beside a student

    t = report.get("teacher") or {}
    rows = []
    if t:
        rows.append({"model": f"teacher ({t.get('name')})", "accuracy": t.get("accuracy"),
                     "macro_f1": t.get("macro_f1"),
                     "texts_per_s": t.get("qps"), "params": t.get("params"), "speedup": 1.0 if t.get("qps") else None,
                     "gap_recovered": None, "size_bytes": t.get("size_bytes")})
    for kind, s in report.get("students", {}).items():
        rows.append({"model": f"{kind} baseline", "accuracy": s["baseline_accuracy"],
                     "macro_f1": s["baseline_macro_f1"],
                     "texts_per_s": None, "params": s["params"], "speedup": None, "gap_recovered": None,
                     "size_bytes": None})
        # int8 / bf16: the served model is that one, and its accuracy is the one shown
        served = f" ({REDUCED[s['backend']]})" if s.get("backend") in REDUCED else ""
        rows.append({"model": f"{kind} distilled{served}", "accuracy": s["distilled_accuracy"],
                     "macro_f1": s["macro_f1"],
                     "texts_per_s": s["qps"], "params": s["params"], "speedup": s["speedup_vs_teacher"],
                     "gap_recovered": s["gap_recovered"], "size_bytes": s.get("size_bytes")})
    return rows


def render_table(report: dict) -> str:
    """The teacher / students table in markdown (empty before the evaluate stage)."""
    table = results_table(report)
    if not table:
        return ""
    # size: the served model file (a student's ONNX, int8 or bf16 for the transformer; the teacher's weights as
    # loaded)
    out = ["| model | test accuracy | macro-F1 | texts/s (batch 32) | params | size on disk (MB) | x teacher speed "
           "| gap recovered |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        mb = r["size_bytes"] / 1e6 if r.get("size_bytes") else None
        out.append(f"| {r['model']} | {_f(r['accuracy'])} | {_f(r['macro_f1'])} | {_f(r['texts_per_s'], ',.0f')} | "
                   f"{_f(r['params'], ',d')} | {_f(mb, ',.1f')} | {_f(r['speedup'], ',.0f')} | "
                   f"{_f(r['gap_recovered'], '.0%')} |")
    return "\n".join(out)


def render_markdown(report: dict) -> str:
    rows = report.get("rows", {})
    out = [f"# slimflow run `{report.get('task')}` ({report.get('lang')})", ""]
    table = render_table(report)
    if table:
        out += [table, "", "Gap recovered = (distilled - baseline) / (teacher - baseline) accuracy. Speed: raw text "
                "in, tokenisation included, on this machine's CPU.", ""]
        if report.get("plot"):
            out += ["![accuracy against speed](report.png)", ""]
    out += truncation_lines(report)
    out += ["| rows | count |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in rows.items() if not isinstance(v, dict)]
    out += ["", "| stage | executed | cached | seconds |", "|---|---:|---:|---:|"]
    for stage, r in report.get("stages", {}).items():
        out.append(f"| {stage} | {r['executed']} | {r['cached']} | {r['seconds']:.1f} |")
    return "\n".join(out) + "\n"


def truncation_lines(report: dict) -> list[str]:
    """One line per split: texts each model read truncated, of the split's rows (report.md)."""
    tr = report.get("truncated") or {}
    if not tr:
        return []
    t = report.get("teacher") or {}
    out = [f"Texts read truncated (teacher: over {t.get('max_length')} tokens, {t.get('truncation')}; students: "
           "past their max_len / max_chars):", ""]
    for split, rows in tr["rows"].items():
        counts = ", ".join(f"{model} {n:,}" for model, n in tr.get(split, {}).items())
        out.append(f"- {split} ({rows:,} texts): {counts}")
    return out + [""]


def plot_accuracy_speed(layout: RunLayout, teacher: dict, students: dict) -> bool:
    """Accuracy against texts/s (log scale) as report.png; False when there is nothing to plot yet."""
    points = [("teacher", teacher.get("qps"), teacher.get("accuracy"))] if teacher else []
    points += [(f"{k} distilled", s["qps"], s["distilled_accuracy"]) for k, s in students.items()]
    points = [p for p in points if p[1] and p[2] is not None]
    if len(points) < 2:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no report.png (pip install 'slimflow[report]')")
        return False
    import io

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, qps, acc in points:
        ax.scatter(qps, acc, s=40)
        ax.annotate(name, (qps, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for k, s in students.items():
        if s["qps"] and s["baseline_accuracy"] is not None:
            ax.scatter(s["qps"], s["baseline_accuracy"], marker="x", color="grey")
            ax.annotate(f"{k} baseline", (s["qps"], s["baseline_accuracy"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("texts/s at batch 32 (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against speed")
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(layout.path("report.png"), buf.getvalue())
    return True


def publish_artifacts(report: dict) -> None:
    """The table and the markdown as Prefect artifacts, when called inside a flow run (the UI shows them)."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = results_table(report)
    if table:
        create_table_artifact(key="slimflow-report-table", table=table,
                              description=f"teacher vs students, run {report.get('task')}")
    create_markdown_artifact(key="slimflow-report", markdown=render_markdown(report),
                             description=f"slimflow report, run {report.get('task')}")
