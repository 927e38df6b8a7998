import subprocess
import sys

import pytest
from slimflow.flows.cli import build_parser, main

COMMANDS = [["run"], ["ingest"], ["segment"], ["augment"], ["teacher"], ["label"], ["train"], ["export"],
            ["evaluate"], ["rerun"], ["predict"], ["demo"], ["deploy"], ["data"], ["data", "export"]]


@pytest.mark.parametrize("cmd", [[]] + COMMANDS)
def test_every_command_explains_itself(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: slimflow") and len(out) > 200


def test_help_is_instant_no_heavy_imports():
    code = "import sys; from slimflow.flows.cli import build_parser; build_parser(); " \
           "print(any(m in sys.modules for m in ('torch', 'prefect', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_errors_are_one_line_with_a_fix(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err and "Traceback" not in err

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {train: t.csv}\naugment: {n_iters: 3}\nlang: fr\n")
    assert main(["ingest", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "augment.n_iters: unknown key" in err and "lang" in err and "'zh'" in err
    assert "valid keys in augment: n_iter, p_mask" in err  # the section's own keys, not a pointer elsewhere

    bad.write_text("data: {train: t.csv}\nstudent: {char_students: [bwo]}\nteacherr: {}\n")
    assert main(["ingest", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "student.char_students.0" in err and "'bwo'" in err  # a typo'd kind is an error, not ignored
    assert "teacherr: unknown key" in err and "valid keys at the top level: name, lang, data" in err


def test_label_in_online_mode_is_an_error_not_a_silent_no_op(tmp_path, capsys):
    cfg = tmp_path / "online.yaml"
    cfg.write_text("name: o\ndata: {train: t.csv}\ndistill: {mode: online}\n")
    out = tmp_path / "run"
    assert main(["label", str(cfg), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "distill.mode is online: there is no label stage" in err and "slimflow train" in err
    assert not out.exists()  # refused before anything was written


def test_data_export_writes_disjoint_splits(tmp_path, capsys):
    assert main(["data", "export", "en-reviews", "--out", str(tmp_path), "--labelled", "100"]) == 0
    import csv

    texts = {}
    for split in ("train", "dev", "test", "unlabelled"):
        with open(tmp_path / f"{split}.csv", encoding="utf-8") as f:
            texts[split] = [r["text"] for r in csv.DictReader(f)]
    assert [len(texts[s]) for s in ("train", "dev", "test")] == [100, 1000, 1000]
    assert len(texts["unlabelled"]) == 12752 - 2100
    all_texts = [t for v in texts.values() for t in v]
    assert len(all_texts) == len(set(all_texts))


def test_the_teacher_command_runs_the_stage_or_serves(tmp_path, capsys):
    # `teacher CONFIG` is the stage (flows/cli.py hands its stage command to flows/cli_teacher.py)
    assert main(["teacher", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.yaml not found" in err
    assert main(["teacher", "serve"]) == 1
    assert "give the run's CONFIG" in capsys.readouterr().err


def _import_cycles() -> list[set[str]]:
    """Groups of slimflow modules that import each other, directly or through others (imports inside functions
    included): the strongly connected components of the import graph with more than one module."""
    from pathlib import Path

    import slimflow.flows
    from slimflow.tasks import code_version as cv

    packages = {**cv.PACKAGES, "slimflow.flows": Path(slimflow.flows.__file__).resolve().parent}
    modules = {cv._module_name(f, packages) for folder in packages.values() for f in folder.rglob("*.py")}
    graph = {m: {n for n in cv._imports([cv._tree(cv.module_file(m, packages))], m, packages)
                 if n != m and not m.startswith(n + ".")} for m in modules}  # a package's __init__ is no cycle

    def reach(m: str) -> set[str]:
        seen, todo = set(), [m]
        while todo:
            for n in graph[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        return seen

    reached = {m: reach(m) for m in modules}
    cycles = {frozenset({m} | {n for n in reached[m] if m in reached[n]}) for m in modules if m in reached[m]}
    return [set(c) for c in cycles]


def test_no_import_cycles_in_the_cli_or_the_students_tokens():
    """Issue 13: flows/cli*.py imported each other, and tasks/students/chars.py <-> vocab.py."""
    cycles = _import_cycles()
    named = {"slimflow.flows.cli", "slimflow.flows.cli_ops", "slimflow.flows.cli_teacher",
             "slimflow.tasks.students.chars", "slimflow.tasks.students.vocab"}
    assert not [c for c in cycles if c & named], cycles
