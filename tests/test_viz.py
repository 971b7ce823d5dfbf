"""Drawing on images: boxes land where the coordinates say, retrieval rows rank like a plain loop."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from itmkit import viz  # noqa: E402


def test_draw_boxes_places_rectangles_at_the_given_pixels():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    boxes = np.array([[5, 10, 25, 30], [0, 0, 60, 40]])
    fig, ax = plt.subplots()
    viz.draw_boxes(ax, image, boxes, labels=["a", "b"], title="t")
    rects = ax.patches
    assert [(r.get_x(), r.get_y(), r.get_width(), r.get_height()) for r in rects] == [(5, 10, 20, 20), (0, 0, 60, 40)]
    assert [t.get_text() for t in ax.texts] == ["a", "b"]
    assert ax.get_ylim() == (40, 0)  # image coordinates: y grows downwards
    plt.close(fig)


def test_draw_boxes_rejects_bad_shapes():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match=r"boxes: expected shape \[K, 4\].*\(2, 3\)"):
        viz.draw_boxes(ax, np.zeros((4, 4, 3), np.uint8), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="labels: expected one per box"):
        viz.draw_boxes(ax, np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4)), labels=["x"])
    plt.close(fig)


def test_top_images_for_captions_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 4, size=(7, 10)).astype(float)  # many ties on purpose
    queries = [0, 3, 9]
    order, scores = viz.top_images_for_captions(sims, queries, k=3)
    for q, c in enumerate(queries):
        ranked = sorted(range(7), key=lambda i: (-sims[i, c], i))[:3]  # stable: lower index first
        assert order[q].tolist() == ranked
        assert scores[q].tolist() == [sims[i, c] for i in ranked]


def test_text_to_image_figure_frames_the_true_image_green():
    sims = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.3]])  # 3 images, 2 captions
    images = [np.full((8, 8, 3), v, np.uint8) for v in (0, 100, 200)]
    fig = viz.text_to_image_figure(sims, [0, 1], ["first", "second"], images.__getitem__, lambda c: c, k=2)
    axes = np.array(fig.axes).reshape(2, 3)
    edge = lambda ax: matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor())  # noqa: E731
    # caption 0: images 0 (true, green) then 2; caption 1: image 1 (true) then 2
    assert edge(axes[0, 1]) == "#2ca02c" and edge(axes[0, 2]) == "#d62728"
    assert axes[1, 1].get_title().startswith("#1  s=0.80")
    plt.close(fig)


def test_image_grid_lays_out_and_blanks_spare_cells():
    images = [np.zeros((5, 5, 3), np.uint8)] * 5
    fig = viz.image_grid(images, titles=[f"img {i}" for i in range(5)], ncols=3,
                         boxes=[np.array([[0, 0, 2, 2]])] * 5)
    assert len(fig.axes) == 6 and not fig.axes[5].images
    assert fig.axes[0].get_title() == "img 0" and len(fig.axes[0].patches) == 1
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one image"):
        viz.image_grid([])
