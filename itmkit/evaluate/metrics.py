"""Retrieval ranks and recalls of a similarity matrix (baselines.md §C.1).

``S [n_img, n_cap]`` holds the score of every image (row) against every caption (column);
caption ``c`` belongs to image ``c // captions_per_image``.

Tie rule (§C.1): a rank is the **number of candidates scoring strictly higher** than the
positive. The references sort with ``np.argsort`` (unstable), so their rank under ties depends
on the sort; with no ties the two definitions agree. Under ties the positive wins here (an
optimistic rank), which keeps the number a function of the scores alone.

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


def as_score_array(sims) -> np.ndarray:
    """A 2-D NumPy view of ``sims`` (array, memmap or tensor; tensors are moved to the CPU)."""
    if isinstance(sims, torch.Tensor):
        sims = sims.detach().float().cpu().numpy()
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"similarity matrix: expected 2 dimensions [n_img, n_cap], found shape {sims.shape}")
    return sims


def check_caption_count(n_img: int, n_cap: int, captions_per_image: int) -> None:
    if captions_per_image < 1 or n_cap != n_img * captions_per_image:
        raise ValueError(
            f"similarity matrix: expected n_cap = {captions_per_image} x n_img = "
            f"{n_img * captions_per_image} columns for {n_img} images, found {n_cap}"
        )


def i2t_ranks(sims, captions_per_image: int = 5) -> np.ndarray:
    """Caption-retrieval ranks ``[n_img]`` (0-based; §C.1).

    Rank of image ``i`` = number of captions scoring strictly higher than the best of its own
    ``captions_per_image`` captions (columns ``i * cpi .. i * cpi + cpi - 1``).
    """
    S = as_score_array(sims)
    n_img, n_cap = S.shape
    check_caption_count(n_img, n_cap, captions_per_image)
    ranks = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, _CHUNK):
        rows = np.asarray(S[start : start + _CHUNK])
        n = rows.shape[0]
        own = rows.reshape(n, n_img, captions_per_image)[np.arange(n), np.arange(start, start + n)]
        best = own.max(axis=1)  # [n]
        ranks[start : start + n] = (rows > best[:, None]).sum(axis=1)
    return ranks


def t2i_ranks(sims, captions_per_image: int = 5) -> np.ndarray:
    """Image-retrieval ranks ``[n_cap]`` (0-based; §C.1).

    Rank of caption ``c`` = number of images scoring strictly higher on column ``c`` than
    image ``c // captions_per_image``.
    """
    S = as_score_array(sims)
    n_img, n_cap = S.shape
    check_caption_count(n_img, n_cap, captions_per_image)
    owner = np.arange(n_cap) // captions_per_image
    positive = np.asarray(S[owner, np.arange(n_cap)])  # [n_cap]
    ranks = np.zeros(n_cap, dtype=np.int64)
    for start in range(0, n_img, _CHUNK):
        rows = np.asarray(S[start : start + _CHUNK])  # images chunk x all captions
        ranks += (rows > positive[None, :]).sum(axis=0)
    return ranks


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


def recall_metrics(sims, captions_per_image: int = 5) -> dict[str, float]:
    """All metrics of §C.1 for ``sims [n_img, n_cap]``: i2t and t2i R@1/5/10, medr, meanr, rsum.

    ``rsum`` is the sum of the six recalls (i2t and t2i R@1, R@5, R@10).
    """
    metrics = rank_summary(i2t_ranks(sims, captions_per_image), "i2t")
    metrics.update(rank_summary(t2i_ranks(sims, captions_per_image), "t2i"))
    metrics["rsum"] = sum(metrics[f"{side}_r{k}"] for side in ("i2t", "t2i") for k in RECALL_KS)
    return {name: metrics[name] for name in METRIC_NAMES}
