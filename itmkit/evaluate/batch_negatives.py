"""How the batch size changes what the hardest-negative loss sees (notebook 12, docs/gpu_training.md).

The hinge loss with hardest negatives (VSE++, baselines.md §B.5) takes, for every image of a
training batch, the most offending caption *in that batch*, and the other way round. A bigger
batch holds harder negatives: that is why the papers' batch of 128 matters, why DDP gathers an
embedding method's encodings across GPUs, and why gradient accumulation (which finds negatives
per micro-batch) is not the same as a bigger batch.

:func:`hardest_negatives_by_batch_size` measures it on a trained model's score matrix
``S [n_img, n_cap]`` (5 captions per image, caption ``c`` of image ``c // 5``): it draws batches
of ``B`` distinct images with one of their captions each (as a training batch holds them, minus
the rare second caption of an image) and reports, per ``B``, the mean hardest-negative score and
hinge per anchor, the share of anchors whose hardest negative violates the margin, and the
loss per pair.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

from itmkit.losses import hinge_triplet_loss


def hardest_negatives_by_batch_size(sims: np.ndarray, batch_sizes: Iterable[int], n_batches: int = 50, seed: int = 0,
                                    margin: float = 0.2, captions_per_image: int = 5) -> pd.DataFrame:  # fmt: skip
    """One row per batch size ``B``, averaged over ``n_batches`` drawn batches (both directions).

    Columns: ``batch_size``; ``hardest_negative`` (mean over anchors of the hardest negative's
    score); ``positive`` (mean matching score); ``hardest_hinge`` (mean ``[m + S_neg - S_pos]_+``
    of the hardest negative); ``violating`` (share of anchors whose hardest negative is within the
    margin); ``loss_per_pair`` (the max-violation hinge loss of the batch divided by ``B``, which
    equals ``2 * hardest_hinge``).

    Batches are drawn from ``numpy.random.default_rng(seed)``: the same arguments give the same table.
    """
    scores = np.asarray(sims, dtype=np.float64)
    n_img, n_cap = scores.shape
    if n_cap != n_img * captions_per_image:
        raise ValueError(f"hardest_negatives_by_batch_size: sims has {n_img} image rows and {n_cap} caption columns; "
                         f"expected {captions_per_image} captions per image ({n_img * captions_per_image} columns)")  # fmt: skip
    if not np.isfinite(scores).all():
        raise ValueError("hardest_negatives_by_batch_size: sims holds NaN or infinite scores")
    rng = np.random.default_rng(seed)
    rows = []
    for size in batch_sizes:
        if not 2 <= size <= n_img:
            raise ValueError(f"hardest_negatives_by_batch_size: batch size {size}: expected 2 to {n_img} (the images)")
        hardest, positive, hinge, violating, loss = [], [], [], [], []
        for _ in range(n_batches):
            images = rng.choice(n_img, size=size, replace=False)
            captions = images * captions_per_image + rng.integers(0, captions_per_image, size=size)
            block = torch.from_numpy(scores[np.ix_(images, captions)])  # [B, B], diagonal = matching pairs
            diagonal = block.diagonal()
            off = block.masked_fill(torch.eye(size, dtype=torch.bool), -torch.inf)
            negative = torch.cat([off.max(dim=1).values, off.max(dim=0).values])  # per image, then per caption
            anchor_positive = torch.cat([diagonal, diagonal])
            cost = (margin + negative - anchor_positive).clamp(min=0)
            hardest.append(float(negative.mean()))
            positive.append(float(diagonal.mean()))
            hinge.append(float(cost.mean()))
            violating.append(float((cost > 0).double().mean()))
            loss.append(float(hinge_triplet_loss(block, margin=margin, max_violation=True)) / size)
        rows.append({"batch_size": int(size), "hardest_negative": np.mean(hardest), "positive": np.mean(positive),
                     "hardest_hinge": np.mean(hinge), "violating": np.mean(violating), "loss_per_pair": np.mean(loss)})  # fmt: skip
    return pd.DataFrame(rows)
