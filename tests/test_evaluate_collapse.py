"""Collapse detection from the scores' spread (itmkit.evaluate.collapse)."""

import numpy as np
import pytest
import torch

from itmkit.evaluate.collapse import COLLAPSE_RTOL, CollapsedScoresError, check_not_collapsed, score_spread
from itmkit.evaluate.metrics import NonFiniteScoresError


def test_spread_matches_numpy_and_is_chunked(monkeypatch):
    import itmkit.evaluate.collapse as collapse

    rng = np.random.default_rng(0)
    S = rng.normal(0.3, 0.1, size=(37, 185)).astype(np.float32)
    monkeypatch.setattr(collapse, "_ROWS_PER_CHUNK", 5)
    spread = score_spread(S)
    assert spread.std == pytest.approx(S.astype(np.float64).std(), rel=1e-9)
    assert spread.mean == pytest.approx(S.astype(np.float64).mean(), rel=1e-9)
    assert spread.scale == pytest.approx(float(np.abs(S).max()))
    assert not spread.collapsed


@pytest.mark.parametrize("value", [0.0, 0.37, -2.5, 1.0])
def test_constant_matrices_are_collapsed(value):
    S = np.full((10, 50), value, dtype=np.float32)
    spread = score_spread(S)
    assert spread.std == 0.0 and spread.collapsed
    with pytest.raises(CollapsedScoresError, match=r"dev scores: expected scores that differ between pairs, found collapsed"):
        check_not_collapsed(torch.from_numpy(S), "dev scores")


def test_the_threshold_is_relative_to_the_scale():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(20, 100))
    noise /= noise.std()
    for scale in (1e-3, 1.0, 50.0):
        # a spread just below the threshold is collapse, just above it is not, at any scale
        below = scale + 0.5 * COLLAPSE_RTOL * scale * noise
        above = scale + 3.0 * COLLAPSE_RTOL * scale * noise
        assert score_spread(below).collapsed and not score_spread(above).collapsed


def test_a_weak_but_ranking_model_is_not_collapsed():
    # scores that all sit near 0.99 but still order the pairs (a fresh model can look like this)
    rng = np.random.default_rng(2)
    S = 0.99 + 1e-3 * rng.normal(size=(30, 150))
    assert not score_spread(S).collapsed


def test_non_finite_scores_raise_before_any_spread():
    S = np.zeros((4, 20), dtype=np.float32)
    S[3, 1] = np.nan
    with pytest.raises(NonFiniteScoresError, match="at image 3, caption 1"):
        score_spread(S)
    with pytest.raises(NonFiniteScoresError, match="found 80 non-finite"):
        check_not_collapsed(np.full((4, 20), np.nan))


def test_a_healthy_model_at_the_old_loss_threshold_is_not_collapsed():
    # The old rule flagged an epoch whose hardest-negative loss was 2 * margin * batch. A healthy
    # model meets that when each caption has a near-duplicate elsewhere in the batch (the course
    # set has many): the hardest negative ties with the positive, every anchor loses exactly the
    # margin, and yet the ranking is good (measured: course epoch 5, dev rsum 497 -> 534).
    from itmkit.evaluate.metrics import recall_metrics
    from itmkit.losses import hinge_triplet_loss

    B, m = 10, 0.2
    rng = np.random.default_rng(3)
    S = rng.uniform(-0.3, 0.1, size=(B, B))
    np.fill_diagonal(S, 0.8)
    partner = np.arange(B) ^ 1  # pairs (0, 1), (2, 3), ...: duplicate captions score like the positive
    S[np.arange(B), partner] = 0.8
    loss = float(hinge_triplet_loss(torch.from_numpy(S), margin=m, max_violation=True))
    assert loss == pytest.approx(2 * m * B)  # the value the loss-based rule called "collapsed"
    assert not score_spread(S).collapsed
    assert recall_metrics(S, captions_per_image=1)["t2i_r5"] == 100.0


def test_nearly_collapsed_is_a_wider_tier_that_keeps_the_order():
    from itmkit.evaluate.collapse import NEAR_COLLAPSE_RTOL
    from itmkit.evaluate.metrics import recall_metrics

    rng = np.random.default_rng(4)
    S = rng.normal(size=(20, 100))
    S[np.arange(100) // 5, np.arange(100)] += 3.0
    S /= S.std()
    squeezed = 0.6 + 0.2 * NEAR_COLLAPSE_RTOL * S  # ratio ~ 0.2 * 1e-3 / 0.6
    spread = score_spread(squeezed)
    assert spread.nearly_collapsed and not spread.collapsed
    assert recall_metrics(squeezed)["rsum"] == pytest.approx(recall_metrics(S)["rsum"])
    assert not score_spread(0.6 + 5 * NEAR_COLLAPSE_RTOL * S).nearly_collapsed
