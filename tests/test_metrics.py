"""Ranks and recalls (baselines.md §C.1): hand-made matrices first, then a plain-loop reference."""

import math

import numpy as np
import pytest
import torch

from itmkit.evaluate.metrics import i2t_ranks, recall_at_k, recall_metrics, t2i_ranks


def hand_matrix() -> np.ndarray:
    """2 images x 10 captions; captions 0-4 belong to image 0, 5-9 to image 1."""
    return np.array(
        [
            [0.1, 0.9, 0.2, 0.3, 0.0, 0.5, 0.95, 0.1, 0.2, 0.3],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 0.1, 0.2, 0.3, 0.4],
        ],
        dtype=np.float32,
    )


def test_hand_made_ranks():
    S = hand_matrix()
    # image 0: best own caption 0.9, only caption 6 (0.95) beats it; image 1: 0.8 beats all
    assert i2t_ranks(S).tolist() == [1, 0]
    # caption 0 ties (0.1 vs 0.1): a tie counts against the query -> rank 1
    assert t2i_ranks(S).tolist() == [1, 0, 1, 1, 1, 0, 1, 0, 0, 0]


def test_hand_made_metrics():
    m = recall_metrics(hand_matrix())
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0 and m["i2t_r10"] == 100.0
    assert m["i2t_medr"] == 1.0  # floor(median([1, 0]) = 0.5) + 1
    assert m["i2t_meanr"] == pytest.approx(1.5)
    assert m["t2i_r1"] == 50.0 and m["t2i_r5"] == 100.0
    assert m["t2i_medr"] == 1.0  # floor(median of five 0s and five 1s = 0.5) + 1
    assert m["t2i_meanr"] == pytest.approx(1.5)
    assert m["rsum"] == pytest.approx(50 + 100 + 100 + 50 + 100 + 100)


def test_ties_count_against_the_query():
    # a constant matrix (a collapsed model) ranks every positive last, never first
    S = np.full((3, 15), 0.5, dtype=np.float32)
    assert i2t_ranks(S).tolist() == [10, 10, 10]  # the 10 captions of the other two images
    assert t2i_ranks(S).tolist() == [2] * 15  # the two other images
    # i2t: rank 10 misses R@1, R@5 and R@10; t2i: rank 2 misses R@1 only
    assert recall_metrics(S)["rsum"] == pytest.approx(0 + 0 + 0 + 0 + 100 + 100)
    S[1, 7] = 0.6  # image 1's own caption 7 now strictly above everything
    assert i2t_ranks(S).tolist() == [10, 0, 10]
    assert t2i_ranks(S)[7] == 0 and t2i_ranks(S)[8] == 2
    S[0, 7] = 0.6  # image 0 ties with image 1 on caption 7: the tie counts against caption 7
    assert t2i_ranks(S)[7] == 1
    # image 0's best own score 0.5 is tied by 9 foreign captions and beaten by caption 7
    assert i2t_ranks(S)[0] == 10


def test_ties_among_own_captions_do_not_count():
    S = np.zeros((2, 10), dtype=np.float32)
    S[0, 0:3] = 0.9  # three own captions tie for image 0's best: rank 0, not 2
    S[0, 7] = 0.9  # one caption of image 1 ties with them: counts against image 0
    S[1, 5:10] = 0.8
    assert i2t_ranks(S).tolist() == [1, 0]


def test_tie_rule_matches_a_plain_loop_that_puts_the_positive_after_ties():
    rng = np.random.default_rng(5)
    S = rng.integers(0, 4, size=(9, 45)).astype(np.float32)  # a few levels: ties everywhere
    for i in range(9):
        own = set(range(5 * i, 5 * i + 5))
        best = max(S[i, j] for j in own)
        assert i2t_ranks(S)[i] == sum(1 for j in range(45) if j not in own and S[i, j] >= best)
    for c in range(45):
        assert t2i_ranks(S)[c] == sum(1 for i in range(9) if i != c // 5 and S[i, c] >= S[c // 5, c])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_an_error_naming_the_source(bad):
    from itmkit.evaluate.metrics import NonFiniteScoresError, check_finite_scores

    S = np.eye(4, 20, dtype=np.float32)
    S[2, 13] = bad
    for check in (i2t_ranks, t2i_ranks, recall_metrics):
        with pytest.raises(NonFiniteScoresError, match=r"run/sims\.npy: expected finite scores, found 1 non-finite"
                           r".* at image 2, caption 13"):
            check(S, 5, source="run/sims.npy")
    with pytest.raises(NonFiniteScoresError, match="similarity matrix: expected finite scores"):
        check_finite_scores(torch.from_numpy(S))
    # an all-NaN matrix (a model with NaN weights) used to score rsum 600
    with pytest.raises(NonFiniteScoresError, match="found 80 non-finite"):
        recall_metrics(np.full((4, 20), np.nan, dtype=np.float32))


def test_rank_below_k_not_at_most_k():
    n_img = 3
    S = np.zeros((n_img, 5 * n_img), dtype=np.float32)
    S[0, 0:5] = 0.5
    S[0, 5:10] = 0.6  # five foreign captions above image 0's best -> rank exactly 5
    assert i2t_ranks(S)[0] == 5
    ranks = np.array([5])
    assert recall_at_k(ranks, 5) == 0.0
    assert recall_at_k(ranks, 10) == 100.0


def test_rsum_is_sum_of_six_recalls_and_tensor_input():
    rng = np.random.default_rng(0)
    S = rng.normal(size=(7, 35)).astype(np.float32)
    m = recall_metrics(torch.from_numpy(S))
    six = [m[f"{side}_r{k}"] for side in ("i2t", "t2i") for k in (1, 5, 10)]
    assert m["rsum"] == pytest.approx(sum(six))
    assert m == recall_metrics(S)


def reference_ranks(S: np.ndarray, cpi: int):
    """The references' plain loops: full argsort per query (valid without ties)."""
    n_img, n_cap = S.shape
    i2t = np.zeros(n_img, dtype=int)
    for i in range(n_img):
        order = np.argsort(S[i])[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in range(cpi * i, cpi * i + cpi))
    t2i = np.zeros(n_cap, dtype=int)
    for c in range(n_cap):
        order = np.argsort(S[:, c])[::-1]
        t2i[c] = np.where(order == c // cpi)[0][0]
    return i2t, t2i


@pytest.mark.parametrize("n_img,cpi,seed", [(20, 5, 0), (33, 5, 1), (12, 1, 2), (50, 3, 3)])
def test_matches_plain_loop_reference(n_img, cpi, seed):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n_img, n_img * cpi))
    # make it informative so recalls are neither 0 nor 100
    S[np.arange(n_img * cpi) // cpi, np.arange(n_img * cpi)] += 1.5
    ref_i2t, ref_t2i = reference_ranks(S, cpi)
    assert np.array_equal(i2t_ranks(S, cpi), ref_i2t)
    assert np.array_equal(t2i_ranks(S, cpi), ref_t2i)
    m = recall_metrics(S, cpi)
    for k in (1, 5, 10):
        assert m[f"i2t_r{k}"] == pytest.approx(100 * np.mean(ref_i2t < k))
        assert m[f"t2i_r{k}"] == pytest.approx(100 * np.mean(ref_t2i < k))
    assert m["t2i_medr"] == math.floor(np.median(ref_t2i)) + 1
    assert m["i2t_meanr"] == pytest.approx(ref_i2t.mean() + 1)


def test_chunked_ranks_match_on_large_matrix(monkeypatch):
    import itmkit.evaluate.metrics as metrics

    rng = np.random.default_rng(4)
    S = rng.normal(size=(40, 200)).astype(np.float32)
    whole = (i2t_ranks(S), t2i_ranks(S))
    monkeypatch.setattr(metrics, "_CHUNK", 7)  # chunk boundaries inside the matrix
    assert np.array_equal(i2t_ranks(S), whole[0])
    assert np.array_equal(t2i_ranks(S), whole[1])


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="expected n_cap = 5 x n_img = 10 columns for 2 images, found 9"):
        recall_metrics(np.zeros((2, 9)))
    with pytest.raises(ValueError, match="expected 2 dimensions"):
        recall_metrics(np.zeros(10))
