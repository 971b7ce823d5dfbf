"""Figures of a multi-seed study: spread per method, paired differences, ranking flips, and the
fine-grained hard-negative scores (data from :mod:`itmkit.study`, :mod:`itmkit.evaluate.paired`
and :mod:`itmkit.evaluate.hard_negatives`).

Every function returns the :class:`matplotlib.figure.Figure` (titled, axes labelled) and, given
``save=path``, writes it as well.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from itmkit.figures.curves import finish_figure


def seed_spread_figure(runs: pd.DataFrame, summary: pd.DataFrame, metric: str = "rsum",
                       title: str | None = None, save: str | Path | None = None) -> Figure:
    """One point per run (seed), per method, with the mean and its 95 % t-interval over seeds.

    ``runs``/``summary``: :class:`itmkit.study.StudyResult` tables.
    """
    stats = summary[summary["metric"] == metric].set_index("method")
    order = list(stats["mean"].sort_values(ascending=False).index)
    fig, ax = plt.subplots(figsize=(1.6 * len(order) + 3, 4))
    hue = "data_seed" if "data_seed" in runs and runs["data_seed"].nunique() > 1 else "seed"
    sns.stripplot(data=runs, x="method", y=metric, hue=hue, order=order, jitter=0.08, size=7, ax=ax, palette="crest")
    for x, method in enumerate(order):
        row = stats.loc[method]
        ax.errorbar(x + 0.25, row["mean"], yerr=None if np.isnan(row["ci_low"]) else
                    [[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]],
                    fmt="D", color="black", capsize=5, label="mean, 95 % interval" if x == 0 else None)  # fmt: skip
    ax.set(xlabel="method", ylabel=f"test {metric}")
    ax.legend(title=None, fontsize=8, loc="best")
    return finish_figure(fig, title or f"{metric} per seed: the spread the same recipe gives", save)


def paired_difference_figure(differences: np.ndarray, observed: float, ci: tuple[float, float], names: tuple[str, str],
                             metric: str = "rsum", title: str | None = None, save: str | Path | None = None) -> Figure:
    """The bootstrap distribution of the mean per-image difference ``a - b`` with its 95 %
    interval and zero marked (``differences`` from :func:`itmkit.evaluate.paired.bootstrap_differences`)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.histplot(differences, bins=40, stat="density", color="tab:blue", alpha=0.5, ax=ax)
    ax.axvline(observed, color="tab:blue", lw=2, label=f"observed {observed:+.1f}")
    ax.axvspan(ci[0], ci[1], color="tab:blue", alpha=0.12, label=f"95 % interval [{ci[0]:+.1f}, {ci[1]:+.1f}]")
    ax.axvline(0.0, color="black", ls="--", lw=1, label="no difference")
    ax.set(xlabel=f"{names[0]} - {names[1]}: mean per-image {metric} difference", ylabel="bootstrap density")
    ax.legend(fontsize=8)
    return finish_figure(fig, title or f"{names[0]} vs {names[1]} on the same test queries", save)


def ranking_figure(ranks: pd.DataFrame, title: str | None = None, save: str | Path | None = None) -> Figure:
    """Heat map of each method's rank per seed (``ranks`` from :func:`itmkit.study.method_ranks`);
    seeds whose order differs from the order of the means are marked 'flipped'."""
    keys = [k for k in ("seed", "data_seed") if k in ranks]
    label = ranks[keys].astype(str).agg("/".join, axis=1) if len(keys) > 1 else ranks[keys[0]].astype(str)
    table = ranks.assign(run=label).pivot_table(index="method", columns="run", values="rank", aggfunc="first")
    table = table.loc[table.mean(axis=1).sort_values().index]
    flipped = ranks.assign(run=label).groupby("run")["flipped"].first()
    fig, ax = plt.subplots(figsize=(1.0 * table.shape[1] + 3, 0.55 * table.shape[0] + 1.8))
    sns.heatmap(table, annot=True, fmt=".0f", cmap="crest_r", cbar=False, ax=ax, linewidths=0.5)
    ax.set_xticklabels([f"{c}\n{'flipped' if flipped[c] else ''}" for c in table.columns], rotation=0)
    ax.set(xlabel="seed" + (" / data seed" if len(keys) > 1 else ""), ylabel="method (best mean on top)")
    return finish_figure(fig, title or f"rank per seed: {int(flipped.sum())} of {len(flipped)} seeds reorder the methods", save)


def hard_negative_figure(diagnostics: pd.DataFrame, score: str = "group", title: str | None = None,
                         save: str | Path | None = None) -> Figure:
    """Text / image / group score per swap kind and method (mean over seeds, with the seeds as
    error bars when there are several) against the chance level of that score.

    ``diagnostics``: :class:`itmkit.study.StudyResult`'s table, or rows of
    :func:`itmkit.evaluate.hard_negatives.swap_table` with a ``method`` column.
    """
    data = diagnostics[diagnostics["kind"] != "all"]
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.barplot(data=data, x="kind", y=score, hue="method", errorbar=("sd", 1) if "seed" in data and data["seed"].nunique() > 1 else None,
                ax=ax, palette="tab10")  # fmt: skip
    chance = float(data[f"chance_{score}"].iloc[0]) if len(data) else float("nan")
    ax.axhline(chance, color="black", ls="--", lw=1, label=f"chance {chance:.1f} %")
    ax.set(xlabel="what the swap tests", ylabel=f"{score} score (%)", ylim=(0, 100))
    ax.legend(fontsize=8, ncols=2)
    return finish_figure(fig, title or f"hard-negative pairs: {score} score per swap kind", save)
