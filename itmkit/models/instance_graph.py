"""HREM's instance-level batch graph (training only): nodes, connectivity and relevance (hrem.md §3.4).

The ``B`` images and ``B`` captions of a training batch are the ``2B`` nodes of one graph
(rows/columns ``0..B-1`` images, ``B..2B-1`` captions). Two matrices describe it:

- **connectivity** ``C [2B, 2B]`` (bool, no gradient): which edges exist. Every row keeps its
  ``k_c = int(B · threshold)`` most similar nodes of each modality (ties all kept, so a row may keep
  more): intra-modal by the embeddings' dot products, inter-modal by the mean region–word matching
  score of :func:`fragment_matching`.
- **relevance** ``R [2B, 2B]`` (float, with gradient): how much an edge counts. Intra-modal
  ``exp(−‖x_a − x_b‖ / σ)`` of the embeddings; inter-modal a tiny MLP over the top-``K`` region–word
  scores plus their mean (:class:`InterModalRelevance`).

:meth:`BatchGraph.attention_mask` turns them into the additive mask of the graph Transformer
(``mask_weight · R`` on kept edges, ``−inf`` elsewhere). Everything here is a function of one batch;
nothing is used at test time. AAHR builds on the same pieces (its GCNs read
:meth:`BatchGraph.block`; its inter-modal relevance is the plain mean: ``inter_relevance=None``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmkit.models.functional import length_mask

BLOCKS = ("i2i", "i2t", "t2i", "t2t")
LEAKY_SLOPE = 0.1  # SCAN's clipped word-region similarity, as the reference's AdjacencyLearning


def intra_relevance(x: Tensor, sigma: float = 1.0) -> Tensor:
    """``exp(−‖x_a − x_b‖₂ / σ)`` for every pair of rows of ``x [B, d]`` -> ``[B, B]`` (differentiable).

    Uses ``torch.cdist`` as the reference does: above 25 rows it switches to the matrix-product
    formula, so the diagonal is ~0.999 rather than exactly 1 in float32 (hrem.md §8.9).
    """
    return torch.exp(-torch.cdist(x, x) / sigma)


def topk_connection(scores: Tensor, k: int) -> Tensor:
    """``[rows, cols]`` bool: True where ``scores[a, b]`` is at least the ``k``-th largest value of row ``a``.

    Ties with the ``k``-th value are all kept (``>=``), so a row may have more than ``k`` Trues.
    """
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"topk_connection k: expected 1..{scores.shape[1]} (the row length), found {k}")
    with torch.no_grad():
        threshold = scores.topk(k, dim=1).values[:, -1:]
        return scores >= threshold


def connection_count(batch: int, threshold: float) -> int:
    """``k_c = int(B · threshold)`` neighbours kept per row and block; at least 1 (itmkit guard:
    the reference crashes on a batch of one, where ``int(0.5) = 0``, hrem.md §8.8)."""
    return max(1, int(batch * threshold))


@dataclass
class FragmentMatching:
    """Region–word matching scores of every (caption, image) pair of a batch (hrem.md §3.4 b).

    Attributes:
        t2i_mean: ``[B_txt, B_img]`` mean over the caption's real words of each word's best
            (word-axis normalised) region score.
        t2i_top: ``[B_txt, B_img, K]`` the ``K`` largest of those word scores (descending), padded
            word slots included when the caption has fewer than ``K`` tokens.
        i2t_mean: ``[B_img, B_txt]`` mean over **all** ``N_max`` region slots (padding included) of
            each region's best (region-axis normalised) score over the real words.
        i2t_top: ``[B_img, B_txt, K]`` the ``K`` largest of those region scores.
    """

    t2i_mean: Tensor
    t2i_top: Tensor
    i2t_mean: Tensor
    i2t_top: Tensor


def fragment_matching(regions: Tensor, words: Tensor, word_lengths: Tensor, topk: int,
                      negative_slope: float = LEAKY_SLOPE) -> FragmentMatching:  # fmt: skip
    """SCAN-style region–word matching of every caption with every image, vectorised (hrem.md §3.4 b).

    Reproduces the reference's ``AdjacencyLearning`` (one loop per caption there), including what
    it reads from padding (§8.4): every one of the ``N_max`` region slots takes part (the encoder's
    values at padded slots, not zeros), and a caption with fewer than ``topk`` tokens brings its
    padded word slots up to ``topk``.

    Args:
        regions: ``[B_img, N_max, d]`` projected regions (the encoder output before pooling).
        words: ``[B_txt, L_max, d]`` projected word states.
        word_lengths: ``[B_txt]`` real tokens per caption.
        topk: ``K`` (10 in the reference); needs ``L_max >= K`` and ``N_max >= K``.

    Returns:
        :class:`FragmentMatching`.
    """
    n_regions, n_words = regions.shape[1], words.shape[1]
    if n_words < topk or n_regions < topk:
        raise ValueError(
            f"fragment_matching: topk={topk} needs at least {topk} word and region slots in the batch, found "
            f"{n_words} word slots (longest caption) and {n_regions} region slots (most regions); lower "
            "model.topk or use longer captions / more regions"
        )
    word_lengths = word_lengths.to(words.device).long()
    real = length_mask(word_lengths, n_words)  # [B_txt, L]
    used = length_mask(word_lengths.clamp(min=topk, max=n_words), n_words)  # the reference's slice :max(L_j, K)
    region_unit = F.normalize(regions, dim=-1)
    word_unit = F.normalize(words, dim=-1) * used[:, :, None]
    scores = F.leaky_relu(torch.einsum("jld,ind->jiln", word_unit, region_unit), negative_slope)  # [B_txt, B_img, L, N]

    by_word = scores / scores.norm(dim=2, keepdim=True).clamp_min(1e-12)  # F.normalize over the word axis
    row = by_word.amax(dim=3)  # [B_txt, B_img, L]: each word's best region
    t2i_mean = (row * real[:, None, :]).sum(dim=2) / word_lengths[:, None].to(row.dtype)
    t2i_top = row.masked_fill(~used[:, None, :], float("-inf")).topk(topk, dim=2).values

    by_region = scores / scores.norm(dim=3, keepdim=True).clamp_min(1e-12)  # F.normalize over the region axis
    column = by_region.masked_fill(~real[:, None, :, None], float("-inf")).amax(dim=2)  # [B_txt, B_img, N]
    i2t_mean = column.mean(dim=2).t()  # mean over all N_max slots, padded ones included (reference)
    i2t_top = column.topk(topk, dim=2).values.transpose(0, 1)
    return FragmentMatching(t2i_mean, t2i_top, i2t_mean, i2t_top)


class InterModalRelevance(nn.Module):
    """The learned inter-modal relevance (hrem.md §3.4 b): ``R_t2i = MLP_t2i(t2i_top) + t2i_mean``,
    ``R_i2t = MLP_i2t(i2t_top) + i2t_mean``; ``MLP = Linear(K, K) → ReLU → Dropout(0) → Linear(K, 1)``
    (state-dict indices 0 and 3), default init, and ``mlp_i2t`` an exact copy of ``mlp_t2i`` at
    construction (reference: ``copy.deepcopy``, §8.7)."""

    def __init__(self, topk: int) -> None:
        super().__init__()
        self.topk = topk
        self.mlp_t2i = nn.Sequential(nn.Linear(topk, topk), nn.ReLU(), nn.Dropout(0.0), nn.Linear(topk, 1))
        self.mlp_i2t = copy.deepcopy(self.mlp_t2i)

    def forward(self, matching: FragmentMatching) -> tuple[Tensor, Tensor]:
        """-> ``(R_t2i [B_txt, B_img], R_i2t [B_img, B_txt])``."""
        r_t2i = self.mlp_t2i(matching.t2i_top).squeeze(-1) + matching.t2i_mean
        r_i2t = self.mlp_i2t(matching.i2t_top).squeeze(-1) + matching.i2t_mean
        return r_t2i, r_i2t


@dataclass
class BatchGraph:
    """One batch's graph over ``2B`` nodes (images ``0..B-1``, then captions ``B..2B-1``).

    Attributes:
        connect: ``[2B, 2B]`` bool, the kept edges ``[[C_ii, C_i2t], [C_t2i, C_tt]]`` (row = the
            node that attends, column = the node it may attend to).
        relevance: ``[2B, 2B]`` float ``[[R_ii, R_i2t], [R_t2i, R_tt]]`` (carries gradient).
        n_images: ``B``.
        matching: the region–word scores behind the inter-modal blocks.
    """

    connect: Tensor
    relevance: Tensor
    n_images: int
    matching: FragmentMatching | None = None

    def block(self, name: str) -> tuple[Tensor, Tensor]:
        """``(connect, relevance)`` of block ``"i2i"``, ``"i2t"``, ``"t2i"`` or ``"t2t"`` (``[B, B]`` each)."""
        if name not in BLOCKS:
            raise KeyError(f"BatchGraph.block: expected one of {BLOCKS}, found {name!r}")
        b = self.n_images
        rows = slice(0, b) if name[0] == "i" else slice(b, 2 * b)
        cols = slice(0, b) if name[2] == "i" else slice(b, 2 * b)
        return self.connect[rows, cols], self.relevance[rows, cols]

    def attention_mask(self, mask_weight: float = 1.0) -> Tensor:
        """``[2B, 2B]`` additive attention mask: ``mask_weight · R`` on kept edges, ``−inf`` elsewhere.

        (The reference multiplies after filling with −inf, which is NaN for ``mask_weight = 0``;
        scaling first gives the same mask for every positive weight.)
        """
        return (mask_weight * self.relevance).masked_fill(~self.connect, float("-inf"))


def build_batch_graph(
    images: Tensor,
    captions: Tensor,
    regions: Tensor,
    words: Tensor,
    word_lengths: Tensor,
    *,
    threshold: float = 0.5,
    topk: int = 10,
    sigma: float = 1.0,
    inter_relevance: InterModalRelevance | None = None,
) -> BatchGraph:
    """Connectivity and relevance of a batch (hrem.md §3.4 a-b; the reference's ``AdjacencyModel``).

    Args:
        images / captions: ``[B, d]`` node embeddings (l2-normalised; gradient flows into the
            intra-modal relevance).
        regions / words / word_lengths: the fragments of :func:`fragment_matching`; detached here
            (the reference detaches them: only the relevance MLPs learn from the matching).
        threshold: share of each block's nodes a row keeps (``k_c = int(B · threshold)``).
        topk: ``K`` of the matching scores.
        sigma: scale of the intra-modal relevance.
        inter_relevance: the learned MLPs; ``None`` uses the plain mean scores (AAHR).

    Returns:
        :class:`BatchGraph`.
    """
    batch = images.shape[0]
    if captions.shape[0] != batch or regions.shape[0] != batch or words.shape[0] != batch:
        raise ValueError(
            f"build_batch_graph: expected B images, captions, region sets and word sets alike, found "
            f"{images.shape[0]}, {captions.shape[0]}, {regions.shape[0]}, {words.shape[0]}"
        )
    k = connection_count(batch, threshold)
    with torch.no_grad():
        c_ii = topk_connection(images @ images.t(), k)
        c_tt = topk_connection(captions @ captions.t(), k)
    r_ii, r_tt = intra_relevance(images, sigma), intra_relevance(captions, sigma)
    matching = fragment_matching(regions.detach(), words.detach(), word_lengths, topk)
    if inter_relevance is not None:
        r_t2i, r_i2t = inter_relevance(matching)
    else:
        r_t2i, r_i2t = matching.t2i_mean, matching.i2t_mean
    c_t2i = topk_connection(matching.t2i_mean, k)
    c_i2t = topk_connection(matching.i2t_mean, k)
    connect = torch.cat([torch.cat([c_ii, c_i2t], 1), torch.cat([c_t2i, c_tt], 1)], 0)
    relevance = torch.cat([torch.cat([r_ii, r_i2t], 1), torch.cat([r_t2i, r_tt], 1)], 0)
    return BatchGraph(connect, relevance, batch, matching)


def relevance_regulariser(images: Tensor, captions: Tensor, graph: BatchGraph, sigma: float = 1.0,
                          temperature: float = 1.0) -> Tensor:  # fmt: skip
    """KL term tying the learned inter-modal relevance to embedding distances (hrem.md §3.4 c).

    ``G = exp(−cdist(v, t) / σ)`` (detached); ``reg = KL(G, R_i2t) + KL(Gᵀ, R_t2i)`` with
    ``KL(A, B) = F.kl_div(log_softmax(A/T), softmax(B/T), 'batchmean') · T²`` row-wise. The learned
    relevance is the *target* distribution and the only side with gradient (§8.10).
    """
    guide = torch.exp(-torch.cdist(images, captions) / sigma).detach()
    _, r_i2t = graph.block("i2t")
    _, r_t2i = graph.block("t2i")

    def kl(a: Tensor, b: Tensor) -> Tensor:
        log_p = F.log_softmax(a / temperature, dim=-1)
        return F.kl_div(log_p, F.softmax(b / temperature, dim=-1), reduction="batchmean") * temperature**2

    return kl(guide, r_i2t) + kl(guide.t(), r_t2i)


def graph_attention(transformer: nn.TransformerEncoder, nodes: Tensor, mask: Tensor) -> Tensor:
    """The masked Transformer over the graph (hrem.md §3.4 d): ``nodes [2B, d]`` as **one sequence**
    (batch 1) with the additive ``mask [2B, 2B]`` -> ``[2B, d]`` (gradient flows into the mask)."""
    return transformer(nodes[:, None], mask=mask)[:, 0]
