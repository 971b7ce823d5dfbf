"""What a set of vectors encodes, measured: principal components and nearest-neighbour agreement.

Used on region features (notebook 01: do CNN RoI features group by colour or by shape?) and on
learned embeddings (notebook 10: what HREM's relation losses change). Both are plain linear
algebra on ``[n, d]`` arrays, kept here so every notebook and test measures them the same way.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def principal_components(vectors, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` principal components of ``vectors [n, d]``.

    Returns ``(coords [n, k], explained [k])``: each vector's coordinates along the components
    (of the centred vectors; signs as the SVD gives them) and the share of the total variance each
    component explains (sums to at most 1).
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"principal_components: expected vectors [n >= 2, d], found shape {x.shape}")
    if not 1 <= k <= min(x.shape):
        raise ValueError(f"principal_components: expected 1 <= k <= {min(x.shape)}, found {k}")
    centred = x - x.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    total = float((singular**2).sum())
    explained = singular[:k] ** 2 / total if total > 0 else np.zeros(k)
    return centred @ components[:k].T, explained


def nearest_neighbours(vectors, groups: Sequence | np.ndarray | None = None) -> np.ndarray:
    """``[n]`` index of each vector's nearest other vector by cosine similarity.

    ``groups`` (``[n]``, optional): vectors of the same group are never each other's neighbour
    (e.g. the jittered boxes of one object, whose features are trivially alike). A vector with
    no candidate left raises ``ValueError``.
    """
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"nearest_neighbours: vector {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros (no direction)")
    unit = x / norms
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -np.inf)
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (len(x),):
            raise ValueError(f"nearest_neighbours: expected one group per vector ({len(x)}), found shape {g.shape}")
        cosine[g[:, None] == g[None, :]] = -np.inf
    if np.any(np.all(np.isinf(cosine), axis=1)):
        raise ValueError("nearest_neighbours: some vector has no candidate outside its own group")
    return cosine.argmax(axis=1)


def neighbour_agreement(vectors, labels: Mapping[str, Sequence], groups=None) -> dict[str, float]:
    """Per label kind, the % of vectors whose nearest neighbour (:func:`nearest_neighbours`)
    carries the same label, e.g. ``{"colour": 71.0, "shape": 20.3}``."""
    nearest = nearest_neighbours(vectors, groups)
    result = {}
    for name, values in labels.items():
        v = np.asarray(values)
        if len(v) != len(nearest):
            raise ValueError(f"neighbour_agreement: label {name!r}: expected {len(nearest)} values, found {len(v)}")
        result[name] = float(100 * np.mean(v[nearest] == v))
    return result


def batch_embeddings(model, batch) -> tuple[np.ndarray, np.ndarray]:
    """Test-time embeddings ``([B, d], [B, d])`` of a training batch's images and captions
    (eval mode, no gradient; the model's mode is restored), for embedding methods (VSE∞, HREM,
    AAHR) whose ``encode_*`` give one vector per item."""
    import torch

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch = batch.to(device)
        with torch.no_grad():
            images = model.encode_images(batch.images, batch.img_lengths).feats
            captions = model.encode_captions(batch.tokens, batch.cap_lengths).feats
    finally:
        model.train(was_training)
    if images.dim() != 2:
        raise ValueError(f"batch_embeddings: expected one vector per item [B, d], found {tuple(images.shape)} (a pairwise method?)")
    return images.float().cpu().numpy(), captions.float().cpu().numpy()


def cross_modal_agreement(images, captions, image_index) -> float:
    """% of items whose nearest item of the *other* modality (cosine) belongs to the same image:
    ``images [B, d]``, ``captions [B, d]`` of one batch, ``image_index [B]`` the image of each pair."""
    vectors = np.concatenate([np.asarray(images), np.asarray(captions)])
    owner = np.concatenate([np.asarray(image_index), np.asarray(image_index)])
    modality = np.repeat([0, 1], len(images))
    return neighbour_agreement(vectors, {"image": owner}, groups=modality)["image"]
