"""Retrieval ranks and recalls of a similarity matrix (baselines.md §C.1).

``S [n_img, n_cap]`` holds the score of every image (row) against every caption (column);
caption ``c`` belongs to image ``c // captions_per_image``.

Tie rule (our design choice; §C.1 leaves ties open): a rank is the **number of other
candidates scoring at least as high** as the positive, so **a tie counts against the query**:
the positive is placed below every candidate with the same score (i2t: below every caption of
another image that scores as high as the image's best caption; t2i: below every other image
that scores as high as the true one). The references sort with ``np.argsort`` (unstable), so
their rank under ties depends on the sort; with no ties the two definitions agree. Counting ties
against the query keeps the number a function of the scores alone and means a model that scores
everything alike ranks every positive last instead of first: a constant matrix gives recall 0,
never 100. Ties do occur with healthy models when two images share an identical caption.

Scores must be finite: a NaN or an infinity anywhere raises :class:`NonFiniteScoresError` naming
the matrix (``source``) and the first bad entry, since any rank rule would turn them into a
number that means nothing.

No full sort is needed: a rank is one comparison of a row (column) against the positive's
score, done for whole chunks of queries at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
METRIC_NAMES = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)  # fmt: skip

# Rows (or columns) compared per chunk: bounds the boolean temporary to ~chunk * n bytes.
_CHUNK = 1024


class NonFiniteScoresError(ValueError):
    """A similarity matrix holds NaN or an infinity; the message names the matrix and the entry."""


def as_score_array(sims) -> np.ndarray:
    """A 2-D NumPy view of ``sims`` (array, memmap or tensor; tensors are moved to the CPU;
    float64 stays float64, half precision becomes float32)."""
    if isinstance(sims, torch.Tensor):
        sims = sims.detach()
        if sims.dtype != torch.float64:
            sims = sims.float()
        sims = sims.cpu().numpy()
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"similarity matrix: expected 2 dimensions [n_img, n_cap], found shape {sims.shape}")
    return sims


def check_finite_block(rows: np.ndarray, first_row: int, source: str = "similarity matrix") -> None:
    """Raise :class:`NonFiniteScoresError` if ``rows`` (rows ``first_row..`` of a matrix) holds
    a NaN or an infinity, naming ``source``, the count in the block and the first entry."""
    finite = np.isfinite(rows)
    if finite.all():
        return
    bad = np.argwhere(~finite)
    i, j = (int(v) for v in bad[0])
    raise NonFiniteScoresError(
        f"{source}: expected finite scores, found {len(bad)} non-finite in rows {first_row}-"
        f"{first_row + rows.shape[0] - 1} (first: {rows[i, j]} at image {first_row + i}, caption {j}); "
        "the model's weights or its input features hold NaN/Inf (check the data with `itmkit data verify`)"
    )


def check_finite_scores(sims, source: str = "similarity matrix") -> None:
    """:func:`check_finite_block` over a whole matrix, ``_CHUNK`` rows at a time (memmaps stay on disk)."""
    S = as_score_array(sims)
    for start in range(0, S.shape[0], _CHUNK):
        check_finite_block(np.asarray(S[start : start + _CHUNK]), start, source)


def check_caption_count(n_img: int, n_cap: int, captions_per_image: int) -> None:
    if captions_per_image < 1 or n_cap != n_img * captions_per_image:
        raise ValueError(
            f"similarity matrix: expected n_cap = {captions_per_image} x n_img = "
            f"{n_img * captions_per_image} columns for {n_img} images, found {n_cap}"
        )


def i2t_ranks(sims, captions_per_image: int = 5, source: str = "similarity matrix") -> np.ndarray:
    """Caption-retrieval ranks ``[n_img]`` (0-based; §C.1).

    Rank of image ``i`` = number of **other images'** captions scoring at least as high as the
    best of its own ``captions_per_image`` captions (columns ``i * cpi .. i * cpi + cpi - 1``):
    ties count against the image (module docstring). Non-finite scores raise, naming ``source``.
    """
    S = as_score_array(sims)
    n_img, n_cap = S.shape
    check_caption_count(n_img, n_cap, captions_per_image)
    ranks = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, _CHUNK):
        rows = np.asarray(S[start : start + _CHUNK])
        check_finite_block(rows, start, source)
        n = rows.shape[0]
        own = rows.reshape(n, n_img, captions_per_image)[np.arange(n), np.arange(start, start + n)]
        best = own.max(axis=1)  # [n]
        # every caption at or above the best own one, less the own captions among them
        ranks[start : start + n] = (rows >= best[:, None]).sum(axis=1) - (own >= best[:, None]).sum(axis=1)
    return ranks


def t2i_ranks(sims, captions_per_image: int = 5, source: str = "similarity matrix") -> np.ndarray:
    """Image-retrieval ranks ``[n_cap]`` (0-based; §C.1).

    Rank of caption ``c`` = number of **other** images scoring at least as high on column ``c``
    as image ``c // captions_per_image``: ties count against the caption (module docstring).
    Non-finite scores raise, naming ``source``.
    """
    S = as_score_array(sims)
    n_img, n_cap = S.shape
    check_caption_count(n_img, n_cap, captions_per_image)
    owner = np.arange(n_cap) // captions_per_image
    positive = np.asarray(S[owner, np.arange(n_cap)])  # [n_cap]
    ranks = np.zeros(n_cap, dtype=np.int64)
    for start in range(0, n_img, _CHUNK):
        rows = np.asarray(S[start : start + _CHUNK])  # images chunk x all captions
        check_finite_block(rows, start, source)
        ranks += (rows >= positive[None, :]).sum(axis=0)
    return ranks - 1  # the true image itself is always counted once


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """``100 * mean(rank < k)``: the positive is among the top ``k`` (0-based ranks)."""
    return float(100.0 * np.mean(np.asarray(ranks) < k))


def rank_summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@1/5/10, ``medr = floor(median) + 1`` and ``meanr = mean + 1`` (1-based, §C.1)."""
    ranks = np.asarray(ranks)
    out = {f"{prefix}_r{k}": recall_at_k(ranks, k) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(math.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return out


def recall_metrics(sims, captions_per_image: int = 5, source: str = "similarity matrix") -> dict[str, float]:
    """All metrics of §C.1 for ``sims [n_img, n_cap]``: i2t and t2i R@1/5/10, medr, meanr, rsum.

    ``rsum`` is the sum of the six recalls (i2t and t2i R@1, R@5, R@10). Ties count against the
    query; NaN or Inf raise :class:`NonFiniteScoresError` naming ``source``.
    """
    metrics = rank_summary(i2t_ranks(sims, captions_per_image, source), "i2t")
    metrics.update(rank_summary(t2i_ranks(sims, captions_per_image, source), "t2i"))
    metrics["rsum"] = sum(metrics[f"{side}_r{k}"] for side in ("i2t", "t2i") for k in RECALL_KS)
    return {name: metrics[name] for name in METRIC_NAMES}
