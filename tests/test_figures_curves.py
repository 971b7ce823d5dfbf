"""Charts of numbers (itmkit.figures.curves) return titled, labelled figures built from the data given."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from itmkit.figures import curves  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_training_curves(tmp_path):
    log = pd.DataFrame({"epoch": [1, 2, 3], "loss": [9.0, 6.0, 4.0], "i2t_r1": [10, 20, 30],
                        "t2i_r1": [5, 15, 25], "rsum": [100, 150, 200]})  # fmt: skip
    steps = pd.DataFrame({"epoch": [1, 1, 2, 2, 3, 3], "step": [1, 2, 3, 4, 5, 6], "loss": [10, 9, 7, 6, 5, 4]})
    fig = curves.plot_training_curves(log, steps, save=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    ax_loss, ax_dev = fig.axes[:2]
    assert fig._suptitle.get_text() == "Training curves"
    assert ax_loss.get_xlabel() == "epoch" and "loss" in ax_loss.get_ylabel()
    assert "R@1" in ax_dev.get_ylabel()
    epoch_line = [line for line in ax_loss.lines if len(line.get_xdata()) == 3][0]
    assert list(epoch_line.get_ydata()) == [9.0, 6.0, 4.0]
    with pytest.raises(ValueError, match="missing"):
        curves.plot_training_curves(pd.DataFrame({"epoch": [1]}))


def test_recalls_grouped_bars_with_paper_rows():
    ours = pd.DataFrame({"method": ["vse_infty"], "i2t_r1": [40.0], "i2t_r5": [70.0], "i2t_r10": [80.0],
                         "t2i_r1": [30.0], "t2i_r5": [60.0], "t2i_r10": [75.0]})  # fmt: skip
    paper = pd.DataFrame({"method": ["VSE∞ BiGRU"], "i2t_r1": [76.5], "i2t_r5": [94.2], "t2i_r1": [56.4], "t2i_r5": [83.4]})
    fig = curves.plot_recalls(ours, reported=paper)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "recall (%)" and ax.get_xlabel() == "direction and K"
    heights = sorted(round(p.get_height(), 1) for p in ax.patches if p.get_height() > 0)
    assert heights == sorted([40.0, 70.0, 80.0, 30.0, 60.0, 75.0, 76.5, 94.2, 56.4, 83.4])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["vse_infty", "VSE∞ BiGRU (paper)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10"]


def test_similarity_matrix_and_rank_histogram():
    rng = np.random.default_rng(0)
    S = rng.normal(size=(30, 150))
    fig = curves.plot_similarity_matrix(S, max_images=10)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "caption (first 50)" and ax.get_ylabel() == "image (first 10)"
    assert len(ax.patches) == 10  # one outline per image's caption group
    S[np.arange(150) // 5, np.arange(150)] += 10  # every positive on top
    fig = curves.plot_rank_histogram(S)
    assert [a.get_title() for a in fig.axes] == ["i2t: R@1 100.0%", "t2i: R@1 100.0%"]
    assert fig.axes[0].get_ylabel() == "queries"


def test_caption_lengths_overlay():
    fig = curves.plot_caption_lengths({"train": ["a red circle", "a b"], "test": ["one two three four"]})
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tokens per caption" and ax.get_ylabel() == "captions (%)"
    assert fig._suptitle.get_text() == "Caption length"
    with pytest.raises(ValueError, match="no captions"):
        curves.plot_caption_lengths([])
