"""Charts of numbers: training curves, recall bars and tables, similarity matrices, rank
histograms, caption lengths (seaborn).

Every function returns the :class:`matplotlib.figure.Figure` (titled, axes labelled) and, given
``save=path``, also writes it (PNG at 120 dpi). Pictures drawn on images live in
:mod:`itmkit.figures.images`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from itmkit.evaluate.metrics import i2t_ranks, t2i_ranks

RECALL_COLUMNS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
RECALL_LABELS = {c: f"{c[:3]} R@{c.split('_r')[1]}" for c in RECALL_COLUMNS}


def finish_figure(fig: Figure, title: str, save: str | Path | None) -> Figure:
    """Title, tight layout and (given ``save``) a PNG at 120 dpi: how every chart here ends."""
    fig.suptitle(title)
    fig.tight_layout()
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=120)
    return fig


def plot_training_curves(log: pd.DataFrame, steps: pd.DataFrame | None = None, title: str = "Training curves",
                         save: str | Path | None = None) -> Figure:
    """Loss (left) and dev R@1 / rsum (right) against the epoch, from a run's ``log.csv``.

    ``steps`` (a run's ``steps.csv``) adds the per-step loss. A ``run`` column in ``log``
    draws one line per run (compare methods or seeds).
    """
    missing = {"epoch", "loss", "rsum"} - set(log.columns)
    if missing:
        raise ValueError(f"plot_training_curves log: expected columns epoch, loss, rsum; missing {sorted(missing)}")
    hue = "run" if "run" in log.columns else None
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4))
    if steps is not None and not steps.empty:
        per_epoch = steps["step"].max() / max(1, steps["epoch"].max())
        ax_loss.plot(steps["step"] / per_epoch, steps["loss"], color="0.7", lw=1, label="per step")
    sns.lineplot(data=log, x="epoch", y="loss", hue=hue, marker="o", ax=ax_loss,
                 label=None if hue else "epoch mean")  # fmt: skip
    ax_loss.set(xlabel="epoch", ylabel="hinge loss (sum over batch)", title="training loss")
    long = log.melt(id_vars=[c for c in ("epoch", "run") if c in log.columns],
                    value_vars=[c for c in ("i2t_r1", "t2i_r1") if c in log.columns], var_name="metric", value_name="R@1")  # fmt: skip
    if not long.empty:
        sns.lineplot(data=long, x="epoch", y="R@1", hue="metric", style=hue, marker="o", ax=ax_dev)
    ax_dev.set(xlabel="epoch", ylabel="dev R@1 (%)", title="dev recall (rsum on the right axis)")
    ax_rsum = ax_dev.twinx()
    sns.lineplot(data=log, x="epoch", y="rsum", hue=hue, color="black", ls="--", ax=ax_rsum, legend=False)
    ax_rsum.set_ylabel("dev rsum")
    return finish_figure(fig, title, save)


def recall_table(metrics: pd.DataFrame, label: str | None = None) -> pd.DataFrame:
    """Long table ``(model, metric, recall)`` from rows holding ``i2t_r1 .. t2i_r10``.

    The model label is ``label``, else a ``method`` / ``model`` column, else the ``protocol``.
    Missing recalls (NaN, e.g. reported rows without R@10) are dropped.
    """
    frame = metrics.copy()
    if label is not None:
        frame["model"] = label
    elif "model" not in frame.columns:
        frame["model"] = frame["method"] if "method" in frame.columns else frame.get("protocol", "model")
    present = [c for c in RECALL_COLUMNS if c in frame.columns]
    if not present:
        raise ValueError(f"recall table: expected some of the columns {RECALL_COLUMNS}, found {list(frame.columns)}")
    long = frame.melt(id_vars=["model"], value_vars=present, var_name="metric", value_name="recall").dropna()
    long["metric"] = long["metric"].map(RECALL_LABELS)
    return long


def plot_recalls(metrics: pd.DataFrame, reported: pd.DataFrame | None = None, title: str = "Retrieval recall",
                 save: str | Path | None = None) -> Figure:
    """Grouped bars: i2t and t2i R@1/5/10 (x), one bar per model (hue).

    ``metrics``: summary rows (one per model; a ``method`` or ``model`` column names them).
    ``reported``: the papers' rows in the same columns, shown as ``<name> (paper)`` bars.
    """
    long = recall_table(metrics)
    if reported is not None:
        paper = recall_table(reported)
        paper["model"] = paper["model"].astype(str) + " (paper)"
        long = pd.concat([long, paper], ignore_index=True)
    order = [RECALL_LABELS[c] for c in RECALL_COLUMNS if RECALL_LABELS[c] in set(long["metric"])]
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(order) * max(1, long["model"].nunique()) ** 0.5), 4.2))
    sns.barplot(data=long, x="metric", y="recall", hue="model", order=order, ax=ax)
    ax.set(xlabel="direction and K", ylabel="recall (%)", ylim=(0, 100))
    ax.legend(title="model", fontsize="small")
    return finish_figure(fig, title, save)


def plot_similarity_matrix(sims, captions_per_image: int = 5, max_images: int = 20,
                           title: str = "Similarity matrix", save: str | Path | None = None) -> Figure:
    """Heatmap of ``S [n_img, n_cap]``'s top-left ``max_images`` x ``5 * max_images`` block;
    each image's own captions are outlined (the positives lie on a staircase diagonal)."""
    S = np.asarray(sims)
    if S.ndim != 2:
        raise ValueError(f"plot_similarity_matrix: expected [n_img, n_cap], found shape {S.shape}")
    n = min(max_images, S.shape[0])
    block = S[:n, : n * captions_per_image]
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.12 * block.shape[1]), min(8, 1.5 + 0.3 * n)))
    sns.heatmap(block, cmap="viridis", ax=ax, cbar_kws={"label": "score"}, xticklabels=False, yticklabels=False)
    for i in range(n):
        ax.add_patch(plt.Rectangle((i * captions_per_image, i), captions_per_image, 1, fill=False, ec="white", lw=1))
    ax.set(xlabel=f"caption (first {block.shape[1]})", ylabel=f"image (first {n})")
    return finish_figure(fig, title, save)


def plot_rank_histogram(sims=None, captions_per_image: int = 5, ranks: Mapping[str, np.ndarray] | None = None,
                        max_rank: int = 50, title: str = "Rank of the correct match",
                        save: str | Path | None = None) -> Figure:
    """Histograms of 1-based ranks (i2t: best own caption, t2i: own image; §C.1).

    Give ``sims`` (ranks are computed) or ``ranks={"i2t": [...], "t2i": [...]}`` (0-based).
    Ranks above ``max_rank`` are gathered in the last bin.
    """
    if ranks is None:
        if sims is None:
            raise ValueError("plot_rank_histogram: give sims or ranks")
        ranks = {"i2t": i2t_ranks(sims, captions_per_image), "t2i": t2i_ranks(sims, captions_per_image)}
    fig, axes = plt.subplots(1, len(ranks), figsize=(5 * len(ranks), 3.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], ranks.items()):
        shown = np.minimum(np.asarray(values) + 1, max_rank)
        sns.histplot(shown, bins=np.arange(0.5, max_rank + 1.5, 1), ax=ax)
        ax.set(xlabel=f"rank (1 = top; {max_rank} = {max_rank} or worse)", ylabel="queries",
               title=f"{name}: R@1 {100 * np.mean(shown == 1):.1f}%")  # fmt: skip
    return finish_figure(fig, title, save)


def plot_caption_lengths(captions: Sequence[str] | Mapping[str, Sequence[str]], tokenize=None,
                         title: str = "Caption length", save: str | Path | None = None) -> Figure:
    """Histogram of caption lengths in tokens (``tokenize``: str -> list, default whitespace);
    a mapping ``{name: captions}`` (e.g. splits or data sets) overlays one histogram per name."""
    groups = captions if isinstance(captions, Mapping) else {"captions": captions}
    split_words = tokenize or str.split
    frame = pd.DataFrame([{"set": name, "tokens": len(split_words(c))} for name, caps in groups.items() for c in caps])
    if frame.empty:
        raise ValueError("plot_caption_lengths: no captions")
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.histplot(data=frame, x="tokens", hue="set" if len(groups) > 1 else None, discrete=True,
                 stat="percent", common_norm=False, element="step", ax=ax)  # fmt: skip
    ax.set(xlabel="tokens per caption", ylabel="captions (%)")
    return finish_figure(fig, title, save)
