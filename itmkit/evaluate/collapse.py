"""Collapsed scores: a model that gives every pair (nearly) the same score no longer ranks.

Hinge training with hardest negatives can drive every score of a model to one value (the
scores "collapse"; docs/training_and_evaluation.md). It is detected from the scores
themselves: their standard deviation over a whole similarity matrix against their magnitude.

Two tiers (our design choice), on ``ratio = std(S) / max|S|`` (0 for an all-zero matrix):

- **collapsed**, ``ratio <= COLLAPSE_RTOL = 1e-5``: the scores agree to five significant
  digits; float32 keeps about seven, so what order is left among them is rounding noise. An
  evaluation refuses such a matrix (:class:`CollapsedScoresError`) and the trainer never selects
  such an epoch as its best.
- **nearly collapsed**, ``ratio <= NEAR_COLLAPSE_RTOL = 1e-3``: hardest negatives have squeezed
  the scores towards one value; the model may still rank a little (it stays a candidate for
  the best epoch), so the trainer only warns.

Measured dev ratios (embedded course set, seed 0, loaded machine): VSE∞'s ``course`` preset
0.27 in its sum-mode epochs, 0.013-0.027 in epochs 3-6 after the switch to hardest negatives
(loss 25.6 = ``2 · margin · batch``, the old rule's false alarm, while dev rsum rises 451 -> 518),
then 0.06-0.12; SGR's ``course`` preset 0.17-0.20, then 0.09-0.13 after the switch; SGR with
hardest negatives after one warm-up epoch (loss stuck at ``2 · margin · batch``, dev rsum 79,
99): 1.4e-4, 6.4e-5; a model scoring everything alike 0. The 1e-3 tier sits about 7x below
the lowest healthy value and 7x above the squeezed SGR.
Non-finite scores are a separate error
(:class:`~itmkit.evaluate.metrics.NonFiniteScoresError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from itmkit.evaluate.metrics import as_score_array, check_finite_block

COLLAPSE_RTOL = 1e-5
NEAR_COLLAPSE_RTOL = 1e-3
_ROWS_PER_CHUNK = 1024  # memmapped matrices are read a block of rows at a time


class ScoreCollapseWarning(UserWarning):
    """A training epoch ended with collapsed or nearly collapsed dev scores (:func:`score_spread`)."""


class CollapsedScoresError(ValueError):
    """A similarity matrix to evaluate is collapsed: every score (nearly) equal."""


@dataclass(frozen=True)
class ScoreSpread:
    """Spread of a similarity matrix: ``std`` and ``scale = max|S|`` (float64), ``mean``."""

    mean: float
    std: float
    scale: float

    @property
    def relative(self) -> float:
        """``std / max|S|`` (0 for an all-zero matrix)."""
        return self.std / self.scale if self.scale > 0 else 0.0

    @property
    def collapsed(self) -> bool:
        return self.std <= COLLAPSE_RTOL * self.scale

    @property
    def nearly_collapsed(self) -> bool:
        """Collapsed, or close to it (:data:`NEAR_COLLAPSE_RTOL`)."""
        return self.std <= NEAR_COLLAPSE_RTOL * self.scale

    def describe(self) -> str:
        return f"std {self.std:.3g} over max |score| {self.scale:.3g} (ratio {self.relative:.2g}, mean {self.mean:.4g})"


def score_spread(sims, source: str = "similarity matrix") -> ScoreSpread:
    """:class:`ScoreSpread` of ``sims [n_img, n_cap]`` in float64, a block of rows at a time.

    Values are shifted by the first score before summing squares, so a constant matrix has a
    standard deviation of exactly 0. Non-finite scores raise naming ``source``.
    """
    S = as_score_array(sims)
    if S.size == 0:
        raise ValueError(f"{source}: expected a non-empty similarity matrix, found shape {S.shape}")
    shift = float(S[0, 0]) if math.isfinite(float(S[0, 0])) else 0.0
    total = squares = 0.0
    scale = 0.0
    for start in range(0, S.shape[0], _ROWS_PER_CHUNK):
        rows = np.asarray(S[start : start + _ROWS_PER_CHUNK])
        check_finite_block(rows, start, source)
        centred = rows.astype(np.float64) - shift
        total += float(centred.sum())
        squares += float(np.square(centred).sum())
        scale = max(scale, float(np.abs(rows).max()))
    mean = total / S.size
    variance = max(0.0, squares / S.size - mean * mean)
    return ScoreSpread(mean=mean + shift, std=math.sqrt(variance), scale=scale)


def check_not_collapsed(sims, source: str = "similarity matrix") -> ScoreSpread:
    """Raise :class:`CollapsedScoresError` naming ``source`` when ``sims`` is collapsed
    (:data:`COLLAPSE_RTOL`); returns the spread otherwise."""
    spread = score_spread(sims, source)
    if spread.collapsed:
        raise CollapsedScoresError(
            f"{source}: expected scores that differ between pairs, found collapsed scores ({spread.describe()}): "
            "the model gives every image-caption pair the same score and ranks nothing; it was trained into "
            "collapse (see docs/training_and_evaluation.md, 'Score collapse')"
        )
    return spread
