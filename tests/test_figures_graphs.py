"""Similarity-graph figures (itmkit.figures.graphs) drawn from real SGR / SAF explanations; they
draw the explanation's numbers and refuse the wrong explanation or word count."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from itmkit.figures import graphs  # noqa: E402


@pytest.fixture(scope="module")
def explained():
    """An untrained smoke SGR and SAF model explaining test image 1 and its caption 5, on the
    embedded tiny set, with the picture and its boxes."""
    from itmkit.config import replace_nested
    from itmkit.data.embedded import embedded_dataset
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.region_features import load_rgb_image
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary
    from itmkit.evaluate.explain import explain_pair
    from itmkit.methods.registry import get_method

    root = embedded_dataset("tiny")
    test = PrecompSplit.open(root, "test")
    pipeline = WordIdPipeline(Vocabulary.build(PrecompSplit.open(root, "train").captions, threshold=1))
    found = {}
    for module in ("SGR", "SAF"):
        torch.manual_seed(0)
        cfg = replace_nested(get_method("sgraf").preset("smoke"), {"model.module": module})
        model = get_method("sgraf").build(cfg, pipeline.vocab_size).eval()
        found[module] = explain_pair(model, pipeline, test, image=1, caption=5)
    picture = load_rgb_image(root / "images" / f"{test.image_ids[1]}.png")
    return found, pipeline.tokens(test.captions[5]), picture, np.asarray(test.boxes[1])


def test_similarity_vectors_figure_draws_the_nodes_and_their_cosines(explained):
    found, words, _, _ = explained
    fig = graphs.similarity_vectors_figure(found["SGR"], words)
    left, right = fig.axes[0], next(ax for ax in fig.axes if ax.get_xlabel() == "cosine to the global node")
    assert [t.get_text() for t in left.get_yticklabels()] == ["<global>", *words]
    nodes = found["SGR"]["similarity_vectors"]
    np.testing.assert_allclose([p.get_width() for p in right.patches], nodes @ nodes[0], atol=1e-6)
    plt.close(fig)


def test_graph_edges_figure_has_one_heatmap_per_step(explained):
    found, words, _, _ = explained
    fig = graphs.graph_edges_figure(found["SGR"], words)
    steps = [ax for ax in fig.axes if ax.get_title().startswith("step")]
    assert len(steps) == found["SGR"]["graph_edges"].shape[0] == 3
    plt.close(fig)
    with pytest.raises(ValueError, match=rf"expected {len(words)} words .*found {len(words) - 1}"):
        graphs.graph_edges_figure(found["SGR"], words[:-1])
    with pytest.raises(ValueError, match="expected a 'graph_edges' part"):
        graphs.graph_edges_figure(found["SAF"], words)


def test_filtration_figure_bars_are_the_weights_and_kept_words_are_drawn(explained):
    found, words, picture, boxes = explained
    fig = graphs.filtration_figure(picture, boxes, words, found["SAF"], top=2)
    bars, *pictures = fig.axes
    np.testing.assert_allclose([p.get_height() for p in bars.patches], found["SAF"]["filtration_weights"], rtol=1e-6)
    kept = np.argsort(-found["SAF"]["filtration_weights"][1:])[:2]
    assert [ax.get_title().split("'")[1] for ax in pictures] == [words[t] for t in kept]
    plt.close(fig)
    with pytest.raises(ValueError, match="expected a 'filtration_weights' part"):
        graphs.filtration_figure(picture, boxes, words, found["SGR"])


# ------------------------------------------------------------------ a batch's instance graph (HREM, notebook 10)
@pytest.fixture(scope="module")
def hrem_tables():
    from itmkit.data.embedded import embedded_dataset
    from itmkit.data.loaders import training_batch
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary
    from itmkit.methods.hrem import batch_graph
    from itmkit.methods.registry import get_method

    root = embedded_dataset("tiny")
    split = PrecompSplit.open(root, "train")
    pipeline = WordIdPipeline(Vocabulary.build(split.captions, threshold=1))
    torch.manual_seed(0)
    cfg = get_method("hrem").preset("smoke")
    model = get_method("hrem").build(cfg, pipeline.vocab_size)
    batch = training_batch(split, pipeline, batch_size=8, seed=3, epoch=1, index=2)
    return batch, batch_graph(model, batch), split


def test_training_batch_is_the_trainers_batch(hrem_tables):
    from itmkit.data.loaders import epoch_order

    batch, _, split = hrem_tables
    expected = epoch_order(split.n_captions, 3, 1)[16:24]  # batch 2 of 8 pairs
    assert batch.caption_index.tolist() == expected.tolist()
    assert batch.image_index.tolist() == (expected // 5).tolist()


def test_batch_graph_figures_draw_the_kept_edges(hrem_tables):
    import matplotlib.pyplot as plt

    from itmkit.figures.graphs import BLOCK_COLOURS, batch_graph_figure, batch_graph_matrix_figure

    _, tables, _ = hrem_tables
    fig = batch_graph_matrix_figure(tables.connect, tables.relevance, n_images=8)
    left, right = (ax.images[0].get_array() for ax in fig.axes[:2])
    np.testing.assert_array_equal(np.asarray(left), tables.connect)
    kept = np.ma.getdata(right)[tables.connect]
    np.testing.assert_allclose(kept, tables.relevance[tables.connect])
    assert np.isnan(np.ma.getdata(right)[~tables.connect]).all()
    plt.close(fig)
    fig = batch_graph_figure(tables.nodes, tables.edges, max_edges=10)
    lines = [line for line in fig.axes[0].lines]
    assert len(lines) == min(10, len(tables.edges))
    top = tables.edges.sort_values("relevance", ascending=False).head(10)
    assert [line.get_color() for line in lines] == [BLOCK_COLOURS[b] for b in top["block"]]
    plt.close(fig)
    with pytest.raises(ValueError, match=r"expected \[2B, 2B\] = \[12, 12\]"):
        batch_graph_matrix_figure(tables.connect, tables.relevance, n_images=6)


# ------------------------------------------------------------------ LHSC layers and CEFG's regulator / neighbourhood
def _explanation(parts, n_regions=3, n_words=2):
    from itmkit.models.base import Explanation

    return Explanation("toy", 0.5, n_regions, n_words, parts)


def test_listening_weights_cut_negatives_and_normalise_per_layer():
    from itmkit.figures.graphs import layer_parts, listening_weights

    g1 = np.array([[0.5, -1.0, 1.5], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    g2 = -np.ones((3, 3))
    explanation = _explanation({"region_graph/layer2": g2, "region_graph/layer10": g1, "region_graph/layer1": g1})
    assert list(layer_parts(explanation, "region_graph")) == ["layer 1", "layer 2", "layer 10"]  # numeric order
    rows = listening_weights(explanation, 0)
    np.testing.assert_allclose(rows["layer 1"], [0.25, 0.0, 0.75])  # (0.5, 0, 1.5) / 2
    np.testing.assert_allclose(rows["layer 2"], [1 / 3] * 3)  # nothing positive: uniform
    with pytest.raises(IndexError, match=r"region 3: expected an index in \[0, 3\)"):
        listening_weights(explanation, 3)
    with pytest.raises(ValueError, match="expected parts word_attention/layer1"):
        layer_parts(explanation, "word_attention")


def test_word_attention_and_regulator_figures_show_the_parts():
    from itmkit.figures.alignment import regulator_figure
    from itmkit.figures.graphs import word_attention_figure

    a1, a2 = np.array([[0.9, 0.1], [0.3, 0.7]]), np.array([[0.5, 0.5], [0.2, 0.8]])
    fig = word_attention_figure(_explanation({"word_attention/layer1": a1, "word_attention/layer2": a2}), ["a", "b"])
    meshes = [ax.collections[0].get_array().reshape(2, 2) for ax in fig.axes]
    np.testing.assert_allclose(meshes[0], a1)
    np.testing.assert_allclose(meshes[1], a2)
    plt.close(fig)
    temperature = np.array([[9.0, 9.0], [7.0, 12.0], [6.0, 14.0], [5.0, 15.0]])  # λ0..λ3 for 2 words
    modulation = np.zeros((3, 2, 4))
    modulation[1, 0] = [3.0, 4.0, 0.0, 0.0]  # step 2, word 0: |M| = 5
    fig = regulator_figure(_explanation({"regulator_temperature": temperature, "regulator_modulation": modulation}), ["a", "b"])
    np.testing.assert_allclose(fig.axes[0].collections[0].get_array().reshape(4, 2), temperature)
    norms = fig.axes[1].collections[0].get_array().reshape(3, 2)  # the two heatmaps first, then their colour bars
    assert norms[1, 0] == pytest.approx(5.0) and norms.sum() == pytest.approx(5.0)
    plt.close(fig)


def test_spatial_neighbourhood_figure_marks_the_gathered_regions():
    from matplotlib.patches import Rectangle

    from itmkit.figures.images import spatial_neighbourhood_figure

    image = np.zeros((40, 40, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 20, 20], [0, 10, 8, 20], [25, 25, 35, 35]], dtype=np.float32)
    adjacency = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    fig = spatial_neighbourhood_figure(image, boxes, adjacency, region=0, sector_bounds=[math.pi])
    patches = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    colours = [p.get_edgecolor()[:3] for p in patches]
    assert colours[0] == (1.0, 1.0, 1.0) and colours[1] == (1.0, 0.0, 0.0) and colours[2] != (1.0, 0.0, 0.0)
    lines = fig.axes[0].lines
    np.testing.assert_allclose(lines[0].get_xydata(), [[15, 15], [4, 15]])  # centre to the gathered region's centre
    np.testing.assert_allclose(lines[1].get_xydata()[1], [15 - 40, 15], atol=1e-9)  # the ray at π points left
    plt.close(fig)
