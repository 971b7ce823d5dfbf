"""The course runner: execute the numbered notebooks headless with papermill, and summarise them.

``python -m itmkit.course list`` shows the notebooks; ``python -m itmkit.course run [names...]
--preset smoke|course|paper --out DIR [--data DIR] [--device D] [--seed S] [--epochs N]`` runs
them in order, each in a fresh ``python3`` kernel with its ``parameters`` cell overridden, writes
each executed copy next to that notebook's outputs (``<out>/<stem>/<stem>.ipynb``), and prints and
saves a summary table (``summary.csv``, ``summary.md``) built only from each notebook's
``metrics.json``. A failing notebook is named with its failing cell; the others still run; the
exit status is non-zero at the end. Design: ``../shared/COURSE.md`` ("Headless runs") and
``docs/notebooks_howto.md``. What the notebooks call lives in :mod:`itmkit.course.notebook`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from itmkit.course.notebook import prepare_out_dir, read_metrics
from itmkit.paths import REPO_ROOT
from itmkit.runtime import environment, thread_count, thread_environment

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOK_NAME = re.compile(r"^(?P<number>\d{2})_(?P<name>[a-z0-9_]+)\.ipynb$")
KERNEL_NAME = "python3"

# Metric columns shown in the printed table and summary.md, in this order, when any notebook
# reports them; every other scalar in a metrics.json goes to summary.csv only.
KEY_METRICS = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "rsum",
    "untrained_rsum",
    "train_seconds",
)
SUMMARY_COLUMNS = ("notebook", "status", "seconds", "cpu_seconds", "peak_rss_mb", "error")


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def require_course_packages() -> None:
    """``ImportError`` with one line saying what to install when the course extra is missing
    (papermill runs the notebooks, nbformat reads them)."""
    import importlib.util

    missing = [name for name in ("papermill", "nbformat") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"the course runner needs {' and '.join(missing)}, which this Python "
                          f"({sys.executable}) does not have; install the course extra: "
                          "pip install -e '.[course]' (or: make venv)")  # fmt: skip


def discover_notebooks(folder: str | Path | None = None) -> list[Path]:
    """Every ``NN_<name>.ipynb`` in ``folder`` (default ``notebooks/``), in course order."""
    folder = Path(folder) if folder is not None else NOTEBOOKS_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"notebook folder {folder}: expected a directory, found none")
    return sorted(p for p in folder.iterdir() if NOTEBOOK_NAME.match(p.name))


def notebook_title(path: str | Path) -> str:
    """The first markdown heading of a notebook, without the ``#`` marks ("" when it has none)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


def notebook_table(folder: str | Path | None = None) -> str:
    """A markdown table ``| notebook | title |`` of every notebook in course order: the first two
    columns of the notebook lists in ``notebooks/README.md`` and ``docs/course.md`` (a test keeps
    those lists equal to the notebooks; ``python -m itmkit.course list --markdown`` prints it)."""
    rows = [f"| `{path.stem}` | {notebook_title(path)} |" for path in discover_notebooks(folder)]
    return "\n".join(["| notebook | title |", "| --- | --- |", *rows]) + "\n"


def select_notebooks(names: Iterable[str] | None, folder: str | Path | None = None) -> list[Path]:
    """The notebooks named in ``names`` (stem ``03_vse_infty``, number ``03`` or name
    ``vse_infty``), in course order; ``None`` or empty selects all. Unknown names raise
    ``ValueError`` listing what exists."""
    available = discover_notebooks(folder)
    names = list(names or [])
    if not names:
        return available
    chosen: set[Path] = set()
    for wanted in names:
        wanted_stem = Path(wanted).stem if wanted.endswith(".ipynb") else wanted
        hits = [
            p
            for p in available
            if wanted_stem in (p.stem, NOTEBOOK_NAME.match(p.name)["number"], NOTEBOOK_NAME.match(p.name)["name"])
        ]
        if not hits:
            raise ValueError(
                f"notebook {wanted!r}: expected one of {[p.stem for p in available]} (or its number "
                f"or name), found no match in {Path(folder) if folder else NOTEBOOKS_DIR}"
            )
        chosen.update(hits)
    return [p for p in available if p in chosen]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@dataclass
class NotebookResult:
    """What the runner knows about one executed notebook."""

    notebook: str
    status: str  # "ok" | "failed"
    seconds: float
    out_dir: Path
    executed: Path
    cpu_seconds: float | None = None  # the kernel's user + system CPU time (Unix)
    peak_rss_mb: float | None = None
    error: str = ""
    cell_index: int | None = None  # failing cell, 0-based in the committed notebook
    metrics: dict[str, Any] = field(default_factory=dict)


class _PeakRSS:
    """Polls the resident memory of this process's children (the kernel) in a thread.

    papermill starts the kernel as a child process and does not report its memory; sampling every
    ``interval`` seconds misses spikes shorter than that, so the Linux high-water mark (VmHWM,
    the kernel's own peak) is read as well where ``/proc`` has it.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _high_water(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                for child in me.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    self.peak_bytes = max(self.peak_bytes, rss, self._high_water(child.pid))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "_PeakRSS":
        try:
            import psutil  # noqa: F401  (optional: without it the peak column stays empty)
        except ImportError:
            return self
        self._thread = threading.Thread(target=self._poll, name="itmkit-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    @property
    def peak_mb(self) -> float | None:
        return round(self.peak_bytes / 2**20, 1) if self.peak_bytes else None


def _children_cpu_seconds() -> float | None:
    """User + system CPU seconds of this process's finished children (None where unsupported).

    The kernel is a child that papermill's kernel manager waits for at shutdown, so the
    difference across one notebook is that kernel's CPU time: unlike wall time, it does not grow
    when other work shares the machine.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _source_cell_index(notebook: Path, executed_index: int) -> int:
    """Map a cell index of papermill's executed copy back to the committed notebook.

    papermill inserts one ``injected-parameters`` cell right after the ``parameters`` cell (or at
    the top when there is none), so cells after it shift by one.
    """
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    injected_at = tagged[-1] + 1 if tagged else 0
    return executed_index - 1 if executed_index >= injected_at + 1 else executed_index


def _describe_failure(notebook: Path, exc: BaseException) -> tuple[str, int | None]:
    """A one-line description of why a notebook failed, and the failing source cell index."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        index = _source_cell_index(notebook, exc.cell_index)
        first_line = next((ln.strip() for ln in str(exc.source).splitlines() if ln.strip()), "")
        if len(first_line) > 60:
            first_line = first_line[:57] + "..."
        message = f"cell {index} (In [{exc.exec_count}]: {first_line}): {exc.ename}: {exc.evalue}"
        return message, index
    return f"{type(exc).__name__}: {exc}", None


def run_notebook(
    notebook: str | Path,
    out_root: str | Path,
    parameters: dict[str, Any],
    *,
    timeout: float | None = None,
    log_output: bool = False,
    threads: int | None = None,
) -> NotebookResult:
    """Execute one notebook in a fresh ``python3`` kernel with ``parameters`` injected.

    ``out_dir`` is set to ``<out_root>/<stem>`` (absolute); the kernel starts in that folder and
    the executed copy is written there as ``<stem>.ipynb``. The kernel's environment carries
    ``threads`` (:func:`itmkit.runtime.thread_environment`; default :func:`~itmkit.runtime.thread_count`).
    Never raises for a notebook error: the result's ``status``/``error``/``cell_index`` say what
    went wrong.
    """
    require_course_packages()
    import papermill

    notebook = Path(notebook).resolve()
    out_dir = (Path(out_root) / notebook.stem).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "metrics.json"
    if stale.exists():
        stale.unlink()  # a metrics.json from an earlier run must not pass for this run's
    executed = out_dir / notebook.name
    params = {**parameters, "out_dir": str(out_dir)}
    status, error, cell_index = "ok", "", None
    start = time.perf_counter()
    cpu_before = _children_cpu_seconds()
    # the kernel is a child process: it inherits the thread setting before torch is imported
    with _PeakRSS() as memory, environment(thread_environment(thread_count(threads))):
        try:
            papermill.execute_notebook(
                str(notebook),
                str(executed),
                parameters=params,
                kernel_name=KERNEL_NAME,
                language="python",
                progress_bar=False,
                log_output=log_output,
                cwd=str(out_dir),
                execution_timeout=timeout,
            )
        except Exception as exc:  # any failure is reported, and the course goes on
            status = "failed"
            error, cell_index = _describe_failure(notebook, exc)
    seconds = time.perf_counter() - start
    cpu_after = _children_cpu_seconds()
    cpu_seconds = None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 1)
    metrics = {}
    if status == "ok":
        try:
            metrics = read_metrics(out_dir)
        except ValueError as exc:
            status, error = "failed", str(exc)
        else:
            if not metrics:
                status, error = "failed", f"{notebook.name} wrote no {out_dir / 'metrics.json'}"
    return NotebookResult(
        notebook=notebook.stem,
        status=status,
        seconds=round(seconds, 1),
        cpu_seconds=cpu_seconds,
        out_dir=out_dir,
        executed=executed,
        peak_rss_mb=memory.peak_mb,
        error=error,
        cell_index=cell_index,
        metrics=metrics,
    )


def summary_table(results: Sequence[NotebookResult]) -> pd.DataFrame:
    """One row per notebook: ``notebook, status, seconds, cpu_seconds, peak_rss_mb, error``, then the
    :data:`KEY_METRICS` any notebook reported, then every other scalar metric (sorted)."""
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "notebook": r.notebook,
            "status": r.status,
            "seconds": r.seconds,
            "cpu_seconds": r.cpu_seconds,
            "peak_rss_mb": r.peak_rss_mb,
            "error": r.error,
        }
        for key, value in r.metrics.items():
            if key not in SUMMARY_COLUMNS:
                row[key] = value
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)) if not rows else pd.DataFrame(rows)
    present = set(frame.columns)
    key = [k for k in KEY_METRICS if k in present]
    other = sorted(present - set(SUMMARY_COLUMNS) - set(key))
    return frame[list(SUMMARY_COLUMNS) + key + other]


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (floats to 2 decimals, empty for NaN)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(_cell_text(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def headline(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns worth printing: the fixed ones and the key metrics (not every scalar)."""
    return frame[[c for c in frame.columns if c in SUMMARY_COLUMNS or c in KEY_METRICS]]


def write_summary(frame: pd.DataFrame, out: str | Path) -> tuple[Path, Path]:
    """Save ``summary.csv`` (every column) and ``summary.md`` (the headline columns) in ``out``."""
    out = prepare_out_dir(out)
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    frame.to_csv(csv_path, index=False)
    md_path.write_text(markdown_table(headline(frame)))
    return csv_path, md_path


def run_course(
    names: Iterable[str] | None = None,
    preset: str = "course",
    out: str | Path = "runs/course",
    *,
    data_dir: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    epochs: int | None = None,
    notebooks_dir: str | Path | None = None,
    timeout: float | None = None,
    log_output: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> pd.DataFrame:
    """Run the selected notebooks (all by default) in order and return the summary table.

    Each notebook gets ``preset``, ``data_dir``, ``device``, ``seed``, ``out_dir=<out>/<stem>``
    and ``epochs`` (only when given) as papermill parameters, and ``threads`` CPU threads
    (default ``$ITMKIT_THREADS``, else the CPUs this process may use) through its kernel's
    environment. ``summary.csv``/``summary.md`` are written to ``out`` after every notebook, so
    an interrupted course still leaves a table.
    """
    require_course_packages()
    threads = thread_count(threads)
    notebooks = select_notebooks(names, notebooks_dir)
    if not notebooks:
        raise FileNotFoundError(f"no NN_<name>.ipynb notebooks in {notebooks_dir or NOTEBOOKS_DIR}")
    out = prepare_out_dir(out).resolve()
    parameters: dict[str, Any] = {
        "preset": preset,
        "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
        "device": device,
        "seed": int(seed),
    }
    if epochs is not None:
        parameters["epochs"] = int(epochs)
    results: list[NotebookResult] = []
    bar = tqdm(notebooks, desc=f"course ({preset})", unit="notebook", disable=not progress)
    for notebook in bar:
        bar.set_postfix_str(notebook.stem)
        result = run_notebook(notebook, out, parameters, timeout=timeout, log_output=log_output, threads=threads)
        results.append(result)
        line = f"{result.notebook}: {result.status} in {result.seconds:.1f} s"
        if result.error:
            line += f" -- {result.error}"
        if progress:
            tqdm.write(line)
        frame = summary_table(results)
        write_summary(frame, out)
    return frame


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m itmkit.course", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list the course notebooks in order, with their titles")
    listing.add_argument("--markdown", action="store_true", help="as a markdown table (for the docs' notebook lists)")
    listing.add_argument("--notebooks", default=None, help=argparse.SUPPRESS)
    run = sub.add_parser("run", help="run notebooks headless and write a summary table")
    run.add_argument("names", nargs="*", help="notebooks by stem, number or name (default: all)")
    run.add_argument("--preset", default="course", help="smoke | course | paper (default: course)")
    run.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    run.add_argument("--data", default=None, help="precomp data folder (default: the embedded set)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    run.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds")
    run.add_argument("--log-output", action="store_true", help="echo notebook output to the log")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads per notebook kernel (default: $ITMKIT_THREADS, else the CPUs this "
                          "process may use; 1 on a server shared by many people)")  # fmt: skip
    run.add_argument("--notebooks", default=None, help=argparse.SUPPRESS)  # a different folder (tests)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run_command(args)
    except (ValueError, OSError, ImportError) as err:  # a user's mistake: one line, no traceback
        print(f"python -m itmkit.course {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "list":
        if args.markdown:
            print(notebook_table(args.notebooks), end="")
            return 0
        require_course_packages()
        for path in discover_notebooks(args.notebooks):
            print(f"{path.stem:<16} {notebook_title(path)}")
        return 0
    out = args.out or f"runs/{args.preset}"
    frame = run_course(
        args.names,
        preset=args.preset,
        out=out,
        data_dir=args.data,
        device=args.device,
        seed=args.seed,
        epochs=args.epochs,
        notebooks_dir=args.notebooks,
        timeout=args.timeout,
        log_output=args.log_output,
        threads=args.threads,
    )
    print()
    print(markdown_table(headline(frame)), end="")
    print(f"\nsummary: {Path(out) / 'summary.csv'}, {Path(out) / 'summary.md'}")
    failed = frame.loc[frame["status"] != "ok", "notebook"].tolist()
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
