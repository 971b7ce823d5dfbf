"""Attention pictures (itmkit.attention_figures): shapes checked, one panel per word / setting."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from itmkit import attention_figures  # noqa: E402


@pytest.fixture
def picture():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 20, 20], [10, 5, 50, 35], [30, 10, 59, 39]], dtype=np.float32)
    return image, boxes


def test_word_attention_figure_has_one_panel_per_word(picture):
    image, boxes = picture
    attention = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]])
    fig = attention_figures.word_attention_figure(image, boxes, ["<start>", "red", "circle", "<end>"], attention, ncols=3)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 4 and [ax.get_title() for ax in drawn][1] == "'red'"
    # the heaviest region of "circle" is labelled with its weight
    assert "0.80" in [t.get_text() for t in drawn[1].texts]
    plt.close(fig)


def test_sweep_and_shape_errors(picture):
    image, boxes = picture
    fig = attention_figures.attention_sweep_figure(image, boxes, {"λ1 = 1": np.full(3, 1 / 3), "λ1 = 50": np.eye(3)[0]})
    titles = [ax.get_title() for ax in fig.axes]
    assert f"(entropy {np.log(3):.2f})" in titles[0] and "(entropy 0.00)" in titles[1]
    plt.close(fig)
    with pytest.raises(ValueError, match=r"weights: expected one per box, shape \(3,\), found \(2,\)"):
        attention_figures.draw_region_attention(plt.gca(), image, boxes, np.ones(2))
    with pytest.raises(ValueError, match=r"attention: expected shape \[2, R\]"):
        attention_figures.word_attention_figure(image, boxes, ["a", "b"], np.ones((3, 3)))
    plt.close("all")
