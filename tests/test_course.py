"""The course runner: discovery, metrics files, failure reporting and the summary table.

The runner tests execute two tiny throw-away notebooks (one raises, one writes metrics) through
papermill, so they exercise the real kernel path in a few seconds.
"""

import json
import os
import sys
import types
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from itmkit.course import notebook, runner
from itmkit.config import RunConfig, TrainConfig, DataConfig

nbformat = pytest.importorskip("nbformat", reason="the course extra (nbformat, papermill) is not installed")
pytest.importorskip("papermill", reason="the course extra (papermill) is not installed")

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

PARAMETERS = 'data_dir = None\npreset = "course"\nepochs = None\ndevice = "auto"\nseed = 0\nout_dir = "runs/x"'


def _write_notebook(path, code_cells, title="# A test notebook"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(title), params] + [nbformat.v4.new_code_cell(c) for c in code_cells]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="module")
def toy_course(tmp_path_factory):
    """A course folder: 00_fails raises in cell 3, 01_reports writes metrics, plus noise files."""
    folder = tmp_path_factory.mktemp("notebooks")
    _write_notebook(
        folder / "00_fails.ipynb",
        ["x = 1", "y = x / 0  # the failing cell", "print('never reached')"],
    )
    _write_notebook(
        folder / "01_reports.ipynb",
        [
            "from itmkit.course import write_metrics",
            "write_metrics(out_dir, {'seed_seen': seed, 'preset_seen': preset, 'epochs_seen': epochs,\n"
            "                        'rsum': 3.5 * seed, 'i2t_r1': 1.25, 'zz_extra': 'kept'})",
        ],
    )
    (folder / "README.md").write_text("not a notebook")
    _write_notebook(folder / "scratch.ipynb", ["raise RuntimeError('must never run')"])
    return folder


@pytest.fixture(scope="module")
def course_run(toy_course, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    frame = runner.run_course(
        None, preset="smoke", out=out, seed=7, epochs=2, notebooks_dir=toy_course, progress=False
    )
    return frame, out


def test_discovery_keeps_numbered_notebooks_in_order(toy_course):
    assert [p.name for p in runner.discover_notebooks(toy_course)] == ["00_fails.ipynb", "01_reports.ipynb"]


def test_select_by_stem_number_or_name(toy_course):
    by = lambda names: [p.stem for p in runner.select_notebooks(names, toy_course)]  # noqa: E731
    assert by(["reports"]) == ["01_reports"]
    assert by(["01", "00_fails"]) == ["00_fails", "01_reports"]  # course order, not argument order
    assert by(["01_reports.ipynb"]) == ["01_reports"]
    assert by(None) == ["00_fails", "01_reports"]
    with pytest.raises(ValueError, match="'nope'.*00_fails"):
        runner.select_notebooks(["nope"], toy_course)


def test_failing_notebook_is_named_with_its_cell_and_the_rest_still_runs(course_run):
    frame, out = course_run
    assert frame["notebook"].tolist() == ["00_fails", "01_reports"]
    failed = frame.set_index("notebook").loc["00_fails"]
    assert failed["status"] == "failed"
    # cell 3 of the committed notebook: title, parameters, "x = 1", then the division
    assert "cell 3" in failed["error"] and "ZeroDivisionError" in failed["error"]
    assert "y = x / 0" in failed["error"]
    # the executed copy sits next to the notebook's outputs and holds the traceback
    executed = nbformat.read(str(out / "00_fails" / "00_fails.ipynb"), as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors and errors[0].ename == "ZeroDivisionError"
    assert frame.set_index("notebook").loc["01_reports", "status"] == "ok"


def test_parameters_are_injected_and_metrics_reach_the_summary(course_run):
    frame, out = course_run
    row = frame.set_index("notebook").loc["01_reports"]
    assert row["seed_seen"] == 7 and row["preset_seen"] == "smoke" and row["epochs_seen"] == 2
    assert row["rsum"] == pytest.approx(24.5) and row["i2t_r1"] == pytest.approx(1.25)
    written = json.loads((out / "01_reports" / "metrics.json").read_text())
    assert written["rsum"] == pytest.approx(24.5)
    assert row["seconds"] > 0
    # the kernel's CPU time: a python kernel that imports itmkit spends well over 0.1 s
    assert row["cpu_seconds"] is not None and 0.1 < row["cpu_seconds"] < 10 * row["seconds"], row["cpu_seconds"]
    # its peak memory (psutil, declared in the course extra): a python kernel with pandas is tens of MB
    assert row["peak_rss_mb"] is not None and 10 < row["peak_rss_mb"] < 8192, row["peak_rss_mb"]


def test_summary_files_order_columns_and_show_key_metrics(course_run):
    frame, out = course_run
    assert list(frame.columns[:6]) == ["notebook", "status", "seconds", "cpu_seconds", "peak_rss_mb", "error"]
    # key metrics in KEY_METRICS order first, then the rest sorted
    assert list(frame.columns[6:]) == ["i2t_r1", "rsum", "epochs_seen", "preset_seen", "seed_seen", "zz_extra"]
    on_disk = pd.read_csv(out / "summary.csv")
    assert on_disk["notebook"].tolist() == ["00_fails", "01_reports"]
    assert on_disk["status"].tolist() == ["failed", "ok"]
    md = (out / "summary.md").read_text().splitlines()
    assert md[0] == "| notebook | status | seconds | cpu_seconds | peak_rss_mb | error | i2t_r1 | rsum |"
    assert md[3].startswith("| 01_reports | ok |") and md[3].endswith("| 1.25 | 24.50 |")


def test_cli_exits_non_zero_and_names_the_failed_notebook(toy_course, tmp_path, capsys):
    rc = runner.main(["run", "00", "--preset", "smoke", "--out", str(tmp_path), "--notebooks", str(toy_course)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "FAILED: 00_fails" in captured.err
    assert "| 00_fails | failed |" in captured.out
    assert (tmp_path / "summary.csv").is_file() and not (tmp_path / "01_reports").exists()


def test_cli_list_prints_stems_and_titles_in_order(toy_course, capsys):
    assert runner.main(["list", "--notebooks", str(toy_course)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{'00_fails':<16} A test notebook",
        f"{'01_reports':<16} A test notebook",
    ]


def test_notebook_without_metrics_counts_as_failed(tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    _write_notebook(folder / "00_silent.ipynb", ["z = 2 + 2"])
    frame = runner.run_course(["silent"], preset="smoke", out=tmp_path / "out", notebooks_dir=folder, progress=False)
    assert frame["status"].tolist() == ["failed"]
    assert "metrics.json" in frame["error"].iloc[0]


def test_a_rerun_into_an_old_output_folder_never_reports_last_runs_numbers(tmp_path):
    """Last run's ``metrics.json`` files are still in the output folders; this time one notebook
    fails and one finishes without writing metrics. Both are failed, and no old number survives."""
    folder = tmp_path / "nb"
    folder.mkdir()
    _write_notebook(folder / "00_broken.ipynb", ["raise RuntimeError('broken since last run')"])
    _write_notebook(folder / "01_quiet.ipynb", ["z = 2 + 2  # the metrics cell was removed"])
    out = tmp_path / "out"
    for stem in ("00_broken", "01_quiet"):
        (out / stem).mkdir(parents=True)
        (out / stem / "metrics.json").write_text(json.dumps({"rsum": 999.0, "i2t_r1": 99.0}))
    frame = runner.run_course(None, preset="smoke", out=out, notebooks_dir=folder, progress=False)
    assert frame["notebook"].tolist() == ["00_broken", "01_quiet"]
    assert frame["status"].tolist() == ["failed", "failed"]
    assert "RuntimeError" in frame["error"].iloc[0] and "metrics.json" in frame["error"].iloc[1]
    assert "rsum" not in frame.columns or frame["rsum"].isna().all()
    assert not (out / "00_broken" / "metrics.json").exists() and not (out / "01_quiet" / "metrics.json").exists()
    assert "999" not in (out / "summary.csv").read_text() and "999" not in (out / "summary.md").read_text()


def test_markdown_table_by_hand():
    frame = pd.DataFrame({"notebook": ["a|b", "c"], "x": [1.0, float("nan")], "n": [3, 4]})
    assert runner.markdown_table(frame) == (
        "| notebook | x | n |\n| --- | --- | --- |\n| a\\|b | 1.00 | 3 |\n| c |  | 4 |\n"
    )


def test_write_metrics_is_flat_and_unwraps_scalars(tmp_path):
    path = notebook.write_metrics(tmp_path / "m", {"b": np.float32(0.5), "a": np.int64(3), "c": float("inf"), "d": "x"})
    assert json.loads(path.read_text()) == {"a": 3, "b": 0.5, "c": None, "d": "x"}
    assert list(json.loads(path.read_text())) == ["a", "b", "c", "d"]
    assert notebook.read_metrics(tmp_path / "m")["a"] == 3
    assert notebook.read_metrics(tmp_path / "nothing") == {}
    with pytest.raises(TypeError, match=r"metrics.json.*'curve'.*scalar.*list"):
        notebook.write_metrics(tmp_path / "m", {"curve": [1, 2]})


def test_embedded_preset_for_maps_presets():
    assert notebook.embedded_preset_for("smoke") == "tiny"
    assert notebook.embedded_preset_for("course") == "course"
    with pytest.raises(ValueError, match="preset.*'paper'.*data_dir"):
        notebook.embedded_preset_for("paper")
    assert notebook.embedded_preset_for("paper", fallback="course") == "course"
    assert notebook.embedded_preset_for("smoke", fallback="course") == "tiny"


@dataclass
class _ToyModel:
    embed_size: int = 4


def test_notebook_run_config_applies_parameters_to_the_method_preset(monkeypatch):
    from itmkit.methods import registry

    def preset(epochs, embedded):
        return lambda: RunConfig(
            method="toy", model=_ToyModel(), data=DataConfig(embedded_preset=embedded), train=TrainConfig(epochs=epochs)
        )

    module = types.ModuleType("itmkit_toy_method")
    module.METHOD = registry.MethodSpec(
        name="toy",
        config_cls=_ToyModel,
        build=lambda cfg, vocab: None,
        presets={"smoke": preset(1, "tiny"), "course": preset(6, "course"), "paper": preset(25, "course")},
    )
    monkeypatch.setitem(sys.modules, "itmkit_toy_method", module)
    monkeypatch.setitem(registry.METHOD_MODULES, "toy", "itmkit_toy_method")

    cfg = notebook.notebook_run_config("toy", "course", device="cpu", seed=3)
    assert (cfg.train.epochs, cfg.train.device, cfg.train.seed, cfg.preset) == (6, "cpu", 3, "course")
    assert cfg.data.data_dir is None and cfg.data.embedded_preset == "course"
    cfg = notebook.notebook_run_config("toy", "smoke", epochs=2)
    assert cfg.train.epochs == 2 and cfg.data.embedded_preset == "tiny"
    cfg = notebook.notebook_run_config("toy", "paper", data_dir="/data/f30k_precomp")
    assert cfg.data.data_dir == "/data/f30k_precomp" and cfg.train.epochs == 25
    with pytest.raises(ValueError, match="data_dir.*'paper'"):
        notebook.notebook_run_config("toy", "paper")
    with pytest.raises(ValueError, match="epochs.*0"):
        notebook.notebook_run_config("toy", "smoke", epochs=0)
    with pytest.raises(KeyError, match="no preset 'huge'"):
        notebook.notebook_run_config("toy", "huge")


def test_comparison_run_trains_once_and_is_reused(tmp_path):
    from itmkit.course import comparison_run

    first = comparison_run("vse_infty", "smoke", tmp_path / "04_scan", epochs=1, seed=3)
    marker = first.out_dir / "result.json"
    stamp = marker.stat().st_mtime_ns
    again = comparison_run("vse_infty", "smoke", tmp_path / "07_esl", epochs=1, seed=3)
    assert again.out_dir == first.out_dir
    assert first.out_dir.parent == (tmp_path / "_shared_runs").resolve()
    assert marker.stat().st_mtime_ns == stamp  # reused, not retrained
    assert again.best_rsum == first.best_rsum
    other = comparison_run("vse_infty", "smoke-i2t-lse", tmp_path / "05_sgraf", epochs=1, seed=4)
    assert other.out_dir != first.out_dir  # another seed: another run


def test_comparison_run_variant_and_overrides_are_their_own_runs(tmp_path):
    from itmkit.course import comparison_run
    from itmkit.runs import load_run

    base = comparison_run("vse_infty", "smoke", tmp_path / "03", epochs=1, seed=0)
    mean = comparison_run("vse_infty", "smoke", tmp_path / "05", epochs=1, seed=0, variant="mean")
    assert mean.out_dir != base.out_dir and mean.out_dir.name.startswith("vse_infty-mean-smoke-seed0-")
    assert load_run(mean.out_dir)[1].model.pooling == "mean"  # the variant's settings were trained
    same = comparison_run("vse_infty", "smoke", tmp_path / "07", epochs=1, seed=0,
                          overrides={"model.pooling": "mean"})
    # the same settings reached another way: the hash matches, only the readable label differs
    assert same.out_dir.name.split("-")[-1] == mean.out_dir.name.split("-")[-1]
    with pytest.raises(KeyError, match="no variant 'nope'"):
        comparison_run("vse_infty", "smoke", tmp_path / "08", epochs=1, variant="nope")


def test_shared_run_dir_names_every_setting(tmp_path):
    from itmkit.config import replace_nested
    from itmkit.methods.registry import get_method
    from itmkit.runs import shared_run_dir

    cfg = get_method("scan").preset("smoke")
    a = shared_run_dir(tmp_path, "scan", cfg)
    assert a == shared_run_dir(tmp_path, "scan", get_method("scan").preset("smoke"))
    assert a.parent == tmp_path.resolve() and a.name.startswith("scan-smoke-seed")
    assert shared_run_dir(tmp_path, "scan", replace_nested(cfg, {"train.lr": 0.0123})) != a
    assert shared_run_dir(tmp_path, "scan", replace_nested(cfg, {"train.seed": 7})).name.startswith("scan-smoke-seed7-")


def test_notebook_names_are_their_modules_own_objects():
    import importlib

    import itmkit.course as surface

    for name, module_name in surface.NOTEBOOK_NAMES.items():
        module = importlib.import_module(module_name)
        expected = module if module_name.rpartition(".")[2] == name else getattr(module, name)
        assert getattr(surface, name) is expected, name
        assert name in dir(surface) and name in surface.__all__ and f"``{name}``: ``{module_name}``" in surface.__doc__
    from itmkit.course import run_course  # the documented entry point

    assert run_course is runner.run_course
    with pytest.raises(AttributeError, match="no attribute 'trian'; notebook names: .*'train'"):
        surface.trian  # noqa: B018


def test_list_markdown_prints_the_notebook_table(toy_course, capsys):
    assert runner.main(["list", "--markdown", "--notebooks", str(toy_course)]) == 0
    assert capsys.readouterr().out == (
        "| notebook | title |\n| --- | --- |\n| `00_fails` | A test notebook |\n| `01_reports` | A test notebook |\n"
    )


# --- issue 14 §4, §7: the runner's own mistakes are one line; kernels get the thread setting ------
def test_each_kernel_gets_the_thread_setting(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _write_notebook(folder / "00_threads.ipynb", [
        "import os\nimport torch\nfrom itmkit.course import write_metrics\nfrom itmkit.runtime import configure_threads",
        "write_metrics(out_dir, {'env': os.environ.get('ITMKIT_THREADS'), 'omp': os.environ.get('OMP_NUM_THREADS'),\n"
        "                        'torch_threads': torch.get_num_threads(), 'configured': configure_threads()})",
    ])  # fmt: skip
    monkeypatch.setenv("ITMKIT_THREADS", "2")  # the runner's own environment: the flag wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    frame = runner.run_course(None, out=tmp_path / "out", notebooks_dir=folder, progress=False, threads=1)
    row = frame.set_index("notebook").loc["00_threads"]
    assert row["status"] == "ok", row["error"]
    assert row["env"] == "1" and row["omp"] == "1" and row["torch_threads"] == 1 and row["configured"] == 1
    assert os.environ["ITMKIT_THREADS"] == "2" and os.environ["OMP_NUM_THREADS"] == "2"  # restored


def test_runner_mistakes_are_one_line(toy_course, tmp_path, capsys):
    rc = runner.main(["run", "nope", "--out", str(tmp_path), "--notebooks", str(toy_course)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "notebook 'nope'" in err and "00_fails" in err
    rc = runner.main(["run", "01", "--threads", "0", "--out", str(tmp_path), "--notebooks", str(toy_course)])
    err = capsys.readouterr().err
    assert rc == 2 and "threads: expected a positive integer" in err and len(err.strip().splitlines()) == 1


def test_course_run_without_papermill_says_what_to_install(toy_course, tmp_path):
    import subprocess

    script = ("import sys; sys.modules['papermill'] = None\n"  # as if the course extra were not installed
              "from itmkit.course.runner import main\n"
              f"raise SystemExit(main(['run', '01', '--out', {str(tmp_path)!r}, '--notebooks', {str(toy_course)!r}]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs papermill" in lines[0] and "pip install -e '.[course]'" in lines[0]
