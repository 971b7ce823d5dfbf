"""Multi-seed studies: tables, resume after a kill without retraining, ranks, reported gaps, figures."""

import math

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest

from itmkit.evaluate.metrics import recall_metrics
from itmkit.study import (
    StudyPlan,
    compare_methods,
    flip_rate,
    mean_interval,
    method_ranks,
    reported_gaps,
    run_study,
    summarise,
)
from itmkit.train.trainer import train

PLAN = dict(methods=["vse_infty", "scan"], seeds=[0, 1], preset="smoke")


class Killed(RuntimeError):
    pass


def test_mean_interval_by_hand():
    mean, std, low, high = mean_interval([500.0, 510.0, 520.0])
    assert (mean, std) == (510.0, 10.0)
    # t(0.975, 2) = 4.302653; half width = 4.302653 * 10 / sqrt(3)
    assert high - mean == pytest.approx(4.302653 * 10 / math.sqrt(3), rel=1e-6) and mean - low == pytest.approx(high - mean)
    assert mean_interval([7.0])[1] == 0.0 and math.isnan(mean_interval([7.0])[2])


def test_summary_and_ranks_on_a_constructed_table():
    runs = pd.DataFrame({"method": ["a", "b", "a", "b", "a", "b"], "seed": [0, 0, 1, 1, 2, 2], "data_seed": 0,
                         "rsum": [500.0, 490.0, 480.0, 495.0, 510.0, 500.0]})  # fmt: skip
    summary = summarise(runs, ["rsum"]).set_index("method")
    assert summary.loc["a", "mean"] == pytest.approx(496.6666667) and summary.loc["a", "n"] == 3
    assert summary.loc["b", "std"] == pytest.approx(np.std([490, 495, 500], ddof=1))
    ranks = method_ranks(runs)
    # means: a 496.7 > b 495.0; seed 1 alone puts b first
    assert ranks[(ranks.seed == 1) & (ranks.method == "b")]["rank"].item() == 1
    assert ranks[(ranks.seed == 0) & (ranks.method == "a")]["rank"].item() == 1
    assert ranks.groupby("seed")["flipped"].first().tolist() == [False, True, False]
    assert flip_rate(runs) == pytest.approx(1 / 3)


def test_ties_are_not_flips():
    runs = pd.DataFrame({"method": ["a", "b", "c", "b", "a", "c"], "seed": [0, 0, 0, 1, 1, 1], "data_seed": 0,
                         "rsum": [500.0, 490.0, 480.0, 495.0, 495.0, 470.0]})  # fmt: skip
    ranks = method_ranks(runs)
    # seed 1 ties a and b (the means order a > b): a tie, not a flip, whatever order it is listed in
    assert ranks.groupby("seed")["flipped"].first().tolist() == [False, False]
    assert ranks[(ranks.seed == 1) & ranks.method.isin(["a", "b"])]["rank"].tolist() == [1, 1]
    swapped = runs.copy()
    swapped.loc[3, "rsum"] = 496.0  # b strictly above a in seed 1: a flip
    assert method_ranks(swapped).groupby("seed")["flipped"].first().tolist() == [False, True]


def test_study_reuses_the_course_notebooks_shared_runs(tmp_path, monkeypatch):
    from itmkit.course import comparison_run, shared_runs_dir
    import itmkit.study as study_module

    course = tmp_path / "course"
    notebook_run = comparison_run("vse_infty", "smoke", course / "03_vse_infty", seed=1)
    stamp = (notebook_run.out_dir / "model_best.pt").stat().st_mtime_ns
    trained = []

    def counting(cfg, run_dir, **kwargs):
        trained.append((run_dir, (run_dir / "result.json").is_file()))
        return train(cfg, run_dir, **kwargs)

    plan = StudyPlan(methods=["vse_infty"], seeds=[1, 2], preset="smoke")
    study = run_study(plan, tmp_path / "study", progress=False, train_fn=counting, shared_runs=shared_runs_dir(course / "03_vse_infty"))
    assert trained[0] == (notebook_run.out_dir, True)  # the notebook's finished run, found by its settings
    assert (notebook_run.out_dir / "model_best.pt").stat().st_mtime_ns == stamp  # and not retrained
    assert trained[1][0].parent == notebook_run.out_dir.parent and trained[1][0].name.startswith("vse_infty-smoke-seed2-")
    assert not (tmp_path / "study" / "vse_infty").exists()
    assert study.runs["collapsed"].tolist() == [False, False] and study.runs["nearly_collapsed"].tolist() == [False, False]
    assert (study.runs["score_spread"] > 1e-3).all()
    np.testing.assert_array_equal(np.asarray(study.similarity("vse_infty", 2)),
                                  np.load(trained[1][0] / "study" / "sims.npy"))

    assert study.runs["squeezed_dev_epochs"].tolist() == [0, 0]
    log = pd.read_csv(notebook_run.out_dir / "log.csv")
    log.loc[len(log) - 1, "score_spread"] = 1.7e-5  # as SGRAF's seed 2 squeezed its dev scores late
    log.to_csv(notebook_run.out_dir / "log.csv", index=False)
    again = run_study(plan, tmp_path / "study", progress=False, shared_runs=shared_runs_dir(course / "03_vse_infty"))
    assert again.runs["squeezed_dev_epochs"].tolist() == [1, 0]

    # a collapsed run is marked in its row, not silently averaged
    constant = np.full((16, 80), 0.5, dtype=np.float32)
    monkeypatch.setattr(study_module, "_test_similarity", lambda *args, **kwargs: constant)
    flat = run_study(plan, tmp_path / "study2", progress=False, shared_runs=shared_runs_dir(course / "03_vse_infty"))
    assert flat.runs["collapsed"].tolist() == [True, True] and (flat.runs["rsum"] == 0).all()
    # squeezed but not flat (SGRAF's collapsed seed had a relative spread of 1.7e-5): marked as nearly collapsed
    squeezed = 1.0 + 1.7e-5 * np.random.default_rng(0).standard_normal((16, 80)).astype(np.float64)
    monkeypatch.setattr(study_module, "_test_similarity", lambda *args, **kwargs: squeezed)
    near = run_study(plan, tmp_path / "study3", progress=False, shared_runs=shared_runs_dir(course / "03_vse_infty"))
    assert near.runs["collapsed"].tolist() == [False, False] and near.runs["nearly_collapsed"].tolist() == [True, True]


def test_study_tables_and_resume_after_a_kill(tmp_path):
    out = tmp_path / "study"
    calls = []

    def killed_on_second_run(cfg, run_dir, **kwargs):
        calls.append(run_dir)
        if len(calls) == 2:  # the second run dies one step into its second epoch, like a kill
            def die(state):
                if state.epoch >= 1 and state.step_in_epoch >= 1:
                    raise Killed("killed")
            return train(cfg, run_dir, on_step=die, **kwargs)
        return train(cfg, run_dir, **kwargs)

    plan = StudyPlan(**PLAN)
    with pytest.raises(Killed):
        run_study(plan, out, progress=False, train_fn=killed_on_second_run)
    first = out / "vse_infty" / "seed0"
    finished = {p: p.stat().st_mtime_ns for p in [first / "model_best.pt", first / "study" / "sims.npy"]}
    assert (out / "scan" / "seed0" / "checkpoint.pt").is_file() and not (out / "scan" / "seed0" / "result.json").is_file()

    trained = []

    def counting(cfg, run_dir, **kwargs):
        trained.append((run_dir, (run_dir / "result.json").is_file()))
        return train(cfg, run_dir, **kwargs)

    study = run_study(plan, out, progress=False, train_fn=counting)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "a finished run was retrained or re-scored"
    assert trained[0] == (first, True)
    assert len(study.runs) == 4 and set(study.runs["method"]) == {"vse_infty", "scan"}

    # the resumed study equals an uninterrupted one
    clean = run_study(plan, tmp_path / "clean", progress=False)
    columns = ["method", "seed", "rsum", "i2t_r1", "t2i_r1", "group_all"]
    pd.testing.assert_frame_equal(study.runs[columns], clean.runs[columns])

    # each run's row is the metrics of its own cached matrix
    row = study.runs.set_index(["method", "seed"]).loc[("scan", 1)]
    assert row["rsum"] == pytest.approx(recall_metrics(np.asarray(study.similarity("scan", 1)))["rsum"])
    for name in ("study_runs.csv", "study_summary.csv", "study_diagnostics.csv"):
        assert (out / name).is_file()
    summary = study.summary.set_index(["method", "metric"])
    assert summary.loc[("scan", "rsum"), "n"] == 2
    assert summary.loc[("scan", "rsum"), "mean"] == pytest.approx(study.runs[study.runs.method == "scan"]["rsum"].mean())
    assert set(study.diagnostics["kind"]) >= {"all"}

    table = compare_methods(study, [("scan", "vse_infty")], n_resamples=499)
    assert list(table["scope"]) == ["seed0", "seed1", "across seeds"]
    assert "p_adjusted" in table and (table["p_adjusted"] >= table["p_value"] - 1e-12).all()

    from itmkit.figures import noise

    noise.seed_spread_figure(study.runs, study.summary, save=tmp_path / "spread.png")
    noise.ranking_figure(method_ranks(study.runs), save=tmp_path / "ranks.png")
    noise.hard_negative_figure(study.diagnostics, save=tmp_path / "hard.png")
    noise.paired_difference_figure(np.array([1.0, 2.0, 3.0]), 2.0, (1.0, 3.0), ("scan", "vse_infty"), save=tmp_path / "d.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("spread.png", "ranks.png", "hard.png", "d.png"))


def test_unknown_method_fails_before_training(tmp_path):
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        StudyPlan(methods=["vse_infty", "nope"], seeds=[0])


def test_reported_gaps_in_units_of_seed_spread():
    summary = pd.DataFrame({"method": ["scan", "sgraf"], "metric": ["rsum", "rsum"], "n": [3, 3],
                            "mean": [500.0, 510.0], "std": [3.0, 4.0], "ci_low": 0.0, "ci_high": 0.0})  # fmt: skip
    gaps = reported_gaps(summary)
    spread = math.sqrt((9 + 16) / 2)
    row = gaps[(gaps.method == "sgraf") & (gaps.dataset == "f30k") & (gaps.ensemble == "single")].iloc[0]
    assert row["baseline"] == "scan" and row["seed_sd"] == pytest.approx(spread)
    assert row["gap"] == pytest.approx(row["rsum"] - row["rsum_baseline"])
    assert row["gap_in_sd"] == pytest.approx(row["gap"] / spread)


def test_cli_study_and_diagnose(tmp_path, capsys):
    from itmkit.cli import main

    out = tmp_path / "cli_study"
    assert main(["study", "--methods", "vse_infty", "--seeds", "0", "1", "--preset", "smoke", "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "rsum" in printed and (out / "study_runs.csv").is_file()
    runs = pd.read_csv(out / "study_runs.csv")
    assert list(runs["seed"]) == [0, 1]
    assert main(["diagnose", str(out / "vse_infty" / "seed0"), "--quiet"]) == 0
    assert "attribute binding" in capsys.readouterr().out
    assert main(["study", "--methods", "vse_infty", "--seeds", "0", "--preset", "smoke", "--out", str(out),
                 "--compare", "vse_infty:scan", "--quiet"]) == 1  # fmt: skip
    assert "--compare 'vse_infty:scan'" in capsys.readouterr().err
