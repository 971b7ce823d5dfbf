"""The VSE++ hinge triplet loss used by VSE∞ and most matching methods (baselines.md §B.5), and
HREM's triplet loss with distance-weighted negative sampling (hrem.md §5.1)."""

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


# ----------------------------------------------------------------------------- distance-weighted triplet (HREM, AAHR)

#: HREM's triplet constants (hrem.md §5.1): the sampler's dimension ``D`` is hard-coded to 512
#: whatever the embedding size, the distance is clamped below at 0.5, the margin is its own 0.2.
TRIPLET_DIM = 512
TRIPLET_MIN_DISTANCE = 0.5
TRIPLET_CUTOFF = {"f30k": 1.7, "coco": 1.9}


def distance_sampling_weights(
    scores: Tensor,
    positives: Tensor,
    cutoff: float = 1.7,
    dim: int = TRIPLET_DIM,
    min_distance: float = TRIPLET_MIN_DISTANCE,
    dtype: torch.dtype = torch.float32,
    cutoff_before_max: bool = False,
) -> Tensor:
    """Per-anchor probabilities of drawing each negative, "Sampling Matters" style (hrem.md §5.1).

    ``dist = max(sqrt(2 − 2 S), 0.5)``; ``log w = (2 − D) log dist − ((D − 3)/2) log(1 − dist²/4)``
    (inf / NaN entries and positives -> 0); ``w = exp(log w − max_row log w)``, then zero on
    positives and where ``dist >= cutoff``, rows normalised (``+ 1e-20``). With ``D = 512`` this is
    nearly deterministic: the eligible negative with the largest ``|s|`` wins.

    Args:
        scores: ``S [B_anchor, B]`` (rows = anchors), unit-vector dot products.
        positives: ``[B_anchor, B]`` bool, True for the anchor's positives (same image id).
        cutoff: the distance cut (1.7 f30k, 1.9 COCO).
        dtype: float32 reproduces the reference, whose row maximum (taken before the cutoff) can
            make every eligible weight underflow to exactly 0 (§5.1, §8.3); float64 avoids that.
        cutoff_before_max: take the row maximum over the eligible negatives only (itmkit option,
            also avoids the underflow; default False = reference).

    Returns:
        ``[B_anchor, B]`` weights of ``dtype``; no gradient. A row sums to 1, to 0 for an anchor
        without an eligible negative, or to less than 1 when its eligible weights are tiny next to
        the ``1e-20`` of the normalisation (the row maximum came from a cut-off negative).
    """
    with torch.no_grad():
        s = scores.detach().to(dtype)
        negatives = ~positives.to(device=s.device, dtype=torch.bool)
        dist = (2.0 - 2.0 * s).sqrt().clamp(min=min_distance)
        log_w = (2.0 - dim) * dist.log() - ((dim - 3.0) / 2.0) * (1.0 - 0.25 * dist * dist).log()
        broken = torch.isinf(log_w) | torch.isnan(log_w)
        log_w = (log_w * negatives).masked_fill(broken, 0.0)
        eligible = negatives & (dist < cutoff)  # NaN distances compare False: never eligible
        if cutoff_before_max:
            row_max = log_w.masked_fill(~eligible, float("-inf")).amax(dim=1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        else:  # reference: the maximum runs over every column, positives' zeros included
            row_max = log_w.amax(dim=1, keepdim=True)
        # ineligible entries -> 0 before exp (an entry above the eligible maximum would overflow)
        weights = (log_w - row_max).masked_fill(~eligible, float("-inf")).exp()
        return weights / (weights.sum(dim=1, keepdim=True) + 1e-20)


def draw_negatives(weights: Tensor) -> Tensor:
    """One negative per row of ``weights [P, B]`` with ``torch.multinomial`` (the reference's draw)."""
    return torch.multinomial(weights, 1).squeeze(1)


def argmax_negatives(weights: Tensor) -> Tensor:
    """The most probable negative per row: the reference's draw whenever the weights are peaked
    (they nearly always are with ``D = 512``); deterministic, for tests and notebooks."""
    return weights.argmax(dim=1)


def distance_weighted_triplet_loss(
    scores: Tensor,
    positives: Tensor,
    margin: float = 0.2,
    cutoff: float = 1.7,
    sampler=draw_negatives,
    **weight_options,
) -> tuple[Tensor, int]:
    """HREM's ``TripletLoss`` with distance-weighted negative sampling, both directions (hrem.md §5.1).

    For every positive pair ``(a, p)`` (row-major order of ``positives.nonzero()``) one negative ``n``
    is drawn from :func:`distance_sampling_weights` of row ``a`` and ``relu(margin + S[a, n] − S[a, p])``
    is summed; image anchors on ``S``, then caption anchors on ``Sᵀ``.

    A direction in which some anchor has no eligible negative (all cut off or underflowed) makes
    the reference's ``torch.multinomial`` raise, and its ``except`` returns 0 for that whole
    direction; so does this function (without hiding other errors), and it counts those directions.

    Args:
        scores: ``S [B, B]`` (row = image of pair ``a``, column = caption of pair ``b``).
        positives: ``[B, B]`` bool, same image id (:func:`same_image_mask`; diagonal True).
        margin: 0.2, hard-coded in the reference.
        cutoff: 1.7 (f30k) / 1.9 (COCO).
        sampler: ``f(weights [P, B]) -> [P]`` negative indices (:func:`draw_negatives`, or
            :func:`argmax_negatives` for a deterministic draw).
        weight_options: ``dtype``, ``cutoff_before_max``, ``dim``, ``min_distance`` of
            :func:`distance_sampling_weights`.

    Returns:
        ``(loss, zero_directions)``: the summed loss (scalar, connected to ``scores`` even when 0)
        and how many of the two directions returned 0 for want of a negative.
    """
    if scores.dim() != 2 or scores.shape != positives.shape:
        raise ValueError(
            f"distance_weighted_triplet_loss: expected scores [B, B] and positives of the same shape, found "
            f"{tuple(scores.shape)} and {tuple(positives.shape)}"
        )
    positives = positives.to(device=scores.device, dtype=torch.bool)
    total = scores.sum() * 0.0
    zero_directions = 0
    for s, pos in ((scores, positives), (scores.t(), positives.t())):
        anchor, positive = pos.nonzero(as_tuple=True)
        weights = distance_sampling_weights(s, pos, cutoff=cutoff, **weight_options)[anchor]
        if not bool(torch.isfinite(weights).all()) or bool((weights.sum(dim=1) <= 0).any()):
            zero_directions += 1  # where the reference's multinomial raises
            continue
        negative = sampler(weights)
        total = total + torch.relu(margin + s[anchor, negative] - s[anchor, positive]).sum()
    return total, zero_directions
