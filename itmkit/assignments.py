"""Classroom assignments with nbgrader: the exercise catalogue, release versions, model submissions.

The course folder ``assignments/`` follows nbgrader's layout: ``nbgrader_config.py``,
``source/<name>/<name>.ipynb`` (the teacher's version, solutions between ``### BEGIN SOLUTION`` /
``### END SOLUTION``, graded test cells locked and worth points). nbgrader itself writes
``release/`` (solutions stripped), ``gradebook.db``, ``submitted/``, ``autograded/``, ``feedback/``.
The teacher's guide is ``docs/teaching.md``; its table of exercises is generated from
:data:`EXERCISES` and the notebooks' points, so it cannot drift from them.

    python -m itmkit.assignments list                        the exercises, points and minutes
    python -m itmkit.assignments release [NAME ...]          release versions + the guide's table (make assignments)
    python -m itmkit.assignments model-submission STUDENT    a filled-in submission, to try grading
    python -m itmkit.assignments model-submission STUDENT --blank   one that answers nothing

Every subcommand takes ``--course DIR`` (default: the repository's ``assignments/``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from itmkit.data.errors import DataFormatError
from itmkit.paths import REPO_ROOT

DEFAULT_COURSE = REPO_ROOT / "assignments"
DEFAULT_GUIDE = REPO_ROOT / "docs" / "teaching.md"
BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
GUIDE_BEGIN = "<!-- exercises: written by `python -m itmkit.assignments release`; edit itmkit/assignments.py instead -->"
GUIDE_END = "<!-- /exercises -->"


@dataclass(frozen=True)
class Exercise:
    """One graded exercise: an nbgrader assignment holding one notebook of the same name.

    Attributes:
        name: assignment id, folder and notebook stem (``source/<name>/<name>.ipynb``).
        title: the notebook's title, short.
        writes: what the student writes (the functions they complete).
        teaches: what the exercise teaches, one sentence.
        spec: the spec sections it follows.
        library: the itmkit code its tests compare with.
        minutes: how long a student who has read the course needs, roughly.
    """

    name: str
    title: str
    writes: str
    teaches: str
    spec: str
    library: str
    minutes: int


EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "recall_at_k",
        "Recall@K from a similarity matrix",
        "`recall_at_k(sims, k, captions_per_image)`",
        "how a score matrix becomes R@K in both directions; the best of an image's captions counts; ties",
        "baselines.md §C.1",
        "`itmkit/evaluate/metrics.py`",
        20,
    ),
    Exercise(
        "hinge_loss",
        "The hinge triplet loss with hardest negatives",
        "`hinge_loss(scores, margin, max_violation)`",
        "VSE++'s bidirectional hinge loss, sum mode vs hardest negatives, the collapse value 2Bm, its gradient",
        "baselines.md §B.5",
        "`itmkit/losses.py`",
        25,
    ),
    Exercise(
        "scan_attention",
        "SCAN: word→region attention and the pooled score",
        "`word_region_attention(regions, words, smooth)`, `t2i_score(...)`",
        "the two axes of cross attention (clipped_l2norm over words, softmax over regions), AVG and LSE pooling",
        "scan.md §3.3–§3.4",
        "`itmkit/models/cross_attention.py`",
        40,
    ),
    Exercise(
        "gpo_weights",
        "GPO: pooling weights that depend on the set size",
        "`gpo_weights(gpo, n)`, `gpo_pool(gpo, features, lengths)`",
        "VSE∞'s pooling between max and mean: size-only weights from a GRU over positions, sorted features, padding",
        "baselines.md §B.1",
        "`itmkit/models/gpo.py`",
        35,
    ),
    Exercise(
        "chan_coding",
        "CHAN: hard assignment coding and log-sum-exp pooling",
        "`chan_scores(images, image_lengths, captions, caption_lengths, pooling, belta)`",
        "a parameter-free set-to-set score for whole padded blocks: masked max over regions, masked LSE over words",
        "chan.md §3.3",
        "`itmkit/models/coding.py`",
        30,
    ),
)


def exercise_names() -> list[str]:
    return [exercise.name for exercise in EXERCISES]


def get_exercise(name: str) -> Exercise:
    for exercise in EXERCISES:
        if exercise.name == name:
            return exercise
    raise ValueError(f"assignment {name!r}: expected one of {exercise_names()}")


def source_notebook(course: str | Path, name: str) -> Path:
    return Path(course) / "source" / name / f"{name}.ipynb"


def release_notebook(course: str | Path, name: str) -> Path:
    return Path(course) / "release" / name / f"{name}.ipynb"


def submitted_notebook(course: str | Path, student: str, name: str) -> Path:
    return Path(course) / "submitted" / student / name / f"{name}.ipynb"


# --------------------------------------------------------------------------------------------
# Reading and checking the teacher's notebooks
# --------------------------------------------------------------------------------------------
def _read(path: Path):
    import nbformat

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such notebook")
    return nbformat.read(str(path), as_version=4)


def _nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def graded_points(path: str | Path) -> dict[str, float]:
    """``{grade_id: points}`` of the autograded test cells of a notebook, in order."""
    return {_nbgrader(c)["grade_id"]: float(_nbgrader(c).get("points", 0)) for c in _read(Path(path)).cells if _nbgrader(c).get("grade")}


def check_source(path: str | Path) -> None:
    """Check a teacher's notebook before nbgrader releases it; ``DataFormatError`` names the cell.

    Beyond what nbgrader checks itself: stored clean (no outputs, no execution counts) with the
    course's kernelspec; every solution cell carries the solution markers (without them nbgrader
    would blank the whole cell, signature and docstring included); every graded cell is locked
    and worth points; grade ids are unique.
    """
    path = Path(path)
    nb = _read(path)
    if nb.metadata.get("kernelspec") != KERNELSPEC:
        raise DataFormatError(path, "metadata.kernelspec", KERNELSPEC, nb.metadata.get("kernelspec"))
    if nb.metadata.get("language_info", {}).get("name") != "python":
        raise DataFormatError(path, "metadata.language_info.name", "'python'", nb.metadata.get("language_info"))
    seen: set[str] = set()
    n_graded = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            raise DataFormatError(path, f"cell {index}", "no outputs and no execution count", "a run cell")
        meta = _nbgrader(cell)
        if not meta:
            continue
        grade_id = meta.get("grade_id")
        where = f"cell {index} ({grade_id})"
        if not grade_id or grade_id in seen:
            raise DataFormatError(path, f"cell {index}", "a unique nbgrader grade_id", repr(grade_id))
        seen.add(grade_id)
        if meta.get("solution") and cell.cell_type == "code":
            if BEGIN_SOLUTION not in cell.source or END_SOLUTION not in cell.source:
                raise DataFormatError(path, where, f"'{BEGIN_SOLUTION}' ... '{END_SOLUTION}' around the answer", "no markers")
        if meta.get("grade"):
            n_graded += 1
            if not meta.get("locked"):
                raise DataFormatError(path, where, "a locked graded cell", "an editable one")
            if not meta.get("points", 0) > 0:
                raise DataFormatError(path, where, "points > 0", meta.get("points"))
    if n_graded == 0:
        raise DataFormatError(path, "cells", "at least one graded test cell", "none")


def solution_answer(source: str) -> str:
    """A solution cell as a student would hand it in: the cell with the marker lines removed."""
    kept = [line for line in source.splitlines() if line.strip() not in (BEGIN_SOLUTION, END_SOLUTION)]
    return "\n".join(kept)


# --------------------------------------------------------------------------------------------
# nbgrader
# --------------------------------------------------------------------------------------------
def nbgrader_environment() -> dict[str, str]:
    """The environment for nbgrader commands: this Python's ``bin`` first on ``PATH``, because
    nbgrader runs ``alembic`` (its database migrations) by name, which fails in a venv that is
    not activated ("No such file or directory: 'alembic'")."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_nbgrader(args: Sequence[str], course: str | Path) -> str:
    """Run ``nbgrader ARGS`` in the course folder (where it reads ``nbgrader_config.py``); return
    its log. A failure raises ``RuntimeError`` with the command and the end of the log."""
    command = [sys.executable, "-m", "nbgrader", *args]
    done = subprocess.run(command, cwd=course, env=nbgrader_environment(), capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"`nbgrader {' '.join(args)}` in {course} failed ({done.returncode}):\n{log[-4000:]}")
    return log


def _course_names(course: Path) -> list[str]:
    source = course / "source"
    if not (course / "nbgrader_config.py").is_file() or not source.is_dir():
        raise FileNotFoundError(f"{course}: not an nbgrader course folder (expected nbgrader_config.py and source/)")
    return sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))


def generate_release(course: str | Path = DEFAULT_COURSE, names: Sequence[str] | None = None) -> list[Path]:
    """``nbgrader generate_assignment`` for ``names`` (default: every assignment in ``source/``),
    after :func:`check_source` on each; overwrites earlier release versions. Returns the release
    notebooks."""
    course = Path(course)
    present = _course_names(course)
    wanted = list(names) if names else present
    for name in wanted:
        if name not in present:
            raise FileNotFoundError(f"{course / 'source' / name}: no such assignment; found {present}")
        check_source(source_notebook(course, name))
    # one nbgrader process for the whole course ("*" is a glob over source/), else one per name
    for target in ["*"] if wanted == present else wanted:
        run_nbgrader(["generate_assignment", target, "--force"], course)
    return [release_notebook(course, name) for name in wanted]


def write_submission(course: str | Path, student: str, names: Sequence[str] | None = None, blank: bool = False) -> list[Path]:
    """Put a submission of ``student`` under ``submitted/`` as nbgrader expects it.

    The release version with every answer cell filled in from the teacher's solutions (markers
    removed), as a student who solved everything would hand it in; ``blank=True`` hands in the
    release version untouched. Needs the release versions (:func:`generate_release`).
    """
    import nbformat

    course = Path(course)
    written = []
    for name in names or _course_names(course):
        release = release_notebook(course, name)
        if not release.is_file():
            raise FileNotFoundError(f"{release}: no release version; run `python -m itmkit.assignments release` first")
        nb = _read(release)
        if not blank:
            answers = {
                _nbgrader(c)["grade_id"]: solution_answer(c.source)
                for c in _read(source_notebook(course, name)).cells
                if _nbgrader(c).get("solution")
            }
            for cell in nb.cells:
                grade_id = _nbgrader(cell).get("grade_id")
                if _nbgrader(cell).get("solution"):
                    if grade_id not in answers:
                        raise DataFormatError(release, f"answer cell {grade_id}", "a matching cell in the source", "none")
                    cell.source = answers[grade_id]
        out = submitted_notebook(course, student, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(out))
        written.append(out)
    return written


# --------------------------------------------------------------------------------------------
# The teacher's guide
# --------------------------------------------------------------------------------------------
def exercise_table(course: str | Path = DEFAULT_COURSE) -> str:
    """The guide's markdown table: one row per exercise, points read from its source notebook."""
    rows = [
        "| # | assignment | the student writes | it teaches | spec | compared with | points | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    points = [sum(graded_points(source_notebook(course, ex.name)).values()) for ex in EXERCISES]
    for number, (ex, total) in enumerate(zip(EXERCISES, points), start=1):
        rows.append(
            f"| {number} | `{ex.name}`: {ex.title} | {ex.writes} | {ex.teaches} | {ex.spec} | {ex.library} "
            f"| {total:g} | {ex.minutes} |"
        )
    rows.append(f"| | all {len(EXERCISES)} | | | | | {sum(points):g} | {sum(ex.minutes for ex in EXERCISES)} |")
    return "\n".join(rows) + "\n"


def update_guide(guide: str | Path = DEFAULT_GUIDE, course: str | Path = DEFAULT_COURSE) -> bool:
    """Rewrite the exercise table between the guide's markers; True when the text changed."""
    guide = Path(guide)
    text = guide.read_text()
    head, begin, rest = text.partition(GUIDE_BEGIN)
    _, end, tail = rest.partition(GUIDE_END)
    if not begin or not end:
        raise DataFormatError(guide, "exercise table markers", f"{GUIDE_BEGIN!r} ... {GUIDE_END!r}", "missing")
    new = f"{head}{GUIDE_BEGIN}\n{exercise_table(course)}{GUIDE_END}{tail}"
    if new != text:
        guide.write_text(new)
    return new != text


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m itmkit.assignments", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="the exercises with their points and minutes")
    release = sub.add_parser("release", help="release versions (solutions stripped) and the guide's exercise table")
    release.add_argument("names", nargs="*", help="assignments to release (default: all in source/)")
    release.add_argument(
        "--guide", default=None, help="guide whose exercise table to rewrite (default: docs/teaching.md for the repository's course)"
    )
    submit = sub.add_parser("model-submission", help="a submission filled in from the solutions, to try grading")
    submit.add_argument("student", help="student id, e.g. demo")
    submit.add_argument("names", nargs="*", help="assignments (default: all in source/)")
    submit.add_argument("--blank", action="store_true", help="hand in the release versions unanswered")
    for command in (listing, release, submit):
        command.add_argument("--course", default=str(DEFAULT_COURSE), help="nbgrader course folder (default: assignments/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    course = Path(args.course)
    try:
        if args.command == "list":
            print(exercise_table(course), end="")
        elif args.command == "release":
            for path in generate_release(course, args.names):
                print(f"released: {path}")
            # a partial release, or another course folder, leaves the repository's guide alone
            guide = args.guide or (DEFAULT_GUIDE if course.resolve() == DEFAULT_COURSE.resolve() else None)
            if guide and not args.names:
                changed = update_guide(guide, course)
                print(f"guide: {guide} ({'exercise table updated' if changed else 'up to date'})")
        else:
            for path in write_submission(course, args.student, args.names, blank=args.blank):
                print(f"submitted: {path}")
            print(f"grade it: cd {course} && nbgrader autograde \"*\" --student {args.student}")
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
