"""Ensembles: average the similarity matrices of several models, then evaluate (§C.3).

Any methods can be combined: only their ``[n_img, n_cap]`` matrices over the same split (same
image and caption order) are needed. The 5-fold protocol slices the *averaged* 5K matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from itmkit.evaluate.collapse import check_not_collapsed
from itmkit.evaluate.metrics import as_score_array, check_finite_scores
from itmkit.evaluate.protocols import evaluate_protocols
from itmkit.evaluate.result import EvalResult
from itmkit.evaluate.similarity_file import load_similarity

_ROWS_PER_CHUNK = 512  # averaged a block of rows at a time: no float64 copy of a 5K x 25K matrix


def _source_name(source, index: int) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"matrix #{index}"


def average_similarities(sources: Sequence, weights: Sequence[float] | None = None,
                         allow_pickle: bool = False) -> np.ndarray:
    """Weighted mean ``[n_img, n_cap]`` of two or more matrices or saved files: float32, or
    float64 when any input is float64 (a float64 evaluation's ``sims.npy``).

    ``weights=None`` gives equal weights; weights are normalised to sum to 1. A NaN or an
    infinity in any input raises, naming that input.
    """
    if len(sources) < 2:
        raise ValueError(f"ensemble: expected two or more similarity matrices, found {len(sources)}")
    if weights is None:
        weights = [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"ensemble: expected one weight per matrix ({len(sources)}), found {len(weights)}")
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"ensemble weights: expected finite non-negative numbers with a positive sum, found {weights.tolist()}")
    weights = weights / weights.sum()

    matrices = []
    for i, src in enumerate(sources):
        S = load_similarity(src, allow_pickle=allow_pickle) if isinstance(src, (str, Path)) else as_score_array(src)
        check_finite_scores(S, _source_name(src, i))
        matrices.append(S)
        if S.shape != matrices[0].shape:
            raise ValueError(
                f"ensemble: {_source_name(src, i)}: expected shape {matrices[0].shape} "
                f"(as {_source_name(sources[0], 0)}), found {S.shape}"
            )
    n_img = matrices[0].shape[0]
    dtype = np.float64 if any(S.dtype == np.float64 for S in matrices) else np.float32
    mean = np.zeros(matrices[0].shape, dtype=dtype)
    for start in range(0, n_img, _ROWS_PER_CHUNK):
        rows = slice(start, start + _ROWS_PER_CHUNK)
        acc = np.zeros(mean[rows].shape, dtype=np.float64)
        for w, S in zip(weights, matrices):
            acc += w * np.asarray(S[rows], dtype=np.float64)
        mean[rows] = acc
    return mean


def evaluate_ensemble(sources: Sequence, protocols="test", weights: Sequence[float] | None = None,
                      captions_per_image: int = 5, out_dir=None, allow_pickle: bool = False) -> EvalResult:
    """Average ``sources`` (paths or arrays), evaluate under ``protocols``; save to ``out_dir`` if given."""
    sims = average_similarities(sources, weights, allow_pickle=allow_pickle)
    names = [_source_name(s, i) for i, s in enumerate(sources)]
    source = f"ensemble of {', '.join(names)}"
    check_not_collapsed(sims, source)
    metrics = evaluate_protocols(sims, protocols, captions_per_image, source)
    info = {
        "sources": names,
        "weights": None if weights is None else [float(w) for w in weights],
    }
    result = EvalResult(sims=sims, metrics=metrics, info=info)
    if out_dir is not None:
        result.save(out_dir)
    return result
