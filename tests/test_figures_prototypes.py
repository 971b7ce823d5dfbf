"""figures.prototypes: the prototype and gate figures draw what they are given and check shapes."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from itmkit.figures.prototypes import gate_figure, prototype_figure


def test_prototype_figure_counts_and_marks(tmp_path):
    q_img = np.eye(3)[[0, 0, 2]] * 0.9 + 0.1 / 3
    q_cap = np.repeat(q_img, 5, axis=0)
    caption_image = np.arange(15) // 5
    fig = prototype_figure(q_img, q_cap, caption_image, n_captions=10, save=tmp_path / "p.png")
    bars = fig.axes[0].patches
    heights = [b.get_height() for b in bars]
    assert heights[:3] == [2, 0, 1] and heights[3:6] == [2, 0, 1]  # images, captions / 5 per prototype
    marks = fig.axes[1].collections[-1].get_offsets()
    np.testing.assert_allclose(marks[:, 0], 0.5)  # captions 0-9 belong to images 0, 1: prototype 0
    assert (tmp_path / "p.png").is_file()
    with pytest.raises(ValueError, match="one image per caption"):
        prototype_figure(q_img, q_cap, caption_image[:3])


def test_gate_figure_histograms(tmp_path):
    rng = np.random.default_rng(0)
    fig = gate_figure(rng.uniform(0.6, 0.9, (4, 8)), rng.uniform(0.1, 0.3, (20, 8)), save=tmp_path / "g.png")
    assert len(fig.axes) == 2 and (tmp_path / "g.png").is_file()
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        gate_figure(np.zeros(3), np.zeros((2, 2)))
