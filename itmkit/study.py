"""Multi-seed studies: how much of a gap between methods is noise?

The field's reproducibility study (Wang et al., SIGIR 2022, "Where does the performance
improvement come from?") found that much of the reported progress between these methods lies
within seed and feature noise. A study trains ``methods x seeds`` (x embedded-set seeds) with one
preset, then tables each run's recalls and its fine-grained hard-negative scores, and the spread
per method (mean, standard deviation, 95 % t-interval over seeds).

Runs live in ``<out>/<method>/seed<s>[-data<d>]/`` and are ordinary trainer folders: a finished
run is reused as it is, an unfinished one resumes where it stopped (the trainer's exact resume),
and each run's test similarity matrix is cached in ``<run>/study/sims.npy`` (written atomically),
so a study killed at any point and started again retrains nothing it had finished.

Files written (atomically) to ``<out>``: ``study_runs.csv`` (one row per run),
``study_summary.csv`` (per method and metric), ``study_diagnostics.csv`` (per run and swap kind).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from itmkit.config import replace_nested
from itmkit.data.precomp import CAPTIONS_PER_IMAGE
from itmkit.evaluate.atomic_write import write_csv
from itmkit.evaluate.collapse import NEAR_COLLAPSE_RTOL, score_spread
from itmkit.evaluate.hard_negatives import swap_pairs, swap_table
from itmkit.evaluate.metrics import METRIC_NAMES, recall_metrics
from itmkit.evaluate.paired import PairedResult, paired_query_test, paired_seed_test, results_table
from itmkit.evaluate.similarity_file import load_similarity
from itmkit.methods.registry import get_method
from itmkit.reported import reported_results

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")

# The method each paper builds on and reports its gain over (from the specs' "builds on"):
# used only to place a reported gap beside our seed spread.
PAPER_BASELINE = {
    "sgraf": "scan",
    "chan": "scan",
    "esl": "vse_infty",
    "hrem": "vse_infty",
    "lhsc": "sgraf",
    "cefg": "sgraf",
    "aahr": "hrem",
}


@dataclass
class StudyPlan:
    """What to train: every method with every seed (and every embedded-set seed).

    Attributes:
        methods: registry names.
        seeds: training seeds (``train.seed``).
        preset: the preset of every method (``smoke``, ``course``, ``paper-...``).
        data_seeds: seeds of the embedded data set (``data.embedded_seed``); ``None`` keeps each
            preset's. Ignored (must be ``None``) with ``data_dir``.
        data_dir: a precomp folder instead of the embedded set.
        overrides: dotted settings applied to every run (``{"train.epochs": 2}``).
    """

    methods: Sequence[str]
    seeds: Sequence[int] = (0, 1, 2)
    preset: str = "course"
    data_seeds: Sequence[int] | None = None
    data_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("StudyPlan.methods: expected at least one method, found none")
        if not self.seeds:
            raise ValueError("StudyPlan.seeds: expected at least one seed, found none")
        if self.data_dir is not None and self.data_seeds is not None:
            raise ValueError("StudyPlan.data_seeds: only for the embedded set, found data_dir as well")
        for name in self.methods:
            get_method(name)  # unknown names fail here, before anything trains

    def runs(self) -> list[tuple[str, int, int | None]]:
        data_seeds = list(self.data_seeds) if self.data_seeds is not None else [None]
        return [(m, s, d) for d in data_seeds for s in self.seeds for m in self.methods]


def run_dir_name(seed: int, data_seed: int | None) -> str:
    return f"seed{seed}" if data_seed is None else f"seed{seed}-data{data_seed}"


def study_run_config(plan: StudyPlan, method: str, seed: int, data_seed: int | None):
    """The :class:`RunConfig` of one run of ``plan``."""
    cfg = get_method(method).preset(plan.preset)
    overrides = {"train.seed": seed, **plan.overrides}
    if plan.data_dir is not None:
        overrides["data.data_dir"] = str(plan.data_dir)
    if data_seed is not None:
        overrides["data.embedded_seed"] = data_seed
    return replace_nested(cfg, overrides)


def _test_similarity(run_dir: Path, data_dir: Path, progress: bool, device) -> np.ndarray:
    """The run's test matrix, from ``<run>/study/sims.npy`` or computed once (atomically)."""
    cached = run_dir / "study" / "sims.npy"
    if cached.is_file():
        return np.asarray(load_similarity(cached))
    from itmkit.evaluate.evaluator import evaluate_model
    from itmkit.runs import load_run

    model, _, pipeline = load_run(run_dir, device=device)
    evaluate_model(model, data_dir, "test", pipeline=pipeline, protocol="test", out_dir=run_dir / "study", progress=progress)
    return np.asarray(load_similarity(cached))


@dataclass
class StudyResult:
    """A study's tables and where its runs are.

    Attributes:
        runs: one row per run: ``method``, ``seed``, ``data_seed``, the recalls and rsum,
            ``train_seconds``, ``run_dir``, and the group score per swap kind (``group_colour``...).
        summary: per method and metric: ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high``.
        diagnostics: per run and swap kind: ``pairs``, ``text``, ``image``, ``group`` and chance.
    """

    out: Path
    plan: StudyPlan
    runs: pd.DataFrame
    summary: pd.DataFrame
    diagnostics: pd.DataFrame

    def similarity(self, method: str, seed: int, data_seed: int | None = None) -> np.ndarray:
        """The cached test matrix of one run (memory-mapped)."""
        rows = self.runs[(self.runs["method"] == method) & (self.runs["seed"] == seed)]
        if data_seed is not None:
            rows = rows[rows["data_seed"] == data_seed]
        if len(rows) != 1:
            raise KeyError(f"study {self.out}: expected one run of {method} seed {seed} data seed {data_seed}, found {len(rows)}")
        return load_similarity(Path(rows["run_dir"].iloc[0]) / "study" / "sims.npy")


def _squeezed_epochs(run_dir: Path) -> int:
    """Epochs of the run's ``log.csv`` whose dev scores were (nearly) collapsed: relative spread at
    most :data:`~itmkit.evaluate.collapse.NEAR_COLLAPSE_RTOL` (0 without a log)."""
    log = Path(run_dir) / "log.csv"
    if not log.is_file():
        return 0
    spread = pd.read_csv(log).get("score_spread")
    return 0 if spread is None else int((spread <= NEAR_COLLAPSE_RTOL).sum())


def run_study(
    plan: StudyPlan,
    out: str | Path,
    progress: bool = True,
    device: str | None = None,
    train_fn: Callable[..., Any] | None = None,
    shared_runs: str | Path | None = None,
) -> StudyResult:
    """Train (or reuse, or resume) every run of ``plan`` under ``out`` and write the tables.

    ``train_fn`` defaults to :func:`itmkit.train.trainer.train` (tests pass a wrapper).
    ``shared_runs``: keep the runs in this folder under :func:`itmkit.runs.shared_run_dir`'s
    names instead of ``<out>/<method>/seed<s>``, the folders the course notebooks'
    ``comparison_run`` uses (``<course out>/_shared_runs``): a study after a course run reuses the
    runs the notebooks trained with the same settings, and the notebooks reuse the study's.
    """
    from itmkit.runs import shared_run_dir
    from itmkit.train.trainer import resolve_data_dir, train

    train_fn = train_fn or train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, diag_rows = [], []
    pairs_cache: dict[Path, pd.DataFrame | None] = {}
    bar = tqdm(plan.runs(), desc="study", unit="run", disable=not progress)
    for method, seed, data_seed in bar:
        bar.set_postfix_str(f"{method} {run_dir_name(seed, data_seed)}")
        cfg = study_run_config(plan, method, seed, data_seed)
        if shared_runs is not None:
            run_dir = shared_run_dir(shared_runs, method, cfg)
        else:
            run_dir = out / method / run_dir_name(seed, data_seed)
        result = train_fn(cfg, run_dir, resume=True, progress=False, device=device)
        data_dir = resolve_data_dir(cfg)
        sims = _test_similarity(run_dir, data_dir, progress=False, device=device)
        metrics = recall_metrics(sims, CAPTIONS_PER_IMAGE)
        row = {"method": method, "seed": seed, "data_seed": cfg.data.embedded_seed if plan.data_dir is None else None}
        row.update({k: metrics[k] for k in METRIC_NAMES})
        row["train_seconds"] = float(getattr(result, "seconds", float("nan")))
        row["run_dir"] = str(run_dir)
        # a collapsed run (every score alike) must show, not just drag the mean down
        spread = score_spread(sims, source=f"{run_dir}/study/sims.npy")
        row["score_spread"] = spread.relative
        row["collapsed"] = bool(spread.collapsed)  # every pair scored alike (<= COLLAPSE_RTOL)
        row["nearly_collapsed"] = bool(spread.nearly_collapsed)  # squeezed (<= NEAR_COLLAPSE_RTOL)
        # a run can squeeze its dev scores late and keep an early best epoch (SGRAF's seed 2: relative
        # spread 1.7e-5 from epoch 4 on, test rsum 275 from epoch 3's weights): count those epochs too
        row["squeezed_dev_epochs"] = _squeezed_epochs(run_dir)
        if data_dir not in pairs_cache:
            pairs_cache[data_dir] = swap_pairs(data_dir, "test") if (data_dir / "scenes.json").is_file() else None
        pairs = pairs_cache[data_dir]
        if pairs is not None and len(pairs):
            table = swap_table(sims, pairs, source=f"{run_dir}/study/sims.npy")
            for _, t in table.iterrows():
                row[f"group_{t['kind']}"] = t["group"]
                diag_rows.append({"method": method, "seed": seed, "data_seed": row["data_seed"], **t.to_dict()})
        rows.append(row)
    runs = pd.DataFrame(rows)
    diagnostics = pd.DataFrame(diag_rows)
    summary = summarise(runs)
    write_csv(out / "study_runs.csv", runs)
    write_csv(out / "study_summary.csv", summary)
    if not diagnostics.empty:
        write_csv(out / "study_diagnostics.csv", diagnostics)
    return StudyResult(out, plan, runs, summary, diagnostics)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, std, low, high)``: the sample standard deviation (ddof 1) and a Student-t
    interval of the mean; one value gives ``std`` 0 and an interval of NaN (no spread measured)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if x.size == 1:
        return mean, 0.0, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * std / math.sqrt(x.size))
    return mean, std, mean - half, mean + half


def summarise(runs: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Per method and metric: ``n`` runs, ``mean``, ``std``, ``ci_low``, ``ci_high`` (95 %)."""
    if metrics is None:
        metrics = [m for m in RECALLS if m in runs] + sorted(c for c in runs if c.startswith("group_"))
    rows = []
    for method, part in runs.groupby("method", sort=False):
        for metric in metrics:
            values = part[metric].to_numpy(dtype=np.float64)
            mean, std, low, high = mean_interval(values)
            rows.append({"method": method, "metric": metric, "n": int((~np.isnan(values)).sum()),
                         "mean": mean, "std": std, "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(rows)


def compare_methods(
    study: StudyResult,
    pairs: Sequence[tuple[str, str]],
    metric: str = "rsum",
    n_resamples: int = 9999,
) -> pd.DataFrame:
    """Paired comparisons ``a - b`` for each pair of methods: one per-query test per seed (and data
    seed) and one test across seeds; ``p_adjusted`` (Benjamini–Hochberg) is over all rows."""
    results: list[PairedResult] = []
    scope: list[str] = []
    for a, b in pairs:
        per_seed_a, per_seed_b = [], []
        for _, seed, data_seed in [r for r in study.plan.runs() if r[0] == a]:
            result = paired_query_test(study.similarity(a, seed, data_seed), study.similarity(b, seed, data_seed),
                                       metric, (a, b), n_resamples=n_resamples, seed=seed)  # fmt: skip
            results.append(result)
            scope.append(run_dir_name(seed, data_seed))
            per_seed_a.append(result.mean_a)
            per_seed_b.append(result.mean_b)
        if len(per_seed_a) >= 2:
            results.append(paired_seed_test(per_seed_a, per_seed_b, metric, (a, b)))
            scope.append("across seeds")
    table = results_table(results)
    if not table.empty:
        table.insert(0, "scope", scope)
    return table


def seed_spread(summary: pd.DataFrame, metric: str = "rsum") -> float:
    """The pooled seed standard deviation of ``metric`` over the study's methods (root mean
    variance); NaN without any method run with two seeds."""
    part = summary[(summary["metric"] == metric) & (summary["n"] >= 2)]
    if part.empty:
        return math.nan
    return float(np.sqrt(np.mean(np.square(part["std"].to_numpy()))))


def reported_gaps(summary: pd.DataFrame, metric: str = "rsum") -> pd.DataFrame:
    """Each paper's reported rsum gain over the method it builds on, in units of our seed spread.

    For every method with a baseline (``PAPER_BASELINE``) and every dataset / protocol / text /
    single-or-ensemble setting that both report, the best reported rsum of each; ``gap`` is their
    difference, ``seed_sd`` the pooled seed standard deviation measured by this study, and
    ``gap_in_sd`` = gap / seed_sd ("this paper's gain is N standard deviations of our seed spread").
    Note: our spread is on the embedded set with the course recipes; the papers' gaps are on
    Flickr30K / COCO, so the ratio is a yardstick, not a test.
    """
    spread = seed_spread(summary, metric)
    reported = reported_results(with_numbers=True)
    recalls = reported[["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]]
    reported = reported.assign(total=recalls.sum(axis=1, min_count=6)).dropna(subset=["total"])
    keys = ["dataset", "protocol", "text", "ensemble"]
    best = reported.groupby(["method"] + keys, as_index=False)["total"].max()
    rows = []
    for method, baseline in PAPER_BASELINE.items():
        ours = best[best["method"] == method]
        theirs = best[best["method"] == baseline]
        merged = ours.merge(theirs, on=keys, suffixes=("", "_baseline"))
        for _, r in merged.iterrows():
            gap = float(r["total"] - r["total_baseline"])
            rows.append({"method": method, "baseline": baseline, **{k: r[k] for k in keys},
                         "rsum": float(r["total"]), "rsum_baseline": float(r["total_baseline"]), "gap": gap,
                         "seed_sd": spread, "gap_in_sd": gap / spread if spread and spread > 0 else math.nan})  # fmt: skip
    return pd.DataFrame(rows)


def method_ranks(runs: pd.DataFrame, metric: str = "rsum") -> pd.DataFrame:
    """Each method's rank (1 = best) within every seed (and data seed), from ``study.runs``.

    Columns: ``seed``, ``data_seed``, ``method``, ``value``, ``rank``, and ``flipped``: whether the
    seed puts some method strictly below one whose mean over seeds is lower (equal values in a
    seed are a tie, not a flip).
    """
    keys = [k for k in ("seed", "data_seed") if k in runs]
    means = runs.groupby("method")[metric].mean()
    overall = {m: r for r, m in enumerate(means.sort_values(ascending=False, kind="stable").index, start=1)}
    parts = []
    for _, part in runs.groupby(keys, dropna=False, sort=True):
        part = part[keys + ["method", metric]].rename(columns={metric: "value"}).copy()
        part["rank"] = part["value"].rank(ascending=False, method="min").astype(int)
        value = dict(zip(part["method"], part["value"]))
        # a flip is a pair this seed orders strictly against the means' order; a tie is no flip
        part["flipped"] = any(overall[a] < overall[b] and value[a] < value[b] for a in value for b in value)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def flip_rate(runs: pd.DataFrame, metric: str = "rsum") -> float:
    """The fraction of seeds whose ranking of the methods differs from the ranking of the means."""
    ranks = method_ranks(runs, metric)
    keys = [k for k in ("seed", "data_seed") if k in ranks]
    return float(ranks.groupby(keys, dropna=False)["flipped"].first().mean())


def diagnose_run(run_dir: str | Path, progress: bool = True, device: str | None = None) -> pd.DataFrame:
    """The hard-negative table (:func:`itmkit.evaluate.hard_negatives.swap_table`) of a trained
    run on its embedded test split; its test matrix is computed once and cached like a study's."""
    import json

    from itmkit.config import config_from_run_dict
    from itmkit.train.trainer import resolve_data_dir

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a run folder (no config.json)")
    cfg = config_from_run_dict(json.loads(config_path.read_text(encoding="utf-8")), str(config_path))
    data_dir = resolve_data_dir(cfg)
    sims = _test_similarity(run_dir, data_dir, progress, device)
    return swap_table(sims, swap_pairs(data_dir, "test"), source=str(run_dir / "study" / "sims.npy"))
