"""Retrieval as data (itmkit.evaluate.retrieval): top-k lists match a plain per-query loop, and the
rank of the true match is the one the metrics count, ties included."""

import numpy as np
import pytest

from itmkit.evaluate.metrics import i2t_ranks, recall_at_k, t2i_ranks
from itmkit.evaluate.retrieval import captions_for_images, images_for_captions, top_k


def plain_listing(row, k, truth=()):
    """Candidates by score (higher first); among equal scores true matches last, then by index."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i in truth, i))[:k]


def test_the_hand_checked_case():
    # 2 images x 10 captions; caption 3 belongs to image 0, image 1 scores higher on it
    sims = np.zeros((2, 10))
    sims[0, 3], sims[1, 3] = 0.4, 0.7
    sims[1, 5:] = 0.9
    found = images_for_captions(sims, [3], k=2)
    assert found.indices.tolist() == [[1, 0]] and found.scores.tolist() == [[0.7, 0.4]]
    assert found.is_match.tolist() == [[False, True]] and found.match_rank.tolist() == [1]
    back = captions_for_images(sims, [1], k=3)
    assert back.indices.tolist() == [[5, 6, 7]] and back.is_match.all() and back.match_rank.tolist() == [0]
    frame = found.frame()
    assert list(frame.columns) == ["query", "position", "image", "score", "is_match", "match_position"]
    assert frame["position"].tolist() == [1, 2] and frame["match_position"].tolist() == [2, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lists_match_a_plain_loop_and_ranks_match_the_metrics_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    sims = rng.integers(0, 4, size=(8, 40)).astype(float)  # many ties on purpose
    captions = np.arange(40)
    t2i = images_for_captions(sims, captions, k=8)
    ranks = t2i_ranks(sims)
    assert t2i.match_rank.tolist() == ranks.tolist()
    for q, c in enumerate(captions):
        expected = plain_listing(sims[:, c], 8, truth={c // 5})
        assert t2i.indices[q].tolist() == expected
        assert t2i.scores[q].tolist() == [sims[i, c] for i in expected]
        assert t2i.is_match[q].tolist() == [i == c // 5 for i in expected]
        assert t2i.indices[q, ranks[c]] == c // 5  # the listing puts the true image at its metric rank
    # R@K from the listing equals the metric's R@K
    for k in (1, 5):
        assert 100 * t2i.is_match[:, :k].any(axis=1).mean() == pytest.approx(recall_at_k(ranks, k))

    images = np.arange(8)
    i2t = captions_for_images(sims, images, k=12)
    ranks = i2t_ranks(sims)
    assert i2t.match_rank.tolist() == ranks.tolist()
    for q, i in enumerate(images):
        own = sims[i, 5 * i : 5 * i + 5]
        best = 5 * i + int(np.argmax(own))
        expected = plain_listing(sims[i], 12, truth=set(range(5 * i, 5 * i + 5)))
        if ranks[i] < 12:  # the best own caption sits at its metric rank
            assert expected.index(best) == ranks[i]
        assert i2t.indices[q].tolist() == expected
        assert i2t.is_match[q].tolist() == [c // 5 == i for c in expected]
    assert 100 * i2t.is_match[:, :1].any(axis=1).mean() == pytest.approx(recall_at_k(ranks, 1))


def test_top_k_of_free_scores_and_bad_input():
    scores = np.array([0.1, 0.5, 0.5, 0.2])
    found = top_k(scores, k=3)
    assert found.indices.tolist() == [[1, 2, 3]] and not found.is_match.any() and found.match_rank.tolist() == [-1]
    assert top_k(scores, k=10).indices.shape == (1, 4)  # k larger than the candidates: all of them
    sims = np.zeros((2, 10))
    with pytest.raises(IndexError, match=r"caption 10: expected an index in \[0, 10\)"):
        images_for_captions(sims, [10])
    with pytest.raises(IndexError, match=r"image -1: expected an index in \[0, 2\)"):
        captions_for_images(sims, [-1])
    with pytest.raises(ValueError, match="k >= 1"):
        images_for_captions(sims, [0], k=0)
    sims[1, 4] = np.nan
    with pytest.raises(ValueError, match="query 4: expected finite scores"):
        images_for_captions(sims, [0, 4])
    with pytest.raises(ValueError, match=r"expected n_cap = 5 x n_img"):
        images_for_captions(np.zeros((2, 7)), [0])
