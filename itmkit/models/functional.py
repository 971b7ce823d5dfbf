"""Stateless tensor functions shared by every encoder: normalisation, masks and masked pooling.

All functions take padded sets ``x [B, T, d]`` with ``lengths [B]`` (valid positions first) and
never read the padded positions, so garbage in the padding cannot change a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (||x||_2 + eps)`` along ``dim`` (baselines.md §B.2 step 3, scan.md §3.1).

    The eps is added to the norm, not under the square root, as every reference does; a zero
    vector (a padded word) stays exactly zero. ``vector_norm`` rather than ``pow.sum.sqrt`` so
    the gradient at a zero vector is 0 instead of NaN.
    """
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def check_lengths(lengths: Tensor, batch: int, max_len: int, name: str = "lengths") -> None:
    """Raise ``ValueError`` naming the field unless ``lengths`` is ``[batch]`` with 1 <= n <= max_len."""
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},), found {tuple(lengths.shape)}")
    if batch == 0:
        return
    low, high = int(lengths.min()), int(lengths.max())
    if low < 1 or high > max_len:
        raise ValueError(f"{name}: expected values in [1, {max_len}] (the padded set size), found [{low}, {high}]")


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``[B, max_len]`` bool, True at positions ``t < lengths[b]``."""
    steps = torch.arange(max_len, device=lengths.device)
    return steps[None, :] < lengths[:, None]


def zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    """``x [B, T, d]`` with every position ``t >= lengths[b]`` set to 0."""
    mask = length_mask(lengths.to(x.device), x.shape[1])
    return x.masked_fill(~mask[:, :, None], 0.0)


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean over the valid positions: ``x [B, T, d]``, ``lengths [B]`` -> ``[B, d]``."""
    lengths = lengths.to(x.device)
    total = zero_padding(x, lengths).sum(dim=1)
    return total / lengths[:, None].to(x.dtype)


def masked_max(x: Tensor, lengths: Tensor) -> Tensor:
    """Per-dimension maximum over the valid positions: ``x [B, T, d]`` -> ``[B, d]``."""
    mask = length_mask(lengths.to(x.device), x.shape[1])
    return x.masked_fill(~mask[:, :, None], float("-inf")).amax(dim=1)
