"""pyproject.toml and environment.yml must list the same dependencies (conda users get the same kit)."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}  # the conda package names that differ from PyPI


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = set(), set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip |= {_name(r) for r in dep["pip"] if not r.startswith("-e")}
        else:
            conda.add(_name(dep))
    listed = conda | pip
    expected = {CONDA_NAMES.get(n, n) for n in wanted}
    assert expected - listed == set(), f"in pyproject, missing from environment.yml: {expected - listed}"
    assert listed - expected - {"python", "pip"} == set(), f"only in environment.yml: {listed - expected}"


def test_course_extra_installs_jupyterlab():
    """The documented way to read the course, `jupyter lab notebooks/` (or `make lab`), must work
    from the project's environment: the course extra carries jupyterlab and its command runs."""
    import shutil
    import subprocess
    import sys

    course = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["course"]
    assert "jupyterlab" in {_name(r) for r in course}
    assert "lab:" in (ROOT / "Makefile").read_text(), "make lab is the README's way to open the course"
    bindir = Path(sys.executable).parent
    jupyter = bindir / "jupyter" if (bindir / "jupyter").exists() else shutil.which("jupyter")
    assert jupyter, f"no jupyter command beside {sys.executable}"
    done = subprocess.run([str(jupyter), "lab", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip().split(".")[0]) >= 4, done.stdout
