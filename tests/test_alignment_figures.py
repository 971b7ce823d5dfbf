"""Soft-vs-hard alignment and LSE pooling figures: they draw what they are given, and refuse bad shapes."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from itmkit.alignment_figures import draw_hard_region, lse_pooling_figure, soft_vs_hard_figure


def scene():
    image = np.full((40, 60, 3), 200, dtype=np.uint8)
    boxes = np.array([[2, 2, 20, 20], [30, 5, 55, 35], [10, 22, 28, 38]], dtype=np.float32)
    return image, boxes


def test_soft_vs_hard_figure_has_two_rows_per_word_and_outlines_the_argmax_box():
    import matplotlib.pyplot as plt

    image, boxes = scene()
    soft = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    fig = soft_vs_hard_figure(image, boxes, ["red", "circle"], soft, np.array([0, 2]), hard_scores=[0.9, 0.5])
    axes = np.array(fig.axes).reshape(2, 2)
    assert [ax.get_title() for ax in axes[0]] == ["'red' (soft)", "'circle' (soft)"]
    hard_patch = axes[1, 1].patches[0]
    assert hard_patch.get_xy() == (10.0, 22.0) and hard_patch.get_width() == 18.0  # box 2
    assert "0.50" in axes[1, 1].texts[0].get_text()
    # soft panels: one shaded patch per box + outlines of the top 3
    assert len(axes[0, 0].patches) == 3 + 3
    plt.close(fig)
    with pytest.raises(ValueError, match="hard_regions"):
        soft_vs_hard_figure(image, boxes, ["red"], soft, np.array([0, 2]))
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="region"):
        draw_hard_region(ax, image, boxes, 3)
    plt.close("all")


def test_lse_pooling_figure_weights_sum_to_one_per_pooling():
    import matplotlib.pyplot as plt

    fig = lse_pooling_figure(np.array([0.9, 0.2, 0.4]), ["a", "red", "circle"], beltas=(0.1, 1.0))
    left, right = fig.axes[:2]
    assert [round(p.get_height(), 6) for p in left.patches[:3]] == [0.9, 0.2, 0.4]
    heights = np.array([p.get_height() for p in right.patches if p.get_height() > 0])
    # three poolings (two LSE + mean) x three words, each pooling's weights sum to 1
    assert len(heights) == 9 and heights.sum() == pytest.approx(3.0)
    assert right.get_ylabel() == "weight in the pooled score"
    plt.close(fig)
    with pytest.raises(ValueError, match="one score per word"):
        lse_pooling_figure(np.array([0.1, 0.2]), ["a"])
