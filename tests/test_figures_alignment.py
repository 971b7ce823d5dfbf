"""Word-region alignment figures (itmkit.figures.alignment): one set of functions draws every
method's explanation; shapes are checked; the weights drawn are the explanation's."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from itmkit.figures import alignment  # noqa: E402
from itmkit.models.base import Explanation  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def picture():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 20, 20], [10, 5, 50, 35], [30, 10, 59, 39]], dtype=np.float32)
    return image, boxes


def explanation(parts: dict, n_words: int, n_regions: int = 3, method: str = "toy") -> Explanation:
    return Explanation(method, 0.5, n_regions, n_words, parts)


def labelled(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_word_region_figure_has_one_panel_per_word_with_its_weights(picture):
    image, boxes = picture
    weights = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]])
    words = ["<start>", "red", "circle", "<end>"]
    fig = alignment.word_region_figure(image, boxes, words, explanation({"word_region_weights": weights}, 4), ncols=3)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 4 and drawn[1].get_title() == "'red'"
    assert "0.80" in labelled(drawn[1])  # the heaviest region of "red" is labelled with its weight
    assert labelled(drawn[3]) == ["1.00"]  # a one-hot row (hard assignment) labels its one region only
    # the heaviest box of "<start>" is the most opaque one
    alphas = [p.get_alpha() for p in drawn[0].patches]
    assert max(alphas) == pytest.approx(0.45) and sorted(alphas)[0] == pytest.approx(0.45 * 0.1 / 0.7)


def test_region_word_weights_are_drawn_per_word_and_rows_of_explanations_stack(picture):
    image, boxes = picture
    i2t = explanation({"region_word_weights": np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])}, 2)
    np.testing.assert_allclose(alignment.word_weights(i2t), [[0.9, 0.5, 0.2], [0.1, 0.5, 0.8]])
    t2i = explanation({"word_region_weights": np.array([[0.6, 0.3, 0.1], [0.0, 0.0, 1.0]])}, 2)
    fig = alignment.word_region_figure(image, boxes, ["red", "circle"], {"soft": t2i, "i2t": i2t})
    axes = np.array(fig.axes).reshape(2, 2)
    assert [ax.get_title() for ax in axes[:, 1]] == ["'circle' (soft)", "'circle' (i2t)"]
    assert "0.80" in labelled(axes[1, 1])
    with pytest.raises(ValueError, match=r"expected 2 words .*found 3"):
        alignment.word_region_figure(image, boxes, ["a", "b", "c"], t2i)
    with pytest.raises(ValueError, match=r"shown: expected word indices in \[0, 2\)"):
        alignment.word_region_figure(image, boxes, ["red", "circle"], t2i, shown=[2])
    with pytest.raises(ValueError, match="expected 'word_region_weights' or 'region_word_weights'.*'word_scores'"):
        alignment.word_weights(explanation({"word_scores": np.ones(2)}, 2))
    with pytest.raises(ValueError, match=r"word_region_weights: expected \[2, 3\] weights, found \(2, 4\)"):
        alignment.word_weights(explanation({"word_region_weights": np.ones((2, 4))}, 2))


def test_draw_region_weights_checks_its_inputs(picture):
    image, boxes = picture
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match=r"weights: expected one per box, shape \(3,\), found \(2,\)"):
        alignment.draw_region_weights(ax, image, boxes, np.ones(2))
    with pytest.raises(ValueError, match=r"boxes: expected shape \[K, 4\]"):
        alignment.draw_region_weights(ax, image, boxes[:, :3], np.ones(3))


def test_weight_sweep_titles_carry_the_entropy(picture):
    image, boxes = picture
    fig = alignment.weight_sweep_figure(image, boxes, {"λ1 = 1": np.full(3, 1 / 3), "λ1 = 50": np.eye(3)[0]})
    titles = [ax.get_title() for ax in fig.axes]
    assert f"(entropy {np.log(3):.2f})" in titles[0] and "(entropy 0.00)" in titles[1]
    with pytest.raises(ValueError, match="at least one setting"):
        alignment.weight_sweep_figure(image, boxes, {})


def test_heatmap_marks_the_assigned_regions():
    cosines = np.array([[0.1, 0.9, 0.2], [0.7, 0.1, 0.3]])
    hard = explanation({"word_region_cosines": cosines, "word_region_weights": np.eye(3)[[1, 0]],
                        "assigned_regions": np.array([1, 0])}, 2)  # fmt: skip
    ax = alignment.alignment_heatmap(hard, ["red", "circle"], part="word_region_cosines")
    marks = ax.collections[-1].get_offsets()
    assert np.asarray(marks).tolist() == [[0.5, 1.5], [1.5, 0.5]]  # (word, region) centres
    assert [t.get_text() for t in ax.get_xticklabels()] == ["red", "circle"]


def test_lse_pooling_figure_weights_sum_to_one_per_pooling():
    scored = explanation({"word_scores": np.array([0.9, 0.2, 0.4])}, 3)
    fig = alignment.lse_pooling_figure(scored, ["a", "red", "circle"], beltas=(0.1, 1.0))
    left, right = fig.axes[:2]
    assert [round(p.get_height(), 6) for p in left.patches[:3]] == [0.9, 0.2, 0.4]
    heights = np.array([p.get_height() for p in right.patches if p.get_height() > 0])
    # three poolings (two LSE + mean) x three words, each pooling's weights sum to 1
    assert len(heights) == 9 and heights.sum() == pytest.approx(3.0)
    assert right.get_ylabel() == "weight in the pooled score"
    with pytest.raises(ValueError, match="expected 3 words"):
        alignment.lse_pooling_figure(scored, ["a"])


# --------------------------------------------------------- one figure, every method's explanation
@pytest.fixture(scope="module")
def tiny():
    from itmkit.data.embedded import embedded_dataset
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.region_features import load_rgb_image
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary

    root = embedded_dataset("tiny")
    test = PrecompSplit.open(root, "test")
    pipeline = WordIdPipeline(Vocabulary.build(PrecompSplit.open(root, "train").captions, threshold=1))
    image = load_rgb_image(root / "images" / f"{test.image_ids[2]}.png")
    return test, pipeline, image, np.asarray(test.boxes[2])


@pytest.mark.parametrize("method", ["scan", "chan", "sgraf", "esl"])
def test_the_same_figure_draws_every_methods_explanation(tiny, method):
    from itmkit.evaluate.explain import explain_pair
    from itmkit.methods.registry import get_method

    split, pipeline, image, boxes = tiny
    torch.manual_seed(0)
    model = get_method(method).build(get_method(method).preset("smoke"), pipeline.vocab_size).eval()
    caption = 11  # a caption of image 2
    found = explain_pair(model, pipeline, split, image=2, caption=caption)
    words = pipeline.tokens(split.captions[caption])
    weights = alignment.word_weights(found)
    assert weights.shape == (len(words), split.n_regions)
    fig = alignment.word_region_figure(image, boxes, words, found, suptitle=method)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(words)
    for ax, row in zip(panels, weights):
        heaviest = int(np.argmax(row))
        assert f"{row[heaviest]:.2f}" == labelled(ax)[0]  # the label of the heaviest box is its weight
        assert len(ax.patches) == split.n_regions
    heat = alignment.alignment_heatmap(found, words)
    assert heat.get_ylabel() == "region" and len(heat.get_xticklabels()) == len(words)
