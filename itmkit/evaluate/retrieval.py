"""Retrieval as data: the best candidates of a query, in both directions (baselines.md §C.1).

``sims [n_img, n_cap]`` scores every image (row) against every caption (column); caption ``c``
belongs to image ``c // captions_per_image``.

- :func:`images_for_captions`: for each query caption, its ``k`` best images (text-to-image);
- :func:`captions_for_images`: for each query image, its ``k`` best captions (image-to-text);
- :func:`top_k`: the ``k`` best of any score rows with no true match (e.g. a free-text query
  scored against every image).

Each returns a :class:`TopK` (arrays, and :meth:`TopK.frame` as a long table). The rank of a
query's best true match is the one :mod:`itmkit.evaluate.metrics` counts (``t2i_ranks`` /
``i2t_ranks``), so a listing and the recalls always agree: among candidates with the same score the true
matches are listed after the others (a tie counts against the query), then in index order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from itmkit.data.precomp import CAPTIONS_PER_IMAGE
from itmkit.evaluate.metrics import as_score_array, i2t_ranks, t2i_ranks

# Queries sorted per chunk: bounds the [chunk, n] sort temporaries.
_QUERY_CHUNK = 256


@dataclass
class TopK:
    """The ``k`` best candidates of ``q`` queries, best first.

    Attributes:
        direction: ``"t2i"`` (queries are captions, candidates images), ``"i2t"`` (queries are
            images, candidates captions) or ``"scores"`` (:func:`top_k`: rows of any scores).
        queries: ``[q]`` query indices (caption or image indices; row numbers for :func:`top_k`).
        indices: ``[q, k]`` candidate indices; scores: ``[q, k]`` their scores.
        is_match: ``[q, k]`` bool, the candidate belongs to the query (image of the caption, or
            one of the image's captions).
        match_rank: ``[q]`` 0-based rank of the query's best true match as the metrics count it
            (``R@K`` counts ``match_rank < K``); -1 where a query has no true match.
    """

    direction: str
    queries: np.ndarray
    indices: np.ndarray
    scores: np.ndarray
    is_match: np.ndarray
    match_rank: np.ndarray

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def frame(self) -> pd.DataFrame:
        """One row per (query, listed candidate): ``query``, ``position`` (1 = best), the candidate
        (``image`` for t2i, ``caption`` for i2t, ``candidate`` otherwise), ``score``, ``is_match``,
        and ``match_position`` (1-based position of the query's best true match; 0 when none)."""
        candidate = {"t2i": "image", "i2t": "caption"}.get(self.direction, "candidate")
        q, k = self.indices.shape
        return pd.DataFrame({
            "query": np.repeat(self.queries, k),
            "position": np.tile(np.arange(1, k + 1), q),
            candidate: self.indices.reshape(-1),
            "score": self.scores.reshape(-1),
            "is_match": self.is_match.reshape(-1),
            "match_position": np.repeat(self.match_rank + 1, k),
        })


def _query_indices(queries, n: int, what: str) -> np.ndarray:
    index = np.atleast_1d(np.asarray(queries))
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"{what} queries: expected integer indices, found {index.dtype} of shape {index.shape}")
    bad = index[(index < 0) | (index >= n)]
    if len(bad):
        raise IndexError(f"{what} queries: {what} {int(bad[0])}: expected an index in [0, {n})")
    return index.astype(np.int64)


def _ranked(scores: np.ndarray, k: int, truth: np.ndarray | None) -> np.ndarray:
    """``[q, k]`` candidate indices by score (higher first). Among equal scores the true matches
    come after the others (the metrics count a tie against the query), then index order; so the
    best true match lands exactly at the rank :mod:`itmkit.evaluate.metrics` gives it."""
    q, n = scores.shape
    if truth is None:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    index = np.broadcast_to(np.arange(n), (q, n))
    return np.lexsort((index, truth.astype(np.int8), -scores), axis=-1)[:, :k]


def _check_scores(scores: np.ndarray, queries: np.ndarray, k: int) -> None:
    if int(k) < 1:
        raise ValueError(f"top-k retrieval: expected k >= 1, found {k}")
    finite = np.isfinite(scores).all(axis=1)
    if not finite.all():
        query = int(queries[np.flatnonzero(~finite)[0]])
        raise ValueError(f"top-k retrieval: query {query}: expected finite scores, found NaN or inf")


def _top_k(direction, queries, scores, k, truth=None, rank=None) -> TopK:
    k = min(int(k), scores.shape[1])
    parts = []
    for start in range(0, len(queries), _QUERY_CHUNK):
        stop = start + _QUERY_CHUNK
        parts.append(_ranked(scores[start:stop], k, None if truth is None else truth[start:stop]))
    indices = np.concatenate(parts) if parts else np.zeros((0, k), dtype=np.int64)
    listed = np.take_along_axis(scores, indices, axis=1)
    is_match = np.zeros_like(indices, dtype=bool) if truth is None else np.take_along_axis(truth, indices, axis=1)
    match_rank = np.full(len(queries), -1, dtype=np.int64) if rank is None else rank
    return TopK(direction, queries, indices, listed, is_match, match_rank)


def images_for_captions(sims, captions, k: int = 5, captions_per_image: int = CAPTIONS_PER_IMAGE) -> TopK:
    """Text-to-image retrieval: the ``k`` best images of each query caption (``captions``: indices
    of ``sims``' columns), with the rank of its own image as :func:`~itmkit.evaluate.metrics.t2i_ranks`
    counts it."""
    S = as_score_array(sims)
    n_img, n_cap = S.shape
    captions = _query_indices(captions, n_cap, "caption")
    own = captions // captions_per_image
    scores = np.asarray(S[:, captions]).T  # [q, n_img]
    _check_scores(scores, captions, k)
    rank = t2i_ranks(S, captions_per_image)[captions]
    truth = np.arange(n_img)[None, :] == own[:, None]
    return _top_k("t2i", captions, scores, k, truth, rank)


def captions_for_images(sims, images, k: int = 5, captions_per_image: int = CAPTIONS_PER_IMAGE) -> TopK:
    """Image-to-text retrieval: the ``k`` best captions of each query image (``images``: row
    indices of ``sims``), with the rank of its best own caption as
    :func:`~itmkit.evaluate.metrics.i2t_ranks` counts it."""
    S = as_score_array(sims)
    n_img, n_cap = S.shape
    images = _query_indices(images, n_img, "image")
    scores = np.asarray(S[images])  # [q, n_cap]
    _check_scores(scores, images, k)
    rank = i2t_ranks(S, captions_per_image)[images]
    truth = (np.arange(n_cap)[None, :] // captions_per_image) == images[:, None]
    return _top_k("i2t", images, scores, k, truth, rank)


def top_k(scores, k: int = 5) -> TopK:
    """The ``k`` best columns of every row of ``scores [q, n]`` (or of one row ``[n]``), ties in
    index order, no true matches: e.g. a free-text query scored against every image."""
    S = np.atleast_2d(np.asarray(scores))
    if S.ndim != 2:
        raise ValueError(f"top_k scores: expected [q, n] or [n], found shape {np.shape(scores)}")
    queries = np.arange(S.shape[0])
    _check_scores(S, queries, k)
    return _top_k("scores", queries, S, k)
