"""Every method's ``explain``: the score is the model's, the parts are unpadded and do not depend on
padding, and each part is what an independent per-word / per-region loop computes.

Also :func:`itmkit.evaluate.explain.explain_pair`, which explains a pair of a real (embedded)
split from its indices or from text.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itmkit.config import replace_nested
from itmkit.encoded import Encoded
from itmkit.methods.registry import get_method
from itmkit.models.base import Explanation

IMG_DIM, K, L, VOCAB = 24, 6, 9, 40
IMAGE, CAPTION = 1, 2  # the explained pair: image 1 has 4 of 6 regions, caption 2 has 5 of 9 words

# (method, overrides of its smoke preset)
MODELS = {
    "vse_infty": ("vse_infty", {}),
    "scan-t2i": ("scan", {"model.agg_func": "Mean"}),
    "scan-i2t": ("scan", {"model.cross_attn": "i2t", "model.agg_func": "LogSumExp", "model.lambda_softmax": 4.0,
                         "model.lambda_lse": 5.0}),
    "sgr": ("sgraf", {"model.num_regions": K}),
    "saf": ("sgraf", {"model.num_regions": K, "model.module": "SAF"}),
    "chan": ("chan", {}),
    "esl": ("esl", {}),
}


def build(name: str):
    method, overrides = MODELS[name]
    cfg = replace_nested(get_method(method).preset("smoke"), {"model.img_dim": IMG_DIM, **overrides})
    torch.manual_seed(0)
    return get_method(method).build(cfg, VOCAB).eval()


def encoded_pair(model):
    """All items encoded, and the explained pair alone (``len == 1`` each)."""
    g = torch.Generator().manual_seed(1)
    img_lengths = torch.tensor([K, 4, K])
    feats = torch.randn(3, K, IMG_DIM, generator=g) * (torch.arange(K)[None] < img_lengths[:, None])[..., None]
    cap_lengths = torch.tensor([L, 7, 5, 3])
    tokens = torch.randint(4, VOCAB, (4, L), generator=g) * (torch.arange(L)[None] < cap_lengths[:, None])
    with torch.no_grad():
        images, captions = model.encode_images(feats, img_lengths), model.encode_captions(tokens, cap_lengths)
    return images, captions, images.select(torch.tensor([IMAGE])), captions.select(torch.tensor([CAPTION]))


def padded(encoded: Encoded, extra: int, seed: int) -> Encoded:
    """``encoded`` with ``extra`` more set positions and garbage in every padded position (feats and
    set-shaped extras): an explanation must not see any of it."""
    if encoded.lengths is None:
        return encoded
    g = torch.Generator().manual_seed(seed)

    def grow(t: torch.Tensor) -> torch.Tensor:
        if t.dim() < 3:
            return t
        wider = torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], 1)
        garbage = torch.randn(wider.shape, generator=g, dtype=wider.dtype) * 5
        valid = (torch.arange(wider.shape[1])[None] < encoded.lengths[:, None])[..., None]
        return torch.where(valid, wider, garbage)

    return Encoded(grow(encoded.feats), encoded.lengths, {k: grow(v) for k, v in encoded.extras.items()})


@pytest.mark.parametrize("name", list(MODELS))
def test_score_is_the_models_and_parts_are_unpadded_and_padding_invariant(name):
    model = build(name)
    images, captions, image, caption = encoded_pair(model)
    explanation = model.explain(image, caption)
    assert isinstance(explanation, Explanation) and explanation.method == MODELS[name][0]
    with torch.no_grad():
        assert explanation.score == float(model.similarity(image, caption)[0, 0])
        assert explanation.score == pytest.approx(float(model.similarity(images, captions)[IMAGE, CAPTION]), abs=1e-5)
    if model.pairwise:
        assert (explanation.n_regions, explanation.n_words) == (4, 5)
    expected_shapes = {
        "word_region_weights": (5, 4), "region_word_weights": (4, 5), "word_scores": (5,), "region_scores": (4,),
        "word_region_cosines": (5, 4), "word_region_scores": (5, 4), "similarity_vectors": (6, 16),
        "graph_edges": (3, 6, 6), "filtration_weights": (6,), "assigned_regions": (5,), "level_scores": (9,),
    }  # fmt: skip
    for key, value in explanation.parts.items():
        assert isinstance(value, np.ndarray), key
        if key in expected_shapes:
            assert value.shape == expected_shapes[key], key
    again = model.explain(padded(image, 3, seed=2), padded(caption, 4, seed=3))
    assert again.score == pytest.approx(explanation.score, abs=1e-6)
    assert sorted(again.parts) == sorted(explanation.parts)
    for key, value in explanation.parts.items():
        np.testing.assert_allclose(again.parts[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert not model.training  # eval-mode numbers, and the model as it was


def test_explain_leaves_a_training_model_in_training_mode():
    model = build("saf").train()
    _, _, image, caption = encoded_pair(model)
    bn = model.sim.SAF_module.bn
    before = bn.running_mean.clone()
    model.explain(image, caption)
    assert model.training and torch.equal(bn.running_mean, before)  # no train-mode BatchNorm update
    with pytest.raises(ValueError, match="one image and one caption, found 3 and 1"):
        model.explain(encoded_pair(model)[0], caption)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_scan_t2i_parts_match_a_plain_loop_and_lambda_changes_them():
    model = build("scan-t2i")
    _, _, image, caption = encoded_pair(model)
    explanation = model.explain(image, caption)
    regions, words = image.feats[0, :4].double(), caption.feats[0, :5].double()
    raw = torch.nn.functional.leaky_relu(regions @ words.t(), 0.1)  # [R, L]
    normed = raw / (raw.norm(dim=1, keepdim=True) + 1e-8)  # l2 over the words (query axis)
    for w in range(5):
        weights = torch.softmax(9.0 * normed[:, w], dim=0)  # over the regions
        np.testing.assert_allclose(explanation["word_region_weights"][w], weights.numpy(), atol=1e-5)
        attended = (weights[:, None] * regions).sum(0)
        assert explanation["word_scores"][w] == pytest.approx(float(_unit(words[w]) @ _unit(attended)), abs=1e-5)
    assert explanation.score == pytest.approx(float(np.mean(explanation["word_scores"])), abs=1e-5)  # Mean pooling
    flat = model.explain(image, caption, lambda_softmax=1.0)
    sharp = model.explain(image, caption, lambda_softmax=50.0)
    spread = lambda e: float(-(e["word_region_weights"] * np.log(e["word_region_weights"])).sum())  # noqa: E731
    assert spread(flat) > spread(explanation) > spread(sharp)
    assert flat.score == pytest.approx(float(np.mean(flat["word_scores"])), abs=1e-5)


def test_scan_i2t_gives_region_parts_pooled_by_log_sum_exp():
    model = build("scan-i2t")
    _, _, image, caption = encoded_pair(model)
    explanation = model.explain(image, caption)
    assert "word_region_weights" not in explanation and "region_word_weights" in explanation
    np.testing.assert_allclose(explanation["region_word_weights"].sum(1), np.ones(4), atol=1e-6)
    lam = model.cfg.lambda_lse
    lse = math.log(np.exp(lam * explanation["region_scores"]).sum()) / lam
    assert explanation.score == pytest.approx(lse, abs=1e-5)


def test_chan_hard_assignment_is_the_argmax_region_and_lse_pools_the_scores():
    model = build("chan")
    _, _, image, caption = encoded_pair(model)
    explanation = model.explain(image, caption)
    regions, words = image.feats[0, :4], caption.feats[0, :5]
    for w in range(5):
        cosines = [float(words[w] @ regions[r]) for r in range(4)]
        best = int(np.argmax(cosines))
        assert explanation["assigned_regions"][w] == best
        assert explanation["word_region_weights"][w].tolist() == [1.0 if r == best else 0.0 for r in range(4)]
        assert explanation["word_scores"][w] == pytest.approx(max(cosines), abs=1e-6)
    lse = math.log(np.exp(explanation["word_scores"] / 0.1).sum())
    assert explanation.score == pytest.approx(lse, abs=1e-4)
    soft = model.explain(image, caption, coding_name="t2i")
    np.testing.assert_allclose(soft["word_region_weights"].sum(1), np.ones(5), atol=1e-6)
    assert soft["word_region_weights"].max() < 1.0  # a soft spread, not a one-hot
    textual = model.explain(image, caption, coding_name="tha")
    assert textual["region_word_weights"].shape == (4, 5)
    np.testing.assert_array_equal(textual["assigned_words"], explanation["word_region_cosines"].argmax(0))
    with pytest.raises(ValueError, match="coding_name.*found 'best'"):
        model.explain(image, caption, coding_name="best")


@pytest.mark.parametrize("name", ["sgr", "saf"])
def test_sgraf_parts_are_normalised_and_read_out_into_the_score(name):
    model = build(name)
    _, _, image, caption = encoded_pair(model)
    explanation = model.explain(image, caption)
    np.testing.assert_allclose(explanation["word_region_weights"].sum(1), np.ones(5), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(explanation["similarity_vectors"], axis=1), np.ones(6), atol=1e-5)
    if name == "sgr":
        np.testing.assert_allclose(explanation["graph_edges"].sum(-1), np.ones((3, 6)), atol=1e-6)
    else:
        assert explanation["filtration_weights"].sum() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        readout = model.sim.sim_eval_w(torch.from_numpy(explanation["similarity_vector"]))
    assert explanation.score == pytest.approx(float(torch.sigmoid(readout)), abs=1e-6)


def test_esl_levels_and_both_directions_add_up_to_the_score():
    model = build("esl")
    _, _, image, caption = encoded_pair(model)
    explanation = model.explain(image, caption)
    assert explanation["level_scores"].sum() == pytest.approx(explanation.score, abs=1e-5)
    both = explanation["word_scores"].mean() + explanation["region_scores"].mean()
    assert both == pytest.approx(explanation.score, abs=1e-5)
    scores, weights = explanation["word_region_scores"], explanation["word_region_weights"]
    np.testing.assert_allclose((weights * scores).sum(1), explanation["word_scores"], atol=1e-6)
    np.testing.assert_allclose(explanation["region_word_weights"].sum(1), np.ones(4), atol=1e-6)


# ------------------------------------------------------------------------- from raw data
@pytest.fixture(scope="module")
def tiny_split():
    from itmkit.data.embedded import embedded_dataset
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary

    root = embedded_dataset("tiny")
    test = PrecompSplit.open(root, "test")
    return test, WordIdPipeline(Vocabulary.build(PrecompSplit.open(root, "train").captions, threshold=1))


@pytest.mark.parametrize("method", ["vse_infty", "scan", "chan", "cefg"])  # cefg: prepare_data
def test_explain_pair_encodes_like_the_evaluation(tiny_split, method):
    from itmkit.evaluate.evaluator import encode_split, similarity_matrix
    from itmkit.evaluate.explain import explain_pair

    split, pipeline = tiny_split
    torch.manual_seed(0)
    model = get_method(method).build(get_method(method).preset("smoke"), pipeline.vocab_size).eval()
    sims = similarity_matrix(model, *encode_split(model, split, pipeline, progress=False), progress=False)
    explanation = explain_pair(model, pipeline, split, image=3, caption=7)
    assert explanation.score == pytest.approx(float(sims[3, 7]), abs=1e-5)
    if model.pairwise:
        assert explanation.n_words == len(pipeline.tokens(split.captions[7]))
        assert explanation.n_regions == split.n_regions
    by_text = explain_pair(model, pipeline, split, image=3, caption=split.captions[7])
    assert by_text.score == explanation.score
    with pytest.raises(IndexError, match=r"image 16: expected an index in \[0, 16\)"):
        explain_pair(model, pipeline, split, image=16, caption=0)
    with pytest.raises(IndexError, match=r"caption 80: expected an index in \[0, 80\) or a text"):
        explain_pair(model, pipeline, split, image=0, caption=80)


class _PartByHand:
    """A stand-in model whose part is known in closed form: value of word j of caption c explained
    with image i is ``100 * i + feats[c, j, 0]``, led by one global node of value ``-i``."""

    def explain(self, images, captions):
        image = float(images.feats[0, 0, 0])  # the test writes the image index into its features
        n = int(captions.lengths[0])
        return {"part": np.array([-image, *(100 * image + captions.feats[0, :n, 0]).tolist()])}


def test_word_parts_of_matching_pairs_pairs_each_caption_with_its_own_image():
    from itmkit.evaluate.explain import GLOBAL_NODE, mean_by_word, word_parts_of_matching_pairs

    n_img, lengths = 3, [2, 3, 1, 2]
    images = Encoded(torch.arange(n_img, dtype=torch.float32)[:, None, None].expand(n_img, 2, 4).clone(),
                     torch.full((n_img,), 2))
    feats = torch.zeros(4, 3, 4)
    for c, n in enumerate(lengths):
        feats[c, :n, 0] = torch.arange(1, n + 1) + 10 * c
    captions = Encoded(feats, torch.tensor(lengths))
    image_of_caption = [2, 0, 1, 2]
    tokens = [["a", "b"], ["a", "c", "d"], ["b"], ["c", "a"]]
    rows = word_parts_of_matching_pairs(_PartByHand(), images, captions, image_of_caption, tokens, "part",
                                        leading_nodes=(GLOBAL_NODE,))
    expected = []
    for c, words in enumerate(tokens):
        i = image_of_caption[c]
        expected.append((c, 0, GLOBAL_NODE, -i))
        expected += [(c, j + 1, w, 100 * i + (j + 1) + 10 * c) for j, w in enumerate(words)]
    assert [tuple(r) for r in rows.itertuples(index=False)] == expected

    table = mean_by_word(rows, min_count=2)
    # by hand: a = (201, 11, 232), b = (202, 121), c = (12, 231), global = (-2, 0, -1, -2); d (once) left out
    assert list(table.index) == [GLOBAL_NODE, "c", "a", "b"]
    assert table["mean"].tolist() == pytest.approx([-1.25, 121.5, 148.0, 161.5])
    assert table["count"].tolist() == [4, 2, 3, 2]
    with pytest.raises(ValueError, match="caption 0: explanation part 'part' has 3 values, expected 2"):
        word_parts_of_matching_pairs(_PartByHand(), images, captions, image_of_caption, tokens, "part")
