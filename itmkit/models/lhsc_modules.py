"""LHSC's two unimodal encoder stacks: the region graph (``IM_GCN``) and the word self-attention
(``TextAttn``) blocks.

Spec: ``../shared/methods/lhsc.md`` §3.1-§3.2, §3.4, §8. The reference (``lDarryll/LHSC``,
``libs/img_gcn.py``, ``libs/text_atten.py``) stacks four of each: the region blocks after the
image ``fc`` (before the l2 norm), the word blocks between the word embedding (+ dropout 0.4) and
the bi-GRU. Both use an **un-normalised** dot-product affinity (no softmax, no √d scaling,
§8.3), divided by the set size, and a residual connection.

Shapes: ``B`` items, ``N`` regions, ``L`` padded words, ``d = embed_size``, ``e = word_dim``.
Row-vector convention: the reference's kernel-1 ``Conv1d`` over ``[B, d, N]`` is a per-region
``Linear`` over ``[B, N, d]`` here (the converter squeezes the kernel axis).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from itmkit.models.functional import l2norm, length_mask
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.sgraf_modules import NORM_EPS, xavier_init_

#: How the word self-attention treats padded positions (lhsc.md §3.2, §8.2).
WordPadding = Literal["reference", "masked"]


class RegionGraphBlock(nn.Module):
    """One ``IM_GCN`` block (lhsc.md §3.1): ``X -> X + BN(W (A G))``, ``A = Q Kᵀ / N``.

    ``G = g(X)``, ``Q = fc1(θ(X))``, ``K = fc2(φ(X))``, all linear maps of the regions
    ``X [N, d]``; the affinity ``A [N, N]`` is the learned region graph: un-normalised (no
    softmax, entries may be negative, §8.3) and divided by the region count ``N`` (§8.5).
    ``BN`` is a ``BatchNorm1d(d)`` per channel, statistics over (images, regions) in train mode.

    Parameters (our layout; the converter maps the reference's names):

    - ``theta``/``phi``: ``Linear(d, d)``, the reference's four ``Conv1d(d, d/4)`` each
      (``theta, theta1, theta2, theta3``) row-stacked in that order: concatenating the four
      outputs along channels is one linear map with the stacked weight (§3.1);
    - ``g``, ``fc1``, ``fc2``, ``W``: ``Linear(d, d)``; ``bn``: the BatchNorm after ``W``.

    Init (§3.1, §8.4): PyTorch's default for every linear map (``IM_GCN.init_weights``, Xavier,
    is never called in the reference) and ``bn`` gamma = beta = 0, so a fresh block is the
    identity. The fused ``theta``/``phi`` get the reference's distribution: the default bound
    ``1/sqrt(fan_in)`` depends on the input width ``d`` only.

    Masking (our design choice; the reference always has 36 real regions): with a region mask,
    padded regions are neither keys nor values, ``N`` is each image's valid count, train-mode
    BatchNorm statistics come from valid regions only, and padded outputs are 0. Without a mask
    this is the reference computation.
    """

    def __init__(self, embed_size: int) -> None:
        super().__init__()
        d = embed_size
        if d % 4:
            raise ValueError(f"RegionGraphBlock embed_size: expected a multiple of 4 (four theta/phi convs of d/4, lhsc.md §3.1), found {d}")
        self.g = nn.Linear(d, d)
        self.theta = nn.Linear(d, d)
        self.phi = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        self.W = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        # the reference zero-initialises W's BatchNorm: every block starts as the identity (§8.4)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def affinity(self, regions: Tensor, region_mask: Tensor | None = None) -> Tensor:
        """The region graph ``A = Q Kᵀ / N``: ``regions [B, N, d]`` -> ``[B, N, N]`` (row = the
        region that listens, column = the region it listens to; padded columns 0)."""
        query = self.fc1(self.theta(regions))
        key = self.fc2(self.phi(regions))
        graph = query @ key.transpose(1, 2)
        if region_mask is None:
            return graph / regions.shape[1]
        counts = region_mask.sum(1).clamp_min(1).to(graph.dtype)
        return graph.masked_fill(~region_mask[:, None, :], 0.0) / counts[:, None, None]

    def forward(self, regions: Tensor, region_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``regions [B, N, d]``, ``region_mask [B, N]`` bool or None -> ``(regions [B, N, d],
        graph [B, N, N])``."""
        graph = self.affinity(regions, region_mask)
        update = self.W(graph @ self.g(regions))
        if region_mask is None:
            update = self.bn(update.reshape(-1, update.shape[-1])).view_as(update)
            return regions + update, graph
        # valid regions only: train-mode statistics must not see padding
        normed = update.new_zeros(update.shape)
        normed[region_mask] = self.bn(update[region_mask])
        return (regions + normed).masked_fill(~region_mask[..., None], 0.0), graph


class RegionGraphStack(nn.Module):
    """The image side's ``IM_GCN_1 … IM_GCN_n`` (lhsc.md §3.1 step 2): ``n`` blocks in a row,
    each with its own weights; only the last block's output is used (no per-level fusion, §2)."""

    def __init__(self, embed_size: int, n_blocks: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RegionGraphBlock(embed_size) for _ in range(n_blocks))

    def forward(self, regions: Tensor, region_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """``regions [B, N, d]`` -> ``(regions [B, N, d], graphs)``, one ``[B, N, N]`` graph per block."""
        graphs = []
        for block in self.blocks:
            regions, graph = block(regions, region_mask)
            graphs.append(graph)
        return regions, graphs


class RegionGraphImageEncoder(PrecompRegionEncoder):
    """LHSC's ``EncoderImage`` (lhsc.md §3.1): ``fc`` (SCAN's, no l2 norm) -> the region graph
    stack -> per-region l2 norm (``l2_regions``; the reference's ``no_imgnorm`` turns it off).

    ``images [B, K, img_dim]``, ``lengths [B]`` -> ``[B, K, d]``, zero beyond ``lengths``. The
    graph blocks get a region mask only when some image has fewer than ``K`` regions.
    """

    def __init__(self, img_dim: int, embed_size: int, n_blocks: int = 4, l2_regions: bool = True) -> None:
        super().__init__(img_dim, embed_size, mlp_residual=False, l2_regions=False, zero_padding=True)
        self.l2_after_graph = l2_regions
        self.graph = RegionGraphStack(embed_size, n_blocks)

    def encode(self, images: Tensor, lengths: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``-> (regions [B, K, d], graphs)``, one ``[B, K, K]`` region graph per block."""
        projected = super().forward(images, lengths)
        mask = length_mask(lengths.to(projected.device), projected.shape[1])
        regions, graphs = self.graph(projected, None if bool(mask.all()) else mask)
        if self.l2_after_graph:
            regions = l2norm(regions, dim=-1, eps=NORM_EPS)
        return regions, graphs

    def forward(self, images: Tensor, lengths: Tensor) -> Tensor:
        return self.encode(images, lengths)[0]


class WordSelfAttentionBlock(nn.Module):
    """One ``TextAttn`` block (lhsc.md §3.2): ``X -> X + C V``, ``C = tanh(l(X)) tanh(g(X))ᵀ / L``.

    ``l, g, v`` are ``Linear(e, e)`` (reference names ``embedding_local``, ``embedding_global``,
    ``embedding_v``), each followed by tanh and ``Dropout(dropout)`` (``drop_out`` = 0.0 in the
    reference); Xavier-uniform init, bias 0 (the block's own ``init_weights``, called).
    ``C [L, L]`` is un-normalised (no softmax, §8.3).

    ``padding="reference"`` (the reference, needed for imported checkpoints): every padded position
    (its pad-id embedding) is a key and value and ``L`` is the **padded** length, so a caption's
    output depends on the batch it is padded with (§3.2, §8.2). ``padding="masked"`` (our
    design choice, a flag): keys and values are the caption's valid words and ``L`` its valid
    count, so the valid outputs do not depend on padding.
    """

    def __init__(self, word_dim: int, dropout: float = 0.0, padding: WordPadding = "reference") -> None:
        super().__init__()
        if padding not in ("reference", "masked"):
            raise ValueError(f"WordSelfAttentionBlock padding: expected 'reference' or 'masked', found {padding!r}")
        self.padding = padding
        self.embedding_local = nn.Linear(word_dim, word_dim)
        self.embedding_global = nn.Linear(word_dim, word_dim)
        self.embedding_v = nn.Linear(word_dim, word_dim)
        self.dropout = nn.Dropout(dropout)
        xavier_init_(self)

    def _project(self, layer: nn.Linear, words: Tensor) -> Tensor:
        return self.dropout(torch.tanh(layer(words)))

    def affinity(self, words: Tensor, word_mask: Tensor) -> Tensor:
        """``words [B, L, e]``, ``word_mask [B, L]`` -> ``C [B, L, L]`` (row = query word; in
        masked mode the padded key columns are 0)."""
        common = self._project(self.embedding_local, words) @ self._project(self.embedding_global, words).transpose(1, 2)
        if self.padding == "reference":
            # the reference divides by the padded length and lets pads be keys (§3.2, §8.2)
            return common / words.shape[1]
        counts = word_mask.sum(1).clamp_min(1).to(common.dtype)
        return common.masked_fill(~word_mask[:, None, :], 0.0) / counts[:, None, None]

    def forward(self, words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``words [B, L, e]``, ``word_mask [B, L]`` bool -> ``(words [B, L, e], C [B, L, L])``."""
        attention = self.affinity(words, word_mask)
        return words + attention @ self._project(self.embedding_v, words), attention


class WordSelfAttentionStack(nn.Module):
    """The text side's ``W_att1 … W_att4`` (lhsc.md §3.2 step 3), a ``word_layers`` module for
    :class:`~itmkit.models.text_encoders.BiGRUTextEncoder`: ``(words [B, L, e], lengths [B]) ->
    [B, L, e]``, on the full padded tensor (the GRU afterwards reads the valid words)."""

    def __init__(self, word_dim: int, n_blocks: int = 4, dropout: float = 0.0, padding: WordPadding = "reference") -> None:
        super().__init__()
        self.padding = padding
        self.blocks = nn.ModuleList(WordSelfAttentionBlock(word_dim, dropout, padding) for _ in range(n_blocks))

    def attend(self, words: Tensor, lengths: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``words [B, L, e]``, ``lengths [B]`` -> ``(words [B, L, e], attentions)``, one
        ``[B, L, L]`` affinity per block."""
        mask = length_mask(lengths.to(words.device), words.shape[1])
        attentions = []
        for block in self.blocks:
            words, attention = block(words, mask)
            attentions.append(attention)
        return words, attentions

    def forward(self, words: Tensor, lengths: Tensor) -> Tensor:
        return self.attend(words, lengths)[0]
