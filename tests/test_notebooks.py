"""Every course notebook: stored clean, and runs end to end on the ``smoke`` preset.

Parametrised over ``notebooks/NN_*.ipynb``, so a notebook added later is covered without editing
this file, and a failure names the notebook (and, in the message, the failing cell).
"""

import ast
import json
import re

import pytest

from itmkit.course import runner
from itmkit.paths import REPO_ROOT

nbformat = pytest.importorskip("nbformat", reason="the course extra (nbformat, papermill) is not installed")

NOTEBOOKS = runner.discover_notebooks()
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _parameters(cell) -> dict:
    """The literal assignments of a parameters cell, as a dict (ast: nothing is executed)."""
    values = {}
    for node in ast.parse(cell.source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise AssertionError(f"parameters cell: expected only `name = literal` lines, found {ast.dump(node)[:80]}")
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_the_course_has_its_first_four_notebooks():
    stems = [p.stem for p in NOTEBOOKS]
    assert stems[:4] == ["00_setup", "01_features", "02_data", "03_vse_infty"]


@pytest.mark.parametrize("listing", ["notebooks/README.md", "docs/course.md"])
def test_the_notebook_lists_name_every_notebook_with_its_title(listing):
    """The tables a reader starts from list exactly the notebooks there are, in order, titled as
    each notebook's heading (``python -m itmkit.course list --markdown`` prints the two columns)."""
    rows = re.findall(r"^\| `(\d\d_[a-z0-9_]+)` \| ([^|]+?) \|", (REPO_ROOT / listing).read_text(), flags=re.M)
    assert [stem for stem, _ in rows] == [p.stem for p in NOTEBOOKS], f"{listing}: the notebook list"
    assert [title for _, title in rows] == [runner.notebook_title(p) for p in NOTEBOOKS], f"{listing}: titles"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_imports_cell_takes_itmkit_names_from_the_course_surface(path):
    """The cell after the parameters imports itmkit names from ``itmkit.course`` and at most one
    module the chapter is about; a cell that shows one specific piece imports it where it is used."""
    cell = [c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"][1]
    modules = {node.module for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.ImportFrom)}
    itmkit_modules = {m for m in modules if m and m.split(".")[0] == "itmkit"}
    assert "itmkit.course" in itmkit_modules and len(itmkit_modules) <= 2, f"{path.name}: {sorted(itmkit_modules)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec") == KERNELSPEC, f"{path.name}: metadata.kernelspec"
    assert nb.metadata.get("language_info", {}).get("name") == "python", f"{path.name}: metadata.language_info.name"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        assert not cell.get("outputs"), f"{path.name}: code cell {i} has stored outputs"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {i} has an execution count"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), f"{path.name}: a title first"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), f"{path.name}: first code cell must be tagged parameters"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert _parameters(first) == {
        "data_dir": None,
        "preset": "course",
        "epochs": None,
        "device": "auto",
        "seed": 0,
        "out_dir": f"runs/{path.stem}",
    }
    assert nb.cells[-1].cell_type == "code" and "write_metrics" in nb.cells[-1].source, (
        f"{path.name}: the last cell writes metrics.json"
    )


SMOKE_CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def course_out(tmp_path_factory):
    """One output root for all smoke runs, as in a real course run: comparison baselines trained
    by one notebook (``_shared_runs``) are reused by the next, and each notebook has its own folder."""
    return tmp_path_factory.mktemp("course")


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_smoke(path, course_out):
    tmp_path = course_out
    # A smoke cell takes seconds. Once in many CI runs papermill/nbclient lost a kernel's reply
    # and waited on an idle kernel forever (a known papermill/jupyter_client hang): a cell past
    # SMOKE_CELL_TIMEOUT_S fails instead, and only such a timeout is tried once more (a real
    # hang times out twice).
    frame = runner.run_course([path.stem], preset="smoke", out=tmp_path, progress=False, timeout=SMOKE_CELL_TIMEOUT_S)
    row = frame.iloc[0]
    if row["status"] != "ok" and "timed out" in str(row["error"]).lower():
        frame = runner.run_course([path.stem], preset="smoke", out=tmp_path, progress=False, timeout=SMOKE_CELL_TIMEOUT_S)
        row = frame.iloc[0]
    assert row["status"] == "ok", f"{path.stem} failed: {row['error']} (see {tmp_path / path.stem / path.name})"
    metrics = json.loads((tmp_path / path.stem / "metrics.json").read_text())
    assert metrics and all(not isinstance(v, (dict, list)) for v in metrics.values())
    assert (tmp_path / path.stem / path.name).is_file()  # the executed copy beside the outputs
    assert list((tmp_path / path.stem).glob("*.png")), f"{path.stem}: expected saved figures in out_dir"
