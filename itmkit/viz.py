"""Pictures on images for the course notebooks: region boxes, image grids, retrieval examples.

Charts of numbers (curves, recall bars) live in :mod:`itmkit.plots`; this module draws *on*
images. Every function returns a :class:`matplotlib.figure.Figure` (or draws on a given axes),
so notebooks can save it to ``out_dir`` and show it. Images are uint8 ``[H, W, 3]``; boxes are
``[K, 4]`` ``x1, y1, x2, y2`` in pixels, as in the precomp ``{split}_boxes.npy`` (baselines.md §A.1).
"""

from __future__ import annotations

import textwrap
from typing import Callable, Sequence

import numpy as np

# A fixed qualitative palette: box k always gets the same colour in every figure.
BOX_COLOURS = (
    "#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00",
    "#a65628", "#f781bf", "#17becf", "#bcbd22", "#666666",
)  # fmt: skip


def _check_boxes(boxes: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected shape [K, 4] (x1, y1, x2, y2), found {boxes.shape}")
    if len(image_shape) != 3 or image_shape[2] != 3:
        raise ValueError(f"image: expected shape [H, W, 3], found {tuple(image_shape)}")
    return boxes


def draw_boxes(
    ax,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    linewidth: float = 1.5,
):
    """Show ``image [H, W, 3]`` on ``ax`` with ``boxes [K, 4]`` (x1, y1, x2, y2) outlined and,
    when given, ``labels[k]`` written at each box's top-left corner. Returns ``ax``."""
    from matplotlib.patches import Rectangle

    image = np.asarray(image)
    boxes = _check_boxes(boxes, image.shape)
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"labels: expected one per box ({len(boxes)}), found {len(labels)}")
    ax.imshow(image)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=linewidth))
        if labels is not None:
            ax.text(x1 + 1, y1 + 1, str(labels[k]), color="white", fontsize=6, va="top",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def image_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    size: float = 2.4,
    suptitle: str | None = None,
    boxes: Sequence[np.ndarray] | None = None,
):
    """A grid of images (each uint8 ``[H, W, 3]``) with wrapped titles; ``boxes[i] [K, 4]``
    outlines regions on image ``i`` when given. Returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("image_grid: expected at least one image, found none")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        title = "\n".join(textwrap.wrap(titles[i], 28)[:3]) if titles is not None else None
        if boxes is not None:
            draw_boxes(ax, images[i], boxes[i], title=title, linewidth=1.0)
        else:
            ax.imshow(images[i])
            ax.set_axis_off()
            if title:
                ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def top_images_for_captions(sims: np.ndarray, caption_ids: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each caption in ``caption_ids``, the ``k`` best images of ``sims [n_img, n_cap]``:
    returns (indices ``[q, k]``, scores ``[q, k]``), best first. Ties keep the lower image index
    first (a stable sort), so the picture is reproducible."""
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims: expected [n_img, n_cap], found shape {sims.shape}")
    cols = sims[:, np.asarray(caption_ids, dtype=np.int64)].T  # [q, n_img]
    order = np.argsort(-cols, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(cols, order, axis=1)


def text_to_image_figure(
    sims: np.ndarray,
    caption_ids: Sequence[int],
    captions: Sequence[str],
    load_image: Callable[[int], np.ndarray],
    image_of_caption: Callable[[int], int],
    k: int = 4,
    size: float = 2.0,
    title: str | None = None,
):
    """Text-to-image retrieval examples: one row per query caption ``caption_ids[q]`` showing its
    ``k`` best images under ``sims [n_img, n_cap]``; the matching image is framed green, the
    others red. ``load_image(i) -> [H, W, 3]``; ``image_of_caption(c) -> i``. Returns the figure."""
    import matplotlib.pyplot as plt

    order, scores = top_images_for_captions(sims, caption_ids, k)
    q = len(caption_ids)
    fig, axes = plt.subplots(q, k + 1, figsize=(size * (k + 1.6), size * q), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] + [1] * k})
    for row, c in enumerate(caption_ids):
        text_ax = axes[row, 0]
        text_ax.set_axis_off()
        text_ax.text(0.0, 0.5, "\n".join(textwrap.wrap(captions[c], 26)[:6]), fontsize=8, va="center")
        truth = image_of_caption(int(c))
        for col in range(k):
            ax = axes[row, col + 1]
            i = int(order[row, col])
            ax.imshow(load_image(i))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "#2ca02c" if i == truth else "#d62728"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"#{col + 1}  s={scores[row, col]:.2f}", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
