"""Figures of word-to-region alignment: soft assignment (attention) vs hard assignment (argmax),
and what CHAN's log-sum-exp pooling does with the per-word scores (chan.md §2, §3.3).

Drawing only: the numbers come from :mod:`itmkit.models.coding`
(:func:`~itmkit.models.coding.t2i_attention_weights`,
:func:`~itmkit.models.coding.hard_assignment_regions`,
:func:`~itmkit.models.coding.visual_hard_assignment`). Images are uint8 ``[H, W, 3]``, boxes
``[K, 4]`` ``x1, y1, x2, y2`` in pixels (precomp ``{split}_boxes.npy``). Every function returns
a :class:`matplotlib.figure.Figure` (or the axes it drew on).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SOFT_COLOUR = "#377eb8"  # attention (soft assignment)
HARD_COLOUR = "#e41a1c"  # argmax region (hard assignment)


def _check(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, boxes = np.asarray(image), np.asarray(boxes, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected shape [H, W, 3], found {image.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected shape [K, 4] (x1, y1, x2, y2), found {boxes.shape}")
    return image, boxes


def draw_region_weights(ax, image, boxes, weights, top: int = 3, colour: str = SOFT_COLOUR, title: str | None = None):
    """``image`` with every box shaded by its weight (``weights [K]``, e.g. one word's attention
    over the regions, summing to 1) and the ``top`` heaviest boxes outlined and labelled with
    their weight. Shading is absolute (opacity ``0.5 * weight``), so a spread-out attention
    looks faint and a peaked one solid."""
    from matplotlib.patches import Rectangle

    image, boxes = _check(image, boxes)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(boxes),):
        raise ValueError(f"weights: expected one per box ({len(boxes)},), found {weights.shape}")
    ax.imshow(image)
    order = np.argsort(-weights)
    for k in order[::-1]:  # heaviest drawn last, on top
        x1, y1, x2, y2 = boxes[k]
        shade = float(np.clip(weights[k], 0.0, 1.0))
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=colour, alpha=0.5 * shade, edgecolor="none"))
    for rank, k in enumerate(order[:top]):
        x1, y1, x2, y2 = boxes[k]
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.0 if rank == 0 else 1.0)
        )
        ax.text(x1 + 1, y1 + 1, f"{weights[k]:.2f}", color="white", fontsize=6, va="top",
                bbox={"facecolor": colour, "alpha": 0.85, "pad": 1, "linewidth": 0})
    _finish(ax, image, title)
    return ax


def draw_hard_region(ax, image, boxes, region: int, score: float | None = None, title: str | None = None):
    """``image`` with only box ``region`` outlined (the region a word is hard-assigned to)."""
    from matplotlib.patches import Rectangle

    image, boxes = _check(image, boxes)
    if not 0 <= int(region) < len(boxes):
        raise ValueError(f"region: expected an index in [0, {len(boxes)}), found {region}")
    ax.imshow(image)
    x1, y1, x2, y2 = boxes[int(region)]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=HARD_COLOUR, linewidth=2.2))
    if score is not None:
        ax.text(x1 + 1, y1 + 1, f"cos {score:.2f}", color="white", fontsize=6, va="top",
                bbox={"facecolor": HARD_COLOUR, "alpha": 0.85, "pad": 1, "linewidth": 0})
    _finish(ax, image, title)
    return ax


def _finish(ax, image, title):
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def soft_vs_hard_figure(
    image,
    boxes,
    words: Sequence[str],
    soft_weights,
    hard_regions,
    hard_scores=None,
    size: float = 2.0,
    suptitle: str | None = None,
):
    """Two rows, one column per word: top, the soft assignment (``soft_weights [L, K]``, each row
    a word's attention over the regions, SCAN t2i); bottom, the hard assignment
    (``hard_regions [L]``, CHAN's argmax region per word, with its cosine ``hard_scores [L]``)."""
    import matplotlib.pyplot as plt

    soft_weights = np.asarray(soft_weights, dtype=np.float64)
    hard_regions = np.asarray(hard_regions)
    n = len(words)
    if soft_weights.shape[0] != n or hard_regions.shape != (n,):
        raise ValueError(
            f"soft_vs_hard_figure: expected soft_weights [{n}, K] and hard_regions [{n}] for {n} words, "
            f"found {soft_weights.shape} and {hard_regions.shape}"
        )
    if n == 0:
        raise ValueError("soft_vs_hard_figure: expected at least one word, found none")
    fig, axes = plt.subplots(2, n, figsize=(size * n, 2 * size + 0.8), squeeze=False)
    for col, word in enumerate(words):
        draw_region_weights(axes[0, col], image, boxes, soft_weights[col], title=f"'{word}' (soft)")
        score = None if hard_scores is None else float(np.asarray(hard_scores)[col])
        draw_hard_region(axes[1, col], image, boxes, int(hard_regions[col]), score, title=f"'{word}' (hard)")
    axes[0, 0].text(-0.08, 0.5, "soft: attention", transform=axes[0, 0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=9, color=SOFT_COLOUR)
    axes[1, 0].text(-0.08, 0.5, "hard: argmax", transform=axes[1, 0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=9, color=HARD_COLOUR)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def lse_pooling_figure(word_scores, words: Sequence[str], beltas: Sequence[float] = (0.02, 0.1, 0.5), title: str | None = None):
    """What LSE pooling listens to. Left: each word's hard-assignment score ``word_scores [L]``
    with the max and the mean. Right: the weight each word gets in the pooled score's gradient,
    ``softmax(s / belta)`` (the derivative of ``logsumexp(s / belta)`` times ``belta``), for each
    ``belta`` next to mean pooling's uniform ``1/L``: small ``belta`` -> max pooling, large ->
    mean pooling."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    scores = np.asarray(word_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) != len(words):
        raise ValueError(f"lse_pooling_figure: expected one score per word ({len(words)}), found shape {scores.shape}")
    labels = [f"{i}:{w}" for i, w in enumerate(words)]  # index keeps repeated words apart
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    sns.barplot(x=labels, y=scores, color=HARD_COLOUR, ax=left)
    left.axhline(scores.max(), color="black", linestyle="--", linewidth=1, label=f"max {scores.max():.2f}")
    left.axhline(scores.mean(), color="grey", linestyle=":", linewidth=1, label=f"mean {scores.mean():.2f}")
    left.set(xlabel="word", ylabel="best-region cosine", title="hard assignment: one score per word")
    left.tick_params(axis="x", rotation=60, labelsize=7)
    left.legend(fontsize=7)
    rows = []
    for belta in beltas:
        logits = scores / belta
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        rows += [{"word": lab, "weight": w, "pooling": f"LSE belta={belta:g}"} for lab, w in zip(labels, weights)]
    rows += [{"word": lab, "weight": 1 / len(scores), "pooling": "mean"} for lab in labels]
    sns.barplot(data=pd.DataFrame(rows), x="word", y="weight", hue="pooling", ax=right)
    right.set(xlabel="word", ylabel="weight in the pooled score", title="LSE pooling: softmax(s / belta) per word")
    right.tick_params(axis="x", rotation=60, labelsize=7)
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
