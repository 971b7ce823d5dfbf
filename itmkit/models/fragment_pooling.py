"""HREM's fragment-level relation modelling: max-k pooling mixed with a Transformer + mean (hrem.md §3.2).

A set of fragments (projected regions or word states) ``x [B, T, d]`` with ``lengths [B]`` becomes
one vector per item::

    r = maxk_pool(x, k=2)                          # per feature, mean of the k largest valid values
    z = mean over valid positions of Transformer(x, key-padding mask)
    e = β · r + (1 − β) · z                         # β = residual_weight = 0.8

No positional encoding and symmetric poolings: the result does not depend on the order of the
valid fragments, and the padded positions (masked in the attention, excluded from both poolings)
never reach it, whatever they hold. AAHR reuses :func:`maxk_pool` and the Transformer layer with
its own attention pooling instead of the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itmkit.models.functional import check_lengths, length_mask, masked_mean


def maxk_pool(x: Tensor, lengths: Tensor, k: int = 2, carry_over: bool = False) -> Tensor:
    """Per feature, the mean of the ``k`` largest values over the valid positions (hrem.md §3.2 step 2).

    Args:
        x: ``[B, T, d]`` fragments; positions ``>= lengths[b]`` are ignored whatever they hold.
        lengths: ``[B]`` valid positions (>= 1).
        k: how many of the largest values to average; an item with fewer than ``k`` valid
            positions averages all of them (``k_b = min(k, n_b)``).
        carry_over: reproduce the reference quirk of ``maxk_pool1d_var``: its loop re-binds ``k``
            to ``min(k, n_b)``, so a short item lowers ``k`` for every later item of the batch
            (``k_b = min(k, n_1, ..., n_b)``). Never triggers with >= k fragments per item.

    Returns:
        ``[B, d]``.
    """
    if x.dim() != 3:
        raise ValueError(f"maxk_pool x: expected [B, T, d], found shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"maxk_pool k: expected >= 1, found {k}")
    lengths = lengths.to(x.device).long()
    check_lengths(lengths, x.shape[0], x.shape[1])
    k_items = lengths.clamp(max=k)
    if carry_over:
        k_items = torch.cummin(k_items, dim=0).values
    top = min(k, x.shape[1])
    valid = length_mask(lengths, x.shape[1])
    largest = x.masked_fill(~valid[:, :, None], float("-inf")).topk(top, dim=1).values  # [B, top, d]
    keep = length_mask(k_items, top)[:, :, None]
    # where() rather than a product: the masked-out entries may be -inf
    return torch.where(keep, largest, torch.zeros_like(largest)).sum(dim=1) / k_items[:, None].to(x.dtype)


def transformer_layer(d: int, nhead: int, dropout: float, layers: int = 1) -> nn.TransformerEncoder:
    """The reference's ``TransformerEncoder(TransformerEncoderLayer(d, nhead, dim_feedforward=d,
    dropout, ReLU, post-norm), num_layers)``; state-dict keys ``layers.{i}.self_attn.in_proj_weight``
    etc. as in the reference's ``aggr`` / ``gnn`` modules (hrem.md §3.2 step 3, §3.4 d).

    Sequence-first ``[T, B, d]`` inputs, as the reference. This also keeps PyTorch's fused inference
    path (batch-first layers in eval mode without gradient) out: with a float mask holding −inf it
    returned NaN here (torch 2.13), where the plain path gives the right numbers."""
    if d % nhead:
        raise ValueError(f"transformer_layer: embed size {d} must be divisible by nhead {nhead}")
    layer = nn.TransformerEncoderLayer(d, nhead, dim_feedforward=d, dropout=dropout, batch_first=False)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


class FragmentAggregation(nn.Module):
    """``x [B, T, d]``, ``lengths [B]`` -> ``e [B, d]`` (hrem.md §3.2 steps 2-5), before the l2 norm.

    Submodule ``transformer`` holds the reference's ``aggr`` (keys ``transformer.layers.0.*``).
    """

    def __init__(self, d: int, nhead: int = 16, dropout: float = 0.1, residual_weight: float = 0.8,
                 k: int = 2, carry_over: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.residual_weight = residual_weight
        self.k = k
        self.carry_over = carry_over
        self.transformer = transformer_layer(d, nhead, dropout)

    def contextualise(self, x: Tensor, lengths: Tensor) -> Tensor:
        """The Transformer over the valid positions: ``[B, T, d]`` (padded rows are meaningless)."""
        padded = ~length_mask(lengths.to(x.device).long(), x.shape[1])
        return self.transformer(x.transpose(0, 1), src_key_padding_mask=padded).transpose(0, 1)

    def parts(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, z)``: the max-k pooled fragments and the mean of the contextualised ones, ``[B, d]`` each."""
        lengths = lengths.to(x.device).long()
        check_lengths(lengths, x.shape[0], x.shape[1])
        r = maxk_pool(x, lengths, self.k, self.carry_over)
        z = masked_mean(self.contextualise(x, lengths), lengths)
        return r, z

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        r, z = self.parts(x, lengths)
        return self.residual_weight * r + (1.0 - self.residual_weight) * z
