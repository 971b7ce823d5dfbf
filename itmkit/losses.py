"""The VSE++ hinge triplet loss used by VSE∞ and most matching methods (baselines.md §B.5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from itmkit.config import TrainConfig


def same_image_mask(image_index: Tensor) -> Tensor:
    """``image_index [B]`` (image of each pair in the batch) -> ``[B, B]`` bool, True where the
    image of row ``i`` is the image of caption ``j``: pairs that must not count as negatives."""
    return image_index[:, None] == image_index[None, :]


def hinge_triplet_loss(
    scores: Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    positives: Tensor | None = None,
) -> Tensor:
    """Bidirectional hinge loss on a batch's score matrix, **summed** over the batch (§B.5).

    Args:
        scores: ``S [B, B]``, row = image, column = caption; ``S[i, i]`` are the matching pairs.
        margin: ``m`` (0.2 in every recipe).
        max_violation: True: hardest negative per anchor (VSE++); False: sum over all negatives.
        positives: optional ``[B, B]`` bool, True where (image ``i``, caption ``j``) also match
            (e.g. :func:`same_image_mask`); those entries are not negatives. ``None`` keeps the
            reference behaviour: only the diagonal is excluded, so two captions of one image in a
            batch are each other's negatives.

    Returns:
        scalar: ``sum cost_s + sum cost_im`` (sum mode) or
        ``sum_i max_j cost_s[i, j] + sum_j max_i cost_im[i, j]`` (max-violation), with
        ``cost_s[i, j] = [m + S[i, j] - S[i, i]]_+`` and ``cost_im[i, j] = [m + S[i, j] - S[j, j]]_+``.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"hinge_triplet_loss scores: expected a square [B, B] matrix, found {tuple(scores.shape)}")
    batch = scores.shape[0]
    diagonal = scores.diagonal()
    cost_caption = (margin + scores - diagonal[:, None]).clamp(min=0)  # captions j as negatives of image i
    cost_image = (margin + scores - diagonal[None, :]).clamp(min=0)  # images i as negatives of caption j
    excluded = torch.eye(batch, dtype=torch.bool, device=scores.device)
    if positives is not None:
        if positives.shape != scores.shape:
            raise ValueError(
                f"hinge_triplet_loss positives: expected a [B, B] = {tuple(scores.shape)} mask, "
                f"found {tuple(positives.shape)}"
            )
        excluded = excluded | positives.to(device=scores.device, dtype=torch.bool)
    cost_caption = cost_caption.masked_fill(excluded, 0.0)
    cost_image = cost_image.masked_fill(excluded, 0.0)
    if max_violation:
        return cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
    return cost_caption.sum() + cost_image.sum()


def use_max_violation(epoch: int, train_cfg: "TrainConfig") -> bool:
    """Whether epoch ``epoch`` (0-based) uses hardest negatives: the reference rule (§B.5),
    ``max_violation or epoch >= sum_warmup_epochs``.

    VSE∞'s ``train.py`` switches hardest negatives on at the start of every epoch from
    ``vse_mean_warmup_epochs`` on, and ``--max_violation`` turns them on from the first step;
    so ``train.max_violation`` is that flag (off in the VSE∞ recipes, whose one sum-mode epoch
    comes from ``sum_warmup_epochs = 1``) and sum mode throughout needs
    ``sum_warmup_epochs >= epochs``.
    """
    return bool(train_cfg.max_violation) or epoch >= train_cfg.sum_warmup_epochs
