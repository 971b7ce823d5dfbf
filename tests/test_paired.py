"""Paired comparisons: constructed cases with known answers and independent recomputation."""

import math

import numpy as np
import pytest

from itmkit.evaluate.metrics import recall_metrics
from itmkit.evaluate.paired import (
    PER_QUERY_METRICS,
    adjust_p_values,
    bootstrap_differences,
    paired_query_test,
    paired_seed_test,
    per_image_scores,
)


def _model(rng, n_img=60, strength=1.0):
    S = rng.normal(size=(n_img, 5 * n_img))
    for i in range(n_img):
        S[i, 5 * i : 5 * i + 5] += strength
    return S


@pytest.mark.parametrize("metric", PER_QUERY_METRICS)
def test_per_image_scores_average_to_the_metric(metric):
    S = _model(np.random.default_rng(1))
    assert per_image_scores(S, metric).mean() == pytest.approx(recall_metrics(S)[metric])


def test_per_image_rsum_by_hand():
    # 2 images, 1 caption each: image 0 retrieves its caption first, image 1 second
    S = np.array([[0.9, 0.1], [0.8, 0.5]])
    q = per_image_scores(S, captions_per_image=1)
    # image 0: i2t rank 0 (hits at 1, 5, 10) and its caption's t2i rank 0 -> 600
    # image 1: i2t rank 1 (hits at 5, 10) and its caption's t2i rank 0 (0.5 > 0.1) -> 500
    assert q.tolist() == [600.0, 500.0]


def test_identical_models_show_no_difference():
    S = _model(np.random.default_rng(2))
    r = paired_query_test(S, S.copy())
    assert r.difference == 0.0 and (r.ci_low, r.ci_high) == (0.0, 0.0) and r.p_value == 1.0 and r.effect_size == 0.0


def test_a_planted_gain_is_detected_and_a_null_is_not():
    rng = np.random.default_rng(3)
    base = _model(rng, strength=0.8)
    better = base.copy()
    for i in range(len(base)):
        better[i, 5 * i : 5 * i + 5] += 1.0
    r = paired_query_test(better, base, names=("better", "base"), n_resamples=1999)
    assert r.difference > 0 and r.ci_low > 0 and r.p_value < 0.01 and r.effect_size > 0
    assert r.difference == pytest.approx(recall_metrics(better)["rsum"] - recall_metrics(base)["rsum"])
    # two independent draws of the same model: the interval covers 0
    other = _model(np.random.default_rng(4), strength=0.8)
    null = paired_query_test(other, base, n_resamples=1999)
    assert null.ci_low < 0 < null.ci_high and null.p_value > 0.05


def test_paired_query_test_is_seeded():
    rng = np.random.default_rng(5)
    a, b = _model(rng), _model(rng)
    assert paired_query_test(a, b, seed=7) == paired_query_test(a, b, seed=7)


def test_non_finite_or_mismatched_inputs_are_errors():
    S = _model(np.random.default_rng(6))
    bad = S.copy()
    bad[3, 4] = np.inf
    with pytest.raises(ValueError, match="scan: non-finite score at image 3, caption 4"):
        paired_query_test(bad, S, names=("scan", "vse"))
    with pytest.raises(ValueError, match="not the same split"):
        paired_query_test(S[:10, :50], S)


def test_seed_test_matches_the_t_formula():
    a, b = [510.0, 498.0, 505.0, 512.0], [500.0, 497.0, 499.0, 503.0]
    r = paired_seed_test(a, b)
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert r.difference == pytest.approx(d.mean())
    assert r.effect_size == pytest.approx(d.mean() / d.std(ddof=1))
    # two-sided p from the t distribution with n-1 degrees of freedom, and the matching interval
    from scipy.stats import t as student

    assert r.p_value == pytest.approx(2 * student.sf(abs(t), len(d) - 1))
    half = student.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert (r.ci_low, r.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_seed_test([1.0], [2.0])


def test_benjamini_hochberg_by_hand():
    # sorted p: 0.01, 0.02, 0.04 (m = 3): adjusted = min over k >= i of p_k * m / k
    assert adjust_p_values([0.04, 0.01, 0.02]).tolist() == pytest.approx([0.04, 0.03, 0.03])


def test_bootstrap_differences_centre_on_the_observed_difference():
    rng = np.random.default_rng(8)
    a, b = _model(rng, strength=1.5), _model(rng, strength=0.5)
    draws = bootstrap_differences(a, b, n_resamples=3000, seed=1)
    observed = recall_metrics(a)["rsum"] - recall_metrics(b)["rsum"]
    assert abs(draws.mean() - observed) < 0.1 * abs(observed)
    assert np.array_equal(draws, bootstrap_differences(a, b, n_resamples=3000, seed=1))
