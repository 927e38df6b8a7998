"""The per-stage code versions in the cache keys cover every module a stage's tasks run."""

from slimflow.tasks import prefect_tasks as pt


def _names(*modules: str) -> set[str]:
    return {str(p.relative_to(pt._TASKS)) for p in pt.task_sources(*modules)}


def test_code_versions_follow_imports():
    assert "fastseg.py" in _names(*pt.SEGMENT_CODE)  # segment_shard cuts words through tasks/fastseg.py
    export = _names(*pt.EXPORT_CODE)
    assert {"students/models.py", "students/onnx_lstm.py", "students/vocab.py", "students/chars.py",
            "fastseg.py", "segment.py"} <= export
    assert {"students/chars.py", "students/data.py", "students/losses.py"} <= _names(*pt.STUDENT_CODE)
    assert {"teacher/infer.py", "teacher/model.py", "teacher/convert.py"} <= _names(*pt.LABEL_CODE)
    assert "online.py" in _names(*pt.ONLINE_CODE) and "online.py" not in _names(*pt.STUDENT_CODE)


def test_code_version_is_deterministic_and_covers_the_task_glue(monkeypatch):
    v = pt.code_version(*pt.SEGMENT_CODE)
    assert v == pt.code_version(*reversed(pt.SEGMENT_CODE)) and len(v) == 16
    hashed: list[str] = []
    monkeypatch.setattr(pt, "hash_source_files", lambda paths: hashed.extend(str(p) for p in paths) or "x")
    pt.code_version(*pt.INGEST_CODE)
    assert pt.__file__ in hashed  # _train_student and the other wrappers' glue
    assert hashed == sorted(hashed)
