"""Cross-attention drawn on images: which regions a word looks at (SCAN t2i, scan.md §3.3).

Weights come from :meth:`itmkit.methods.scan.SCAN.attention` (or any ``[L, R]`` / ``[R]``
array that sums to 1 over the regions). Images are uint8 ``[H, W, 3]``, boxes ``[R, 4]``
``x1, y1, x2, y2`` in pixels, as in the precomp ``{split}_boxes.npy``. Every function returns a
:class:`matplotlib.figure.Figure` or the axes it drew on.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np


def _checked(image: np.ndarray, boxes: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, boxes, weights = np.asarray(image), np.asarray(boxes, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected shape [H, W, 3], found {image.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected shape [R, 4] (x1, y1, x2, y2), found {boxes.shape}")
    if weights.shape != (len(boxes),):
        raise ValueError(f"weights: expected one per box, shape ({len(boxes)},), found {weights.shape}")
    return image, boxes, weights


def draw_region_attention(ax, image, boxes, weights, title: str | None = None, top: int = 3, cmap: str = "magma"):
    """Show ``image`` dimmed, each region ``boxes[r]`` filled and outlined in proportion to
    ``weights[r] [R]``; the ``top`` heaviest regions carry their weight as a label. Returns ``ax``."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image, boxes, weights = _checked(image, boxes, weights)
    colours = plt.get_cmap(cmap)
    scale = weights / max(float(weights.max()), 1e-12)
    ax.imshow(image, alpha=0.55)
    # light regions last, so the heavy ones are drawn on top
    for r in np.argsort(scale, kind="stable"):
        x1, y1, x2, y2 = boxes[r]
        colour = colours(0.25 + 0.7 * scale[r])
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=colour, alpha=0.45 * scale[r],
                               edgecolor=colour, linewidth=0.5 + 2.5 * scale[r]))  # fmt: skip
    for r in np.argsort(-weights, kind="stable")[:top]:
        ax.text(boxes[r, 0] + 1, boxes[r, 1] + 1, f"{weights[r]:.2f}", color="white", fontsize=7, va="top",
                bbox={"facecolor": colours(0.25 + 0.7 * scale[r]), "alpha": 0.9, "pad": 1, "linewidth": 0})  # fmt: skip
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_axis_off()
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 30)[:2]), fontsize=9)
    return ax


def word_attention_figure(
    image: np.ndarray,
    boxes: np.ndarray,
    words: Sequence[str],
    attention: np.ndarray,
    ncols: int = 5,
    size: float = 2.3,
    suptitle: str | None = None,
):
    """One panel per word: where it attends (``attention [L, R]``, rows sum to 1 over regions)."""
    import matplotlib.pyplot as plt

    attention = np.asarray(attention)
    if attention.ndim != 2 or attention.shape[0] != len(words):
        raise ValueError(f"attention: expected shape [{len(words)}, R] (one row per word), found {attention.shape}")
    ncols = max(1, min(ncols, len(words)))
    nrows = -(-len(words) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.5), squeeze=False)
    for ax in axes.flat[len(words) :]:
        ax.set_axis_off()
    for ax, word, row in zip(axes.flat, words, attention):
        draw_region_attention(ax, image, boxes, row, title=repr(word))
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def attention_sweep_figure(
    image: np.ndarray,
    boxes: np.ndarray,
    weights_by_setting: Mapping[str, np.ndarray],
    size: float = 2.6,
    suptitle: str | None = None,
):
    """One panel per setting (e.g. ``{"λ1 = 1": w, "λ1 = 9": w, ...}``), each ``[R]`` weights of
    the same word: how a knob sharpens or flattens the attention."""
    import matplotlib.pyplot as plt

    n = len(weights_by_setting)
    if n == 0:
        raise ValueError("attention_sweep_figure: expected at least one setting, found none")
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.5), squeeze=False)
    for ax, (name, weights) in zip(axes[0], weights_by_setting.items()):
        entropy = float(-(np.clip(weights, 1e-12, 1) * np.log(np.clip(weights, 1e-12, 1))).sum())
        draw_region_attention(ax, image, boxes, weights, title=f"{name} (entropy {entropy:.2f})")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
