"""Pictures of images: region boxes, image grids, retrieval rows.

Charts of numbers live in :mod:`itmkit.figures.curves`; weights drawn on boxes in
:mod:`itmkit.figures.alignment`. Every function returns a :class:`matplotlib.figure.Figure` (or
draws on given axes), so notebooks can save it to ``out_dir`` and show it. Images are uint8
``[H, W, 3]``; boxes are ``[K, 4]`` ``x1, y1, x2, y2`` in pixels, as in the precomp
``{split}_boxes.npy`` (baselines.md §A.1). Retrieval rows draw a :class:`~itmkit.evaluate.retrieval.TopK`.
"""

from __future__ import annotations

import textwrap
from typing import Callable, Sequence

import numpy as np

from itmkit.evaluate.retrieval import TopK

# A fixed qualitative palette: box k always gets the same colour in every figure.
BOX_COLOURS = (
    "#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00",
    "#a65628", "#f781bf", "#17becf", "#bcbd22", "#666666",
)  # fmt: skip
MATCH_COLOUR = "#2ca02c"  # a true match in retrieval rows
MISS_COLOUR = "#d62728"  # any other candidate


def check_image_and_boxes(image, boxes) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 [H, W, 3], boxes float64 [K, 4])`` as arrays; wrong shapes raise naming both.
    The one input check of every figure that draws on an image."""
    image, boxes = np.asarray(image), np.asarray(boxes, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected shape [H, W, 3], found {image.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected shape [K, 4] (x1, y1, x2, y2), found {boxes.shape}")
    return image, boxes


def show_image(ax, image: np.ndarray, title: str | None = None, alpha: float = 1.0, wrap: int | None = None):
    """``image`` on ``ax`` in pixel coordinates (y grows downwards), no axis lines; ``title`` wrapped
    to ``wrap`` characters (two lines) when given. Returns ``ax``."""
    ax.imshow(image, alpha=alpha)
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_axis_off()
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, wrap)[:2]) if wrap else title, fontsize=8)
    return ax


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

    image, boxes = check_image_and_boxes(image, boxes)
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"labels: expected one per box ({len(boxes)}), found {len(labels)}")
    show_image(ax, image, title)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=linewidth))
        if labels is not None:
            ax.text(x1 + 1, y1 + 1, str(labels[k]), color="white", fontsize=6, va="top",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
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
            show_image(ax, np.asarray(images[i]), title)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def _frame(ax, colour: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def _check_direction(found: TopK, direction: str, figure: str) -> None:
    if found.direction not in (direction, "scores"):
        raise ValueError(
            f"{figure}: expected a {direction} TopK (see itmkit.evaluate.retrieval), found {found.direction!r}"
        )


def text_to_image_figure(
    found: TopK,
    query_texts: Sequence[str],
    load_image: Callable[[int], np.ndarray],
    size: float = 2.0,
    title: str | None = None,
):
    """Text-to-image retrieval rows: one row per query of ``found`` (from
    :func:`~itmkit.evaluate.retrieval.images_for_captions` or :func:`~itmkit.evaluate.retrieval.top_k`),
    its text ``query_texts[q]`` on the left, then its ``k`` best images, a true match framed
    green, the others red. ``load_image(i) -> [H, W, 3]``. Returns the figure."""
    import matplotlib.pyplot as plt

    _check_direction(found, "t2i", "text_to_image_figure")
    if len(query_texts) != len(found):
        raise ValueError(f"text_to_image_figure: expected one text per query ({len(found)}), found {len(query_texts)}")
    q, k = found.indices.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(size * (k + 1.6), size * q), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] + [1] * k})  # fmt: skip
    for row in range(q):
        text_ax = axes[row, 0]
        text_ax.set_axis_off()
        text_ax.text(0.0, 0.5, "\n".join(textwrap.wrap(query_texts[row], 26)[:6]), fontsize=8, va="center")
        for col in range(k):
            ax = axes[row, col + 1]
            ax.imshow(load_image(int(found.indices[row, col])))
            _frame(ax, MATCH_COLOUR if found.is_match[row, col] else MISS_COLOUR)
            ax.set_title(f"#{col + 1}  s={found.scores[row, col]:.2f}", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_to_text_figure(
    found: TopK,
    captions: Sequence[str],
    load_image: Callable[[int], np.ndarray],
    size: float = 2.2,
    title: str | None = None,
):
    """Image-to-text retrieval rows: one row per query image of ``found`` (from
    :func:`~itmkit.evaluate.retrieval.captions_for_images`), the image on the left and its ``k``
    best captions (``captions``: every caption of the split, by index) listed with their scores,
    true matches in green. Returns the figure."""
    import matplotlib.pyplot as plt

    _check_direction(found, "i2t", "image_to_text_figure")
    q, k = found.indices.shape
    fig, axes = plt.subplots(q, 2, figsize=(size * 4.2, max(size, 0.32 * k + 0.6) * q), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3.2]})  # fmt: skip
    for row in range(q):
        image_ax, text_ax = axes[row]
        image_ax.imshow(load_image(int(found.queries[row])))
        _frame(image_ax, "#333333")
        image_ax.set_title(f"image {int(found.queries[row])}", fontsize=8)
        text_ax.set_axis_off()
        for col in range(k):
            caption = int(found.indices[row, col])
            line = f"#{col + 1}  s={found.scores[row, col]:.2f}  {textwrap.shorten(captions[caption], 70)}"
            text_ax.text(0.0, 1.0 - (col + 0.5) / k, line, fontsize=8, va="center",
                         color=MATCH_COLOUR if found.is_match[row, col] else MISS_COLOUR)  # fmt: skip
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def spatial_neighbourhood_figure(image, boxes, adjacency, region: int, sector_bounds: Sequence[float] | None = None,
                                 title: str | None = None):  # fmt: skip
    """CEFG's spatial neighbourhood of one region (cefg.md §3.4): the region's box in white, the
    regions it gathers from (``adjacency [R, R]`` row ``region``, self excluded) in red with a line
    from its centre, every other box faint; ``sector_bounds`` (angles in radians with ``y`` up, as
    :mod:`itmkit.data.spatial_adjacency` measures them) are drawn as rays from the region's
    centre so the direction sectors show."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image, boxes = check_image_and_boxes(image, boxes)
    adjacency = np.asarray(adjacency)
    if adjacency.shape != (len(boxes), len(boxes)):
        raise ValueError(f"spatial_neighbourhood_figure: expected adjacency [{len(boxes)}, {len(boxes)}], found {adjacency.shape}")
    if not 0 <= region < len(boxes):
        raise IndexError(f"spatial_neighbourhood_figure: region {region}: expected an index in [0, {len(boxes)})")
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    gathered = [j for j in np.flatnonzero(adjacency[region]) if j != region]
    fig, ax = plt.subplots(figsize=(5, 5))
    show_image(ax, image, title or f"region {region} gathers from {len(gathered)} regions")
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        edge, width, alpha = ("white", 2.5, 1.0) if k == region else ("red", 1.8, 1.0) if k in gathered else ("grey", 0.6, 0.5)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=edge, linewidth=width, alpha=alpha))
    cx, cy = centres[region]
    for j in gathered:
        ax.plot([cx, centres[j, 0]], [cy, centres[j, 1]], color="red", linewidth=1.2)
    if sector_bounds is not None:
        reach = float(max(image.shape[:2]))
        for angle in sector_bounds:
            ax.plot([cx, cx + reach * np.cos(angle)], [cy, cy - reach * np.sin(angle)], color="yellow",
                    linewidth=0.8, linestyle="--")  # fmt: skip
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
    fig.tight_layout()
    return fig
