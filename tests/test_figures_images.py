"""Pictures of images (itmkit.figures.images): boxes land where the coordinates say, retrieval rows
draw what the retrieval data says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from itmkit.evaluate.retrieval import captions_for_images, images_for_captions, top_k  # noqa: E402
from itmkit.figures import images  # noqa: E402


def test_draw_boxes_places_rectangles_at_the_given_pixels():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    boxes = np.array([[5, 10, 25, 30], [0, 0, 60, 40]])
    fig, ax = plt.subplots()
    images.draw_boxes(ax, image, boxes, labels=["a", "b"], title="t")
    rects = ax.patches
    assert [(r.get_x(), r.get_y(), r.get_width(), r.get_height()) for r in rects] == [(5, 10, 20, 20), (0, 0, 60, 40)]
    assert [t.get_text() for t in ax.texts] == ["a", "b"]
    assert ax.get_ylim() == (40, 0)  # image coordinates: y grows downwards
    plt.close(fig)


def test_draw_boxes_rejects_bad_shapes():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match=r"boxes: expected shape \[K, 4\].*\(2, 3\)"):
        images.draw_boxes(ax, np.zeros((4, 4, 3), np.uint8), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"image: expected shape \[H, W, 3\].*\(4, 4\)"):
        images.draw_boxes(ax, np.zeros((4, 4), np.uint8), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="labels: expected one per box"):
        images.draw_boxes(ax, np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4)), labels=["x"])
    plt.close(fig)


def _edge(ax) -> str:
    return matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor())


def test_text_to_image_figure_frames_the_true_image_green():
    sims = np.array([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                     [0.2, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # 2 images x 10 captions
    pictures = [np.full((8, 8, 3), v, np.uint8) for v in (0, 100)]
    found = images_for_captions(sims, [0, 1], k=2)
    fig = images.text_to_image_figure(found, ["first", "second"], pictures.__getitem__)
    axes = np.array(fig.axes).reshape(2, 3)
    # caption 0 belongs to image 0 (listed first, green); caption 1 too, but image 1 scores higher
    assert _edge(axes[0, 1]) == images.MATCH_COLOUR and _edge(axes[0, 2]) == images.MISS_COLOUR
    assert _edge(axes[1, 1]) == images.MISS_COLOUR and _edge(axes[1, 2]) == images.MATCH_COLOUR
    assert axes[1, 1].get_title().startswith("#1  s=0.80")
    plt.close(fig)
    with pytest.raises(ValueError, match="one text per query"):
        images.text_to_image_figure(found, ["only one"], pictures.__getitem__)
    with pytest.raises(ValueError, match="expected a t2i TopK.*'i2t'"):
        images.text_to_image_figure(captions_for_images(sims, [0]), ["x"], pictures.__getitem__)
    free = images.text_to_image_figure(top_k(sims[:, 3], k=2), ["a free text"], pictures.__getitem__)
    assert all(_edge(ax) == images.MISS_COLOUR for ax in free.axes[1:])  # no true match for free text
    plt.close("all")


def test_image_to_text_figure_lists_the_best_captions_in_order():
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(3, 15))
    captions = [f"caption {c}" for c in range(15)]
    found = captions_for_images(sims, [2], k=4)
    fig = images.image_to_text_figure(found, captions, lambda i: np.full((8, 8, 3), 30 * i, np.uint8))
    texts = [t for t in fig.axes[1].texts]
    assert [t.get_text().split()[0] for t in texts] == ["#1", "#2", "#3", "#4"]
    best = np.argsort(-sims[2], kind="stable")[:4]
    assert [t.get_text().endswith(f"caption {c}") for t, c in zip(texts, best)] == [True] * 4
    for t, c in zip(texts, best):
        assert matplotlib.colors.to_hex(t.get_color()) == (images.MATCH_COLOUR if c // 5 == 2 else images.MISS_COLOUR)
    assert fig.axes[0].get_title() == "image 2"
    plt.close(fig)


def test_image_grid_lays_out_and_blanks_spare_cells():
    pictures = [np.zeros((5, 5, 3), np.uint8)] * 5
    fig = images.image_grid(pictures, titles=[f"img {i}" for i in range(5)], ncols=3,
                            boxes=[np.array([[0, 0, 2, 2]])] * 5)
    assert len(fig.axes) == 6 and not fig.axes[5].images
    assert fig.axes[0].get_title() == "img 0" and len(fig.axes[0].patches) == 1
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one image"):
        images.image_grid([])
