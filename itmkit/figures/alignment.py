"""Word-region alignment drawn from any method's :class:`~itmkit.models.base.Explanation`.

One set of functions for every method that has word-region weights: SCAN (t2i attention; i2t
attention of the regions over the words), CHAN (hard assignment: one region per word, or any
other coding), SGRAF (the attention its similarity vectors start from), ESL (both attention
maps), and any method that fills the standard parts ``word_region_weights [n_words, n_regions]``
or ``region_word_weights [n_regions, n_words]``. Get an explanation with
:func:`itmkit.evaluate.explain.explain_pair`; the words it lines up with are
``pipeline.tokens(caption)``.

Images are uint8 ``[H, W, 3]``, boxes ``[R, 4]`` ``x1, y1, x2, y2`` in pixels (precomp
``{split}_boxes.npy``). Every function returns a :class:`matplotlib.figure.Figure` or the axes it
drew on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from itmkit.figures.images import check_image_and_boxes, show_image
from itmkit.models.base import REGION_WORD_WEIGHTS, WORD_REGION_WEIGHTS, WORD_SCORES, Explanation

CMAP = "magma"


def word_weights(explanation: Explanation) -> np.ndarray:
    """``[n_words, n_regions]``: one row per word, its weight on every region.

    ``word_region_weights`` when the method has it (each row sums to 1 over the regions), else
    ``region_word_weights`` transposed (i2t: each *column* sums to 1 over the words; a row shows
    how much every region attends to that word)."""
    for key, transpose in ((WORD_REGION_WEIGHTS, False), (REGION_WORD_WEIGHTS, True)):
        if key in explanation:
            weights = np.asarray(explanation[key], dtype=np.float64)
            weights = weights.T if transpose else weights
            if weights.shape != (explanation.n_words, explanation.n_regions):
                raise ValueError(
                    f"{explanation.method} explanation {key}: expected [{explanation.n_words}, "
                    f"{explanation.n_regions}] weights, found {weights.shape}"
                )
            return weights
    raise ValueError(
        f"{explanation.method} explanation: expected {WORD_REGION_WEIGHTS!r} or {REGION_WORD_WEIGHTS!r} to draw, "
        f"found {sorted(explanation.parts)}"
    )


def _check_words(words: Sequence[str], explanation: Explanation, figure: str) -> None:
    if len(words) != explanation.n_words:
        raise ValueError(
            f"{figure}: expected {explanation.n_words} words (the {explanation.method} explanation's "
            f"n_words, pipeline.tokens(caption)), found {len(words)}"
        )


def draw_region_weights(ax, image, boxes, weights, top: int = 3, title: str | None = None, cmap: str = CMAP):
    """``image`` dimmed, every box ``boxes[r]`` filled and outlined in proportion to ``weights[r]``
    (``[R]``, e.g. one word's weights over the regions), relative to the largest; the ``top``
    heaviest boxes with a non-zero weight carry it as a label. Returns ``ax``."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image, boxes = check_image_and_boxes(image, boxes)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(boxes),):
        raise ValueError(f"weights: expected one per box, shape ({len(boxes)},), found {weights.shape}")
    colours = plt.get_cmap(cmap)
    scale = weights / max(float(np.abs(weights).max()), 1e-12)
    show_image(ax, image, title, alpha=0.55, wrap=30)
    # light regions first, so the heavy ones are drawn on top
    for r in np.argsort(scale, kind="stable"):
        x1, y1, x2, y2 = boxes[r]
        strength = float(np.clip(scale[r], 0.0, 1.0))
        colour = colours(0.15 + 0.65 * strength)  # magma: dark (light weight) to coral, visible on light images
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=colour, alpha=0.45 * strength,
                               edgecolor=colour, linewidth=0.5 + 2.5 * strength))  # fmt: skip
    for r in [r for r in np.argsort(-weights, kind="stable")[:top] if weights[r] > 0]:
        label = {"facecolor": colours(0.15 + 0.65 * max(scale[r], 0.0)), "alpha": 0.9, "pad": 1, "linewidth": 0}
        ax.text(boxes[r, 0] + 1, boxes[r, 1] + 1, f"{weights[r]:.2f}", color="white", fontsize=7, va="top", bbox=label)
    return ax


def word_region_figure(
    image,
    boxes,
    words: Sequence[str],
    explanations: Explanation | Mapping[str, Explanation],
    shown: Sequence[int] | None = None,
    ncols: int = 5,
    size: float = 2.3,
    suptitle: str | None = None,
):
    """Where each word of a caption puts its weight on the image: one panel per word.

    ``explanations``: one :class:`Explanation` (panels wrap after ``ncols``), or a mapping
    ``{label: explanation}`` of the same pair explained several ways (one row each, labelled;
    e.g. SCAN's soft attention above CHAN's hard assignment). ``shown``: word indices to draw
    (default all). Weights come from :func:`word_weights`."""
    import matplotlib.pyplot as plt

    rows = dict(explanations) if isinstance(explanations, Mapping) else {"": explanations}
    if not rows:
        raise ValueError("word_region_figure: expected at least one explanation, found none")
    for explanation in rows.values():
        _check_words(words, explanation, "word_region_figure words")
    shown = list(range(len(words))) if shown is None else [int(i) for i in shown]
    if not shown or not all(0 <= i < len(words) for i in shown):
        raise ValueError(f"word_region_figure shown: expected word indices in [0, {len(words)}), found {shown}")
    single = len(rows) == 1
    ncols = max(1, min(ncols, len(shown))) if single else len(shown)
    nrows = -(-len(shown) // ncols) if single else len(rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, (label, explanation) in enumerate(rows.items()):
        weights = word_weights(explanation)
        for col, w in enumerate(shown):
            ax = axes.flat[col] if single else axes[row, col]
            name = f"{words[w]!r}" + (f" ({label})" if label else "")
            draw_region_weights(ax, image, boxes, weights[w], title=name)
        if label:
            axes[row, 0].text(-0.08, 0.5, label, transform=axes[row, 0].transAxes, rotation=90, va="center",
                              ha="right", fontsize=9)  # fmt: skip
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def entropy(weights) -> float:
    """Entropy (nats) of one word's weights over the regions: 0 on one region, ``log R`` spread evenly."""
    p = np.clip(np.asarray(weights, dtype=np.float64), 1e-12, 1)
    return float(-(p * np.log(p)).sum())


def weight_sweep_figure(image, boxes, weights_by_setting: Mapping[str, np.ndarray], size: float = 2.6,
                        suptitle: str | None = None):  # fmt: skip
    """One panel per setting (e.g. ``{"λ1 = 1": w, "λ1 = 9": w, ...}``), each ``[R]`` weights of the
    same word, titled with their entropy: how a knob sharpens or flattens a word's weights."""
    import matplotlib.pyplot as plt

    n = len(weights_by_setting)
    if n == 0:
        raise ValueError("weight_sweep_figure: expected at least one setting, found none")
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.5), squeeze=False)
    for ax, (name, weights) in zip(axes[0], weights_by_setting.items()):
        draw_region_weights(ax, image, boxes, weights, title=f"{name} (entropy {entropy(weights):.2f})")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def alignment_heatmap(explanation: Explanation, words: Sequence[str], part: str | None = None, ax=None,
                      title: str | None = None, **heatmap_options):  # fmt: skip
    """Heatmap of a ``[n_words, n_regions]`` part (default :func:`word_weights`), regions down,
    words across; when the explanation has ``assigned_regions`` (a hard assignment), each word's
    region is boxed. Returns the axes."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    _check_words(words, explanation, "alignment_heatmap words")
    values = word_weights(explanation) if part is None else np.asarray(explanation[part], dtype=np.float64)
    if values.shape != (explanation.n_words, explanation.n_regions):
        raise ValueError(f"alignment_heatmap part {part!r}: expected [n_words, n_regions], found {values.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(min(12, 0.5 * len(words) + 3), 3.4))
    options = {"cmap": CMAP, "cbar_kws": {"label": part or "weight"}, **heatmap_options}
    sns.heatmap(values.T, ax=ax, xticklabels=list(words), yticklabels=[f"r{r}" for r in range(values.shape[1])],
                **options)  # fmt: skip
    if "assigned_regions" in explanation:
        assigned = np.asarray(explanation["assigned_regions"])
        ax.scatter(np.arange(len(words)) + 0.5, assigned + 0.5, marker="s", s=60, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="assigned region")  # fmt: skip
        ax.legend(loc="upper right", fontsize=7)
    ax.set(xlabel="word", ylabel="region", title=title or f"{explanation.method}: {part or 'word-region weights'}")
    return ax


def lse_pooling_figure(explanation: Explanation, words: Sequence[str], beltas: Sequence[float] = (0.02, 0.1, 0.5),
                       title: str | None = None):  # fmt: skip
    """What log-sum-exp pooling listens to (chan.md §3.3). Left: each word's score
    ``word_scores [n_words]`` with the max and the mean. Right: the weight each word gets in the
    pooled score's gradient, ``softmax(s / belta)`` (the derivative of ``logsumexp(s / belta)``
    times ``belta``), for each ``belta`` next to mean pooling's uniform ``1/L``: small ``belta`` ->
    max pooling, large -> mean pooling."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    _check_words(words, explanation, "lse_pooling_figure words")
    scores = np.asarray(explanation[WORD_SCORES], dtype=np.float64)
    labels = [f"{i}:{w}" for i, w in enumerate(words)]  # index keeps repeated words apart
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    sns.barplot(x=labels, y=scores, color="#e41a1c", ax=left)
    left.axhline(scores.max(), color="black", linestyle="--", linewidth=1, label=f"max {scores.max():.2f}")
    left.axhline(scores.mean(), color="grey", linestyle=":", linewidth=1, label=f"mean {scores.mean():.2f}")
    left.set(xlabel="word", ylabel="word score", title=f"{explanation.method}: one score per word")
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



def regulator_figure(explanation: Explanation, words: Sequence[str], title: str | None = None):
    """CEFG's correspondence regulator (cefg.md §3.5) across its steps, per word: the softmax
    temperature ``λ_0 .. λ_steps`` (``regulator_temperature [steps + 1, n]``) and the size of the
    query modulation of each round (‖M‖, from ``regulator_modulation [steps, n, d]``)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    _check_words(words, explanation, "regulator_figure words")
    temperature = np.asarray(explanation["regulator_temperature"], dtype=np.float64)
    modulation = np.linalg.norm(np.asarray(explanation["regulator_modulation"], dtype=np.float64), axis=-1)
    fig, axes = plt.subplots(1, 2, figsize=(min(14, 0.7 * len(words) + 6), 3.4))
    sns.heatmap(temperature, ax=axes[0], cmap="viridis", xticklabels=list(words),
                yticklabels=[f"λ{i}" for i in range(len(temperature))], cbar_kws={"label": "temperature"})  # fmt: skip
    axes[0].set_title("per-word softmax temperature by step")
    sns.heatmap(modulation, ax=axes[1], cmap="rocket", xticklabels=list(words),
                yticklabels=[f"step {i + 1}" for i in range(len(modulation))], cbar_kws={"label": "‖M‖"})  # fmt: skip
    axes[1].set_title("size of the query modulation by step")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=60)
    fig.suptitle(title or f"{explanation.method}: correspondence regulator")
    fig.tight_layout()
    return fig
