"""Paired comparisons of two models on the same test queries, and across seeds.

Two models scored on the same test split answer the same queries, so their difference is best
judged query by query (a paired test), not by comparing two recall numbers. The unit here is the
**image**: an image is one caption-retrieval query and owns its ``captions_per_image``
image-retrieval queries, so

    rsum = mean over images of q_i,   q_i = 100 * (sum_k [i2t rank_i < k]
                                                   + mean over its captions c of sum_k [t2i rank_c < k])

with ``k`` in (1, 5, 10) (each image has the same number of captions, so this is exactly the
usual rsum). Resampling images keeps an image's captions together (they are not independent
queries). The same per-image decomposition gives any single recall (``i2t_r1``, ``t2i_r5``, ...).

Within one seed: the mean per-image difference with a bootstrap 95 % interval
(``scipy.stats.bootstrap``) and a sign-flip permutation p-value (``scipy.stats.permutation_test``).
Across seeds: the per-seed differences of the run-level metric with a paired t-test
(``scipy.stats.ttest_rel``). Effect size: Cohen's ``d_z`` = mean difference / its standard deviation.

Testing many pairs of methods inflates false positives; :func:`adjust_p_values` gives the
Benjamini–Hochberg adjusted values (``scipy.stats.false_discovery_control``) to report beside the
raw ones. With 3 seeds a t-test has 2 degrees of freedom: its intervals are wide on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from itmkit.evaluate.metrics import RECALL_KS, as_score_array, i2t_ranks, t2i_ranks

PER_QUERY_METRICS = ("rsum",) + tuple(f"{side}_r{k}" for side in ("i2t", "t2i") for k in RECALL_KS)


def _finite(S: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(S).all():
        bad = np.argwhere(~np.isfinite(S))[0]
        raise ValueError(f"{name}: non-finite score at image {bad[0]}, caption {bad[1]}")
    return S


def per_image_scores(sims, metric: str = "rsum", captions_per_image: int = 5, name: str = "similarity matrix") -> np.ndarray:
    """``[n_img]`` per-image contributions whose mean is ``metric`` (see the module docstring).

    ``metric``: ``rsum`` or one recall (``i2t_r1``, ``i2t_r5``, ``i2t_r10``, ``t2i_r1``, ...).
    """
    if metric not in PER_QUERY_METRICS:
        raise ValueError(f"per_image_scores: metric {metric!r}: expected one of {PER_QUERY_METRICS}")
    S = _finite(as_score_array(sims), name)
    i2t = i2t_ranks(S, captions_per_image)  # [n_img]
    t2i = t2i_ranks(S, captions_per_image).reshape(-1, captions_per_image)  # [n_img, cpi]
    parts = {}
    for k in RECALL_KS:
        parts[f"i2t_r{k}"] = 100.0 * (i2t < k)
        parts[f"t2i_r{k}"] = 100.0 * (t2i < k).mean(axis=1)
    if metric == "rsum":
        return sum(parts.values())
    return parts[metric]


@dataclass
class PairedResult:
    """One paired comparison ``a - b``: mean difference, 95 % interval, p-value, effect size."""

    metric: str
    a: str
    b: str
    mean_a: float
    mean_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    effect_size: float  # Cohen's d_z
    n: int  # images (within a seed) or seeds (across seeds)
    test: str

    def as_dict(self) -> dict:
        return asdict(self)


def _effect_size(d: np.ndarray) -> float:
    if len(d) < 2:
        return float("nan")
    sd = float(np.std(d, ddof=1))
    if sd == 0.0:
        return 0.0 if float(np.mean(d)) == 0.0 else float(np.sign(np.mean(d)) * np.inf)
    return float(np.mean(d) / sd)


def paired_query_test(
    sims_a,
    sims_b,
    metric: str = "rsum",
    names: tuple[str, str] = ("a", "b"),
    captions_per_image: int = 5,
    n_resamples: int = 9999,
    seed: int = 0,
) -> PairedResult:
    """Compare two models' matrices on the same split, image by image.

    Interval: percentile bootstrap of the mean per-image difference; p-value: two-sided
    sign-flip permutation test (exact when ``2**n_img <= n_resamples``). Both seeded.
    """
    qa = per_image_scores(sims_a, metric, captions_per_image, names[0])
    qb = per_image_scores(sims_b, metric, captions_per_image, names[1])
    if qa.shape != qb.shape:
        raise ValueError(f"paired_query_test: {names[0]} has {len(qa)} images, {names[1]} {len(qb)}: not the same split")
    d = qa - qb
    diff = float(d.mean())
    if np.all(d == d[0]):
        low = high = diff
        p = 1.0 if diff == 0.0 else 0.0
    else:
        rng = np.random.default_rng(seed)
        boot = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=0.95,
                               method="percentile", random_state=rng)  # fmt: skip
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
        perm = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                                      n_resamples=n_resamples, alternative="two-sided", vectorized=True,
                                      random_state=np.random.default_rng(seed + 1))  # fmt: skip
        p = float(perm.pvalue)
    return PairedResult(metric, names[0], names[1], float(qa.mean()), float(qb.mean()), diff, low, high, p,
                        _effect_size(d), len(d), "per-image bootstrap + sign-flip permutation")  # fmt: skip


def paired_seed_test(values_a: Sequence[float], values_b: Sequence[float], metric: str = "rsum",
                     names: tuple[str, str] = ("a", "b")) -> PairedResult:
    """Compare two methods across seeds: ``values_*[s]`` is the metric of seed ``s`` (same seeds,
    same order). Paired t-test with its 95 % interval; needs at least two seeds."""
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_seed_test: expected two equal-length lists of per-seed values, found {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"paired_seed_test: needs at least 2 seeds, found {len(a)}")
    d = a - b
    if np.all(d == d[0]):
        low = high = float(d[0])
        p = 1.0 if d[0] == 0 else 0.0
    else:
        result = stats.ttest_rel(a, b)
        ci = result.confidence_interval(0.95)
        low, high, p = float(ci.low), float(ci.high), float(result.pvalue)
    return PairedResult(metric, names[0], names[1], float(a.mean()), float(b.mean()), float(d.mean()), low, high, p,
                        _effect_size(d), len(d), "paired t-test over seeds")  # fmt: skip


def adjust_p_values(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate) for a family of comparisons."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p
    return stats.false_discovery_control(p, method="bh")


def results_table(results: Sequence[PairedResult]) -> pd.DataFrame:
    """One row per comparison, with ``p_adjusted`` (Benjamini–Hochberg over the rows given)."""
    frame = pd.DataFrame([r.as_dict() for r in results])
    if not frame.empty:
        frame["p_adjusted"] = adjust_p_values(frame["p_value"].to_numpy())
    return frame


def bootstrap_differences(sims_a, sims_b, metric: str = "rsum", captions_per_image: int = 5,
                          n_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """``[n_resamples]`` bootstrap replicates of the mean per-image difference ``a - b`` (for
    drawing the distribution behind :func:`paired_query_test`'s interval)."""
    d = per_image_scores(sims_a, metric, captions_per_image, "a") - per_image_scores(sims_b, metric, captions_per_image, "b")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(d), size=(n_resamples, len(d)))
    return d[picks].mean(axis=1)
