"""The analysis notebooks 01, 02, 03, 04 and 07 once did in their cells, now library functions
(issue 18 point 8), each checked against an independent computation on small inputs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from itmkit.config import replace_nested
from itmkit.encoded import Encoded
from itmkit.methods.registry import get_method


# ------------------------------------------------------------------ 01: what the features encode
def test_principal_components_match_the_covariance_eigenvectors():
    from itmkit.evaluate.embedding_space import principal_components

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)) @ np.diag([5.0, 3.0, 1.0, 0.5, 0.1]) + 7.0  # offset: centring matters
    coords, explained = principal_components(x, k=2)
    eigvals, eigvecs = np.linalg.eigh(np.cov(x.T, bias=True))
    order = np.argsort(eigvals)[::-1]
    expected = (x - x.mean(0)) @ eigvecs[:, order[:2]]
    for j in range(2):  # a component's sign is arbitrary
        sign = np.sign(coords[:, j] @ expected[:, j])
        np.testing.assert_allclose(coords[:, j], sign * expected[:, j], atol=1e-9)
    np.testing.assert_allclose(explained, eigvals[order[:2]] / eigvals.sum(), rtol=1e-9)
    on_a_line = np.outer(np.arange(6.0), [1.0, 2.0]) + 3
    assert principal_components(on_a_line, k=1)[1] == pytest.approx([1.0])
    with pytest.raises(ValueError, match="expected 1 <= k <= 2"):
        principal_components(on_a_line, k=3)


def test_neighbour_agreement_by_a_plain_loop():
    from itmkit.evaluate.embedding_space import nearest_neighbours, neighbour_agreement

    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 4))
    groups = np.repeat(np.arange(6), 2)
    colour = rng.integers(0, 3, size=12)
    expected_nn = []
    for i in range(12):
        best, best_cos = None, -np.inf
        for j in range(12):
            if j == i or groups[j] == groups[i]:
                continue
            cos = x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])
            if cos > best_cos:
                best, best_cos = j, cos
        expected_nn.append(best)
    assert nearest_neighbours(x, groups).tolist() == expected_nn
    agreement = neighbour_agreement(x, {"colour": colour}, groups)
    assert agreement["colour"] == pytest.approx(100 * np.mean([colour[j] == colour[i] for i, j in enumerate(expected_nn)]))
    with pytest.raises(ValueError, match="no candidate outside its own group"):
        nearest_neighbours(x, np.zeros(12))


def test_object_regions_pair_features_with_their_objects():
    from itmkit.data.embedded import embedded_dataset
    from itmkit.data.embedded.annotations import object_regions

    root = embedded_dataset("tiny")
    rows, vectors = object_regions(root, "train")
    scenes = {s["image_id"]: s for s in json.loads((root / "scenes.json").read_text())["images"]}
    ids = np.loadtxt(root / "train_ids.txt", dtype=np.int64)
    features = np.load(root / "train_ims.npy")
    expected_rows, expected_vectors = [], []
    for i, image_id in enumerate(ids):
        scene = scenes[int(image_id)]
        for k, owner in enumerate(scene["regions"]["object"]):
            if owner >= 0:
                expected_rows.append((i, k, scene["objects"][owner]["colour"], scene["objects"][owner]["shape"]))
                expected_vectors.append(features[i, k])
    assert list(rows[["image", "region", "colour", "shape"]].itertuples(index=False, name=None)) == expected_rows
    np.testing.assert_array_equal(vectors, np.stack(expected_vectors))


# ------------------------------------------------------------------ 02: text statistics
def test_coverage_by_threshold_by_hand():
    from itmkit.data.vocab import coverage_by_threshold

    counts = Counter({"a": 5, "dog": 2, "red": 1, "ball": 4})
    held_out = ["a", "dog", "cat", "a", "ball", "red", "the", "a"]
    table = coverage_by_threshold(counts, held_out, thresholds=(1, 2, 4, 8))
    assert table["words"].tolist() == [4, 3, 2, 0]
    # threshold 1: a a a dog ball red = 6/8; 2: a a a dog ball = 5/8; 4: a a a ball = 4/8; 8: none
    assert table["coverage"].tolist() == pytest.approx([75.0, 62.5, 50.0, 0.0])
    with pytest.raises(ValueError, match="minimum counts >= 1"):
        coverage_by_threshold(counts, held_out, thresholds=(0,))


class _ScriptedPipeline:
    """encode(rng=...) masks the second id and deletes the last one: rates known exactly."""

    mask_id = 99

    def encode(self, caption, rng=None):
        ids = list(range(len(caption.split())))
        return ids if rng is None else [ids[0], self.mask_id, *ids[2:-1]]


def test_augmentation_rates_count_masks_and_deletions():
    from itmkit.data.text import augmentation_rates

    rates = augmentation_rates(_ScriptedPipeline(), ["a b c d", "a b c d e f g h"], draws=3, rng=np.random.default_rng(0))
    # per draw: 1 masked and 1 deleted of 4, then of 8 -> 6 of 36 tokens each over 3 draws
    assert rates["tokens"] == 36
    assert rates["masked"] == pytest.approx(100 * 6 / 36) and rates["deleted"] == pytest.approx(100 * 6 / 36)
    assert (rates["expected_masked"], rates["expected_deleted"]) == pytest.approx((10.0, 8.0))


def test_augmentation_rates_of_the_real_pipeline_are_near_the_rule():
    from itmkit.data.text import WordIdPipeline, augmentation_rates
    from itmkit.data.vocab import Vocabulary

    captions = ["a small red circle left of a large blue square on a white background"] * 40
    pipeline = WordIdPipeline(Vocabulary.build(captions, threshold=1))
    rates = augmentation_rates(pipeline, captions, draws=50, rng=np.random.default_rng(3))
    # 32,000 tokens: the binomial standard error is ~0.17 points; 1 point is > 5 of them
    assert abs(rates["masked"] - 10.0) < 1.0 and abs(rates["deleted"] - 8.0) < 1.0


# ------------------------------------------------------------------ 03: GPO's learned weights
def test_gpo_weight_table_is_what_the_pool_applies():
    from itmkit.models.gpo import GPO, gpo_weight_table

    torch.manual_seed(0)
    pool = GPO(8, 8)
    table = gpo_weight_table({"regions": pool}, {"regions": [3, 5]})
    for n in (3, 5):
        weights = table[table["set size n"] == n].sort_values("sorted position")["weight"].to_numpy()
        assert weights.sum() == pytest.approx(1.0, abs=1e-6)
        # column j holds j + 1 ones: sorted, the pool sums the first j + 1 weights (a cumulative sum)
        x = torch.tensor([[1.0 if k <= j else 0.0 for j in range(n)] for k in range(n)])[None]
        pooled, _ = pool(x, torch.tensor([n]))
        np.testing.assert_allclose(pooled[0].detach().numpy(), np.cumsum(weights), atol=1e-6)
    with pytest.raises(KeyError, match="no set sizes given for 'regions'"):
        gpo_weight_table({"regions": pool}, {})


# ------------------------------------------------------------------ 04: a test-time setting swept
def _encoded_split(model, n_img=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    images = torch.randn(n_img, 5, cfg.img_dim, generator=g)
    lengths = torch.randint(3, 8, (5 * n_img,), generator=g)
    words = torch.randint(4, 30, (5 * n_img, 8), generator=g)
    with torch.no_grad():
        return model.encode_images(images, torch.full((n_img,), 5)), model.encode_captions(words, lengths)


def test_recalls_by_setting_scores_copies_and_leaves_the_model_alone():
    from itmkit.evaluate.evaluator import similarity_matrix
    from itmkit.evaluate.metrics import recall_metrics
    from itmkit.evaluate.sweep import recalls_by_setting

    torch.manual_seed(0)
    cfg = get_method("scan").preset("smoke")
    model = get_method("scan").build(cfg, 40).eval()
    images, captions = _encoded_split(model)
    trained = model.cfg.lambda_softmax
    before = similarity_matrix(model, images, captions, progress=False).copy()
    table = recalls_by_setting(model, images, captions, "lambda_softmax", [1.0, 20.0])
    assert model.cfg.lambda_softmax == trained
    np.testing.assert_array_equal(similarity_matrix(model, images, captions, progress=False), before)
    for value, row in zip([1.0, 20.0], table.itertuples(index=False)):
        other = get_method("scan").build(replace_nested(cfg, {"model.lambda_softmax": value}), 40).eval()
        other.load_state_dict(model.state_dict())
        expected = recall_metrics(similarity_matrix(other, images, captions, progress=False))
        assert row.lambda_softmax == value and row.rsum == pytest.approx(expected["rsum"])
    assert table["rsum"].nunique() >= 1 and list(table.columns[:2]) == ["lambda_softmax", "i2t_r1"]
    with pytest.raises(AttributeError, match="has no setting 'nope'"):
        recalls_by_setting(model, images, captions, "nope", [1])


# ------------------------------------------------------------------ 07: ESL's levels
def test_level_score_gap_by_a_loop_over_pairs():
    from itmkit.methods.esl import level_score_gap

    torch.manual_seed(0)
    model = get_method("esl").build(get_method("esl").preset("smoke"), 40).eval()
    images, captions = _encoded_split(model, n_img=3)
    table = level_score_gap(model, images, captions)
    with torch.no_grad():
        per_level = model.level_scores(images, captions).numpy()
        scores = model.score_block(images, captions).numpy()
    match, other = [], []
    for i in range(3):
        for c in range(15):
            (match if c // 5 == i else other).append(per_level[i, c])
    np.testing.assert_allclose(table["matching"], np.mean(match, axis=0), atol=1e-6)
    np.testing.assert_allclose(table["non-matching"], np.mean(other, axis=0), atol=1e-6)
    np.testing.assert_allclose(table["gap"], table["matching"] - table["non-matching"])
    own = np.array([[c // 5 == i for c in range(15)] for i in range(3)])
    assert table["matching"].sum() == pytest.approx(scores[own].mean(), abs=1e-5)  # the levels add up to the score


def test_cross_modal_agreement_by_hand():
    from itmkit.evaluate.embedding_space import cross_modal_agreement

    images = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    captions = np.array([[0.9, 0.1], [0.2, 1.0], [1.0, 0.05]])  # the third caption sits nearest image 0
    # cosines by hand: image 0 is nearest caption 2 (.9988 > .9939): miss; image 1 -> caption 1: hit;
    # image 2 -> caption 1 (.832 > .781 > .742): miss; caption 0 -> image 0: hit; caption 1 -> image 1: hit;
    # caption 2 -> image 0 (.9988 > .742): miss. 3 of 6
    assert cross_modal_agreement(images, captions, [0, 1, 2]) == pytest.approx(100 * 3 / 6)
