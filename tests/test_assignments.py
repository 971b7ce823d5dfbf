"""The classroom assignments (``assignments/``, ``itmkit.assignments``).

- every teacher's (source) notebook is well formed and passes its own graded tests;
- known wrong answers lose points (the graded tests can fail);
- in a fresh course folder, nbgrader's release versions fail every graded test, and nbgrader's
  own ``autograde`` gives a filled-in submission full marks and a blank one zero.

The source and release notebooks run in this process, cell by cell (fast, and a failure names the
cell); the ``autograde`` test runs them the way a teacher does: headless kernels started by
nbgrader, one ``nbgrader autograde`` call for both submissions.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from itmkit import assignments
from itmkit.assignments import EXERCISES, source_notebook

nbformat = pytest.importorskip("nbformat", reason="the course extra (nbformat, nbgrader) is not installed")
pytest.importorskip("nbgrader", reason="the course extra (nbgrader) is not installed")

NAMES = [exercise.name for exercise in EXERCISES]
COURSE = assignments.DEFAULT_COURSE


def _meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def execute_in_process(nb, replace: dict[str, str] | None = None) -> dict[str, BaseException | None]:
    """Run a notebook's code cells in order in one fresh namespace (in this process); return
    ``{cell name: exception or None}`` (cell name = nbgrader grade_id, else ``cell <i>``).
    ``replace`` swaps the source of cells by grade_id (a student's answer)."""
    namespace: dict = {}
    results: dict[str, BaseException | None] = {}
    with torch.random.fork_rng():  # the notebooks seed torch; keep this process's RNG as it was
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            name = _meta(cell).get("grade_id") or f"cell {index}"
            source = (replace or {}).get(name, cell.source)
            try:
                exec(compile(source, f"<{name}>", "exec"), namespace)
                results[name] = None
            except Exception as err:  # noqa: BLE001 — recorded, the test judges it
                results[name] = err
    return results


def graded_ids(nb) -> list[str]:
    return [_meta(c)["grade_id"] for c in nb.cells if _meta(c).get("grade")]


def read(path):
    return nbformat.read(str(path), as_version=4)


# --------------------------------------------------------------------------------------------
# The teacher's notebooks
# --------------------------------------------------------------------------------------------
def test_catalogue_is_the_course_folder():
    folders = sorted(p.name for p in (COURSE / "source").iterdir() if p.is_dir())
    assert folders == sorted(NAMES)
    assert (COURSE / "nbgrader_config.py").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_source_is_well_formed(name):
    path = source_notebook(COURSE, name)
    nb = read(path)
    nbformat.validate(nb)
    assignments.check_source(path)  # clean, kernelspec, markers, locked graded cells with points
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# Assignment ")
    exercise = assignments.get_exercise(name)
    assert exercise.spec.split()[0] in "".join(c.source for c in nb.cells if c.cell_type == "markdown"), (
        f"{name}: the explanation cites {exercise.spec}"
    )
    graded = [c for c in nb.cells if _meta(c).get("grade")]
    assert len(graded) >= 3 and sum(_meta(c)["points"] for c in graded) == 10
    # most points compare with the library, on several inputs (not one hand number)
    library_points = sum(_meta(c)["points"] for c in graded if "itmkit" in c.source)
    assert library_points >= 7, f"{name}: only {library_points} points compare with itmkit"
    assert any(_meta(c).get("solution") for c in nb.cells)


@pytest.mark.parametrize("name", NAMES)
def test_source_passes_its_own_tests(name):
    results = execute_in_process(read(source_notebook(COURSE, name)))
    failed = {cell: f"{type(err).__name__}: {err}" for cell, err in results.items() if err is not None}
    assert not failed, f"{name}: {failed}"


# Wrong answers a student could plausibly hand in: each must lose points (some graded cell fails).
MUTANTS = {
    "recall_at_k": {
        # ties given to the positive (the old strict rule), and the first caption only instead of the best one
        "recall_at_k": [("((sims >= best_own[:, None]) & ~own)", "(sims > best_own[:, None])"),
                        ("best_own = np.where(own, sims, -np.inf).max(axis=1)", "best_own = sims[np.arange(n_img), np.arange(n_img) * captions_per_image]")],
    },
    "hinge_loss": {
        # the diagonal left in as a negative; the mean instead of the sum
        "hinge_loss": [("cost_caption = cost_caption.masked_fill(diagonal, 0.0)", ""),
                       ("return cost_caption.sum() + cost_image.sum()", "return cost_caption.mean() + cost_image.mean()")],
    },
    "scan_attention": {
        # ReLU instead of LeakyReLU(0.1); the softmax over the words instead of the regions
        "word_region_attention": [("F.leaky_relu(regions @ words.t(), 0.1)", "F.relu(regions @ words.t())"),
                                  ("torch.softmax(smooth * normalised, dim=0).t()", "torch.softmax(smooth * normalised, dim=1).t()")],
    },
    "gpo_weights": {
        # one GRU direction only; the padding sorted in with the real items
        "gpo_weights": [("(out[0, :, : gpo.d_hidden] + out[0, :, gpo.d_hidden :]) / 2", "out[0, :, : gpo.d_hidden]")],
        "gpo_pool": [("item[:n].sort(dim=0, descending=True).values", "item.sort(dim=0, descending=True).values[:n]")],
    },
    "chan_coding": {
        # padded regions allowed to win; the paper's 1/lambda scale
        "chan_scores": [('table = table.masked_fill(~real_region[:, None, :, None], float("-inf"))', ""),
                        ("return torch.logsumexp(", "return belta * torch.logsumexp(")],
    },
}


@pytest.mark.parametrize("name", NAMES)
def test_wrong_answers_lose_points(name):
    nb = read(source_notebook(COURSE, name))
    answers = {_meta(c)["grade_id"]: c.source for c in nb.cells if _meta(c).get("solution")}
    graded = graded_ids(nb)
    for cell, edits in MUTANTS[name].items():
        for old, new in edits:
            assert old in answers[cell], f"{name}/{cell}: the mutant's text {old!r} is not in the solution"
            results = execute_in_process(nb, {cell: answers[cell].replace(old, new)})
            assert results[cell] is None, f"{name}/{cell}: the mutant itself does not run"
            failing = [g for g in graded if isinstance(results[g], AssertionError)]
            assert failing, f"{name}/{cell}: the wrong answer {new!r} (for {old!r}) passes every graded test"


def test_guide_table_is_current():
    guide = assignments.DEFAULT_GUIDE.read_text()
    assert assignments.exercise_table(COURSE) in guide, "docs/teaching.md: run `python -m itmkit.assignments release`"


def test_solution_answer_drops_only_the_markers():
    cell = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n# after"
    assert assignments.solution_answer(cell) == "def f(x):\n    return x + 1\n# after"


def test_check_source_names_the_bad_cell(tmp_path):
    nb = read(source_notebook(COURSE, "hinge_loss"))
    for cell in nb.cells:
        if _meta(cell).get("solution"):
            cell.source = assignments.solution_answer(cell.source)  # markers lost
    path = tmp_path / "hinge_loss.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(ValueError, match=r"hinge_loss\.ipynb: cell \d+ \(hinge_loss\): expected '### BEGIN SOLUTION'"):
        assignments.check_source(path)


# --------------------------------------------------------------------------------------------
# nbgrader, in a fresh course folder
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A fresh copy of the course folder, released with the same command as `make assignments`
    (the guide goes to a copy, which must come out unchanged: the committed one is current)."""
    root = tmp_path_factory.mktemp("course")
    shutil.copy(COURSE / "nbgrader_config.py", root)
    shutil.copytree(COURSE / "source", root / "source")
    guide = root / "teaching.md"
    shutil.copy(assignments.DEFAULT_GUIDE, guide)
    assert assignments.main(["release", "--course", str(root), "--guide", str(guide)]) == 0
    assert guide.read_text() == assignments.DEFAULT_GUIDE.read_text()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_release_has_stubs_and_fails_every_graded_test(course, name):
    release = read(assignments.release_notebook(course, name))
    text = json.dumps(release)
    assert assignments.BEGIN_SOLUTION not in text and "raise NotImplementedError()" in text
    results = execute_in_process(release)
    for grade_id in graded_ids(release):
        err = results[grade_id]
        assert isinstance(err, (NotImplementedError, AssertionError)), (
            f"{name}/{grade_id}: a blank answer must fail this test, got {err!r}"
        )


@pytest.mark.slow
def test_nbgrader_autograde_full_marks_and_zero(course):
    from nbgrader.api import Gradebook

    assert assignments.main(["model-submission", "full", "--course", str(course)]) == 0
    assert assignments.main(["model-submission", "blank", "--blank", "--course", str(course)]) == 0
    assignments.run_nbgrader(["autograde", "*"], course)  # both students, every assignment, one call
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        for name in NAMES:
            full = gradebook.find_submission(name, "full")
            blank = gradebook.find_submission(name, "blank")
            assert full.max_score == 10 and full.score == full.max_score, f"{name}: full submission got {full.score}"
            assert blank.score == 0, f"{name}: blank submission got {blank.score}"
    for name in NAMES:
        graded = read(course / "autograded" / "blank" / name / f"{name}.ipynb")
        for cell in graded.cells:
            if _meta(cell).get("grade"):
                errors = [o["ename"] for o in cell.outputs if o.get("output_type") == "error"]
                assert errors and errors[0] in ("NotImplementedError", "AssertionError"), (name, _meta(cell)["grade_id"], errors)
        answered = read(course / "autograded" / "full" / name / f"{name}.ipynb")
        errors = [o["ename"] for c in answered.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
        assert not errors, f"{name}: the full submission raised {errors}"
