"""slimflow as a package (issue 14): one import namespace, and a wheel that works with no checkout nearby."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"flows": "slimflow.flows", "storage": "slimflow.storage", "tasks": "slimflow.tasks"}


def test_every_subpackage_is_in_the_build_config():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {"slimflow"}
    for folder, name in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert set(tool["packages"]) == found, "a folder with an __init__.py is missing from pyproject's packages"
    assert tool["package-dir"] == {"slimflow": "slimflow", **{v: k for k, v in MAPPED.items()}}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """The wheel built from this tree, installed into a new virtualenv whose only other packages are the
    dependencies this environment already has (a .pth onto its site-packages: no network, no rebuild)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # only what the build reads: proves the wheel needs nothing else from the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("slimflow", *MAPPED):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("slimflow-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    return {"wheel": wheel, "venv": venv, "py": py, "cwd": tmp / "elsewhere"}


def _run(env, *cmd, **kw):
    env["cwd"].mkdir(exist_ok=True)
    # No PYTHONPATH, run outside the checkout: nothing of the repository can be found but through the wheel.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean["PATH"] = f"{env['venv'] / 'bin'}:{clean.get('PATH', '')}"
    return subprocess.run(cmd, cwd=env["cwd"], env=clean, capture_output=True, text=True, timeout=600, **kw)


def test_wheel_holds_only_the_slimflow_namespace(fresh_venv):
    names = zipfile.ZipFile(fresh_venv["wheel"]).namelist()
    dist_info = re.sub(r"-py3.*", "", fresh_venv["wheel"].name) + ".dist-info"  # slimflow-X.Y.Z.dist-info
    assert {n.split("/")[0] for n in names} == {"slimflow", dist_info}
    assert "slimflow/tasks/teacher/label.py" in names and "slimflow/storage/shards.py" in names
    probe = ("import importlib.util as u, slimflow; "
             "print([n for n in ('flows', 'tasks', 'storage') if u.find_spec(n)], slimflow.__version__, "
             "slimflow.__file__)")
    p = _run(fresh_venv, str(fresh_venv["py"]), "-c", probe)
    assert p.returncode == 0, p.stderr
    found, version, where = p.stdout.split()[0], p.stdout.split()[1], p.stdout.split()[2]
    assert found == "[]" and version != "0+unknown" and where.startswith(str(fresh_venv["venv"]))


def test_wheel_cli_api_and_demo_data_work_outside_the_repository(fresh_venv, tmp_path):
    env, py = fresh_venv, str(fresh_venv["py"])
    help_ = _run(env, str(env["venv"] / "bin" / "slimflow"), "--help")
    assert help_.returncode == 0 and "usage: slimflow" in help_.stdout
    cfg = _run(env, py, "-c", "import slimflow; c = slimflow.Config(data={'train': 'train.csv'}, lang='en'); "
               "print(c.lang, c.students)")
    assert cfg.returncode == 0 and cfg.stdout.split()[0] == "en", cfg.stderr
    export = _run(env, str(env["venv"] / "bin" / "slimflow"), "data", "export", "en-reviews", "--out",
                  str(tmp_path / "data"))
    assert export.returncode == 0, export.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if p.suffix == ".csv")
    # Every deployment's entrypoint in prefect.yaml loads from the installed package (what `prefect deploy` and
    # a worker import).
    entrypoints = [d["entrypoint"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]]
    code = ("import sys; from prefect.flows import load_flow_from_entrypoint as load; "
            "print([load(e).name for e in sys.argv[1:]])")
    flows = _run(env, py, "-c", code, *entrypoints)
    assert flows.returncode == 0, flows.stderr
    assert "slimflow-run" in flows.stdout and flows.stdout.count("'") == 2 * len(entrypoints)
