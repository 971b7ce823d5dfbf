"""SGRAF's similarity encoder, vectorised over a whole (image block x caption block).

Spec: ``../shared/methods/sgraf.md`` §3.3-§3.5. The reference (``Paranioar/SGRAF``,
``EncoderSimilarity``) loops over captions in Python and slices each caption to its valid words;
here every caption of a block is scored at once, with padded words masked at every step that
reads the word axis, so the result equals the per-caption slicing (see ``tests/test_sgraf.py``).

Submodule and parameter names follow the reference ``sim_enc`` state dict exactly
(``v_global_w.embedding_local.0.weight``, ``SGR_module.0.graph_query_w.weight``,
``SAF_module.bn.running_mean``, ...), so a released checkpoint loads strictly (§7).

Shapes: ``n`` images, ``R`` regions, ``c`` captions, ``L`` padded words (``L_j`` valid for
caption ``j``, including ``<start>``/``<end>``), ``d = embed_size``, ``s = sim_dim``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from itmkit.models.cross_attention import attention_weights, func_attention
from itmkit.models.functional import l2norm

#: SGRAF's local alignment is SCAN t2i attention with this inverse temperature, hard-coded in the
#: reference ``EncoderSimilarity.forward`` (§3.3 c, §8.4).
ATTENTION_SMOOTH = 9.0
#: eps of the reference ``l2norm`` / ``l1norm`` (added to the norm, not under the root).
NORM_EPS = 1e-8


def xavier_init_(module: nn.Module) -> None:
    """§3.5: every ``nn.Linear`` gets weight ``U(-r, r)``, ``r = sqrt(6 / (fan_in + fan_out))``,
    bias 0. BatchNorm keeps PyTorch's defaults (gamma 1, beta 0, running mean 0 / var 1)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            bound = math.sqrt(6.0) / math.sqrt(layer.in_features + layer.out_features)
            nn.init.uniform_(layer.weight, -bound, bound)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _masked_softmax(logits: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """Softmax over ``dim`` where ``mask`` (broadcastable, True = valid) removes entries entirely.

    Overwrites ``logits`` (callers pass a fresh product whose backward does not need it): an
    out-of-place fill would copy the whole ``[n, c, P, P]`` edge tensor once more."""
    if mask is None:
        return torch.softmax(logits, dim=dim)
    return torch.softmax(logits.masked_fill_(~mask, float("-inf")), dim=dim)


def _zero_padded(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with positions where ``mask`` (broadcastable) is False set to 0; in place when no
    gradient is recorded (``x`` may be an activation whose backward needs it otherwise)."""
    return x.masked_fill_(~mask, 0.0) if not torch.is_grad_enabled() else x.masked_fill(~mask, 0.0)


class VisualSelfAttention(nn.Module):
    """``VisualSA`` (§3.3 a): the global image vector, self-attention-pooled over the regions.

    ``l = Dropout(tanh(BN_R(W_l x)))`` with ``BN_R = BatchNorm1d(num_regions)`` normalising over the
    **region axis** (one mean/var/gamma/beta per region index; §8.2, kept as in the reference
    because checkpoints depend on it), ``g = Dropout(tanh(BN_d(W_g mean(x))))``,
    ``w = softmax_regions(W_c (l * g))``, output ``l2norm(sum_k w_k x_k)``.
    """

    def __init__(self, embed_size: int, num_regions: int, dropout: float = 0.4) -> None:
        super().__init__()
        self.num_regions = num_regions
        self.embedding_local = nn.Sequential(
            nn.Linear(embed_size, embed_size), nn.BatchNorm1d(num_regions), nn.Tanh(), nn.Dropout(dropout)
        )
        self.embedding_global = nn.Sequential(
            nn.Linear(embed_size, embed_size), nn.BatchNorm1d(embed_size), nn.Tanh(), nn.Dropout(dropout)
        )
        self.embedding_common = nn.Sequential(nn.Linear(embed_size, 1))

    def forward(self, regions: Tensor, region_mask: Tensor | None = None) -> Tensor:
        """``regions [n, R, d]`` (``R == num_regions``), ``region_mask [n, R]`` bool or None
        (reference: all regions valid) -> global image vectors ``[n, d]``.

        Masked regions are left out of the mean and the softmax (they still pass through the
        per-index BatchNorm, whose statistics in train mode then include them, as padded rows do
        in VSE∞'s BatchNorm; with the reference's fixed 36 regions there is no padding)."""
        weights = _masked_softmax(self.attention_logits(regions, region_mask), region_mask, dim=1)
        # the weights pool the *input* regions, not the transformed ``local`` (§3.3 a)
        return l2norm((weights[..., None] * regions).sum(1), dim=-1, eps=NORM_EPS)

    def attention_logits(self, regions: Tensor, region_mask: Tensor | None = None) -> Tensor:
        """The raw pooling logits ``W_c (l * g) + b_c`` ``[n, R]`` before the softmax (CEFG's
        neighbourhood gather reuses them, cefg.md §3.3 a-b)."""
        if regions.shape[1] != self.num_regions:
            raise ValueError(
                f"VisualSelfAttention: regions axis: expected {self.num_regions} regions "
                f"(BatchNorm1d over the region index, sgraf.md §8.2), found {regions.shape[1]}"
            )
        if region_mask is None:
            mean = regions.mean(dim=1)
        else:
            weights = region_mask.to(regions.dtype)
            mean = (regions * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
        local = self.embedding_local(regions)
        glob = self.embedding_global(mean)
        return self.embedding_common(local * glob[:, None, :]).squeeze(-1)


class TextSelfAttention(nn.Module):
    """``TextSA`` (§3.3 b): the global caption vector over its valid words; VisualSA without BN."""

    def __init__(self, embed_size: int, dropout: float = 0.4) -> None:
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_size, embed_size), nn.Tanh(), nn.Dropout(dropout))
        self.embedding_global = nn.Sequential(nn.Linear(embed_size, embed_size), nn.Tanh(), nn.Dropout(dropout))
        self.embedding_common = nn.Sequential(nn.Linear(embed_size, 1))

    def forward(self, words: Tensor, word_mask: Tensor) -> Tensor:
        """``words [c, L, d]``, ``word_mask [c, L]`` bool -> global caption vectors ``[c, d]``.

        Padded words are zeroed before use (they may hold anything) and excluded from the mean
        and the softmax, so the result equals the reference's slice ``words[j, :L_j]``."""
        words = words.masked_fill(~word_mask[..., None], 0.0)
        counts = word_mask.sum(1, keepdim=True).clamp_min(1).to(words.dtype)
        mean = words.sum(1) / counts
        local = self.embedding_local(words)
        glob = self.embedding_global(mean)
        logits = self.embedding_common(local * glob[:, None, :]).squeeze(-1)
        weights = _masked_softmax(logits, word_mask, dim=1)
        return l2norm((weights[..., None] * words).sum(1), dim=-1, eps=NORM_EPS)


def t2i_attention(
    regions: Tensor, words: Tensor, word_mask: Tensor, region_mask: Tensor | None = None,
    smooth: float | Tensor = ATTENTION_SMOOTH, normalise: bool = True,
) -> tuple[Tensor, Tensor]:
    """SGRAF's local alignment (§3.3 c) for every (image, caption) pair of a block.

    SCAN t2i attention with ``clipped_l2norm``: ``S = regions . wordsᵀ``, LeakyReLU(0.1),
    l2-normalised over the (valid) **words**, softmax over the **regions** of ``smooth * S``, the
    attended region mix per word, then l2-normalised (SGRAF's addition; SCAN does not).

    Args:
        regions: ``[n, R, d]``; words: ``[c, L, d]`` with padded positions already zero, or
            ``[n, c, L, d]`` when every image has its own queries (CEFG's regulated words,
            cefg.md §3.3 f); word_mask: ``[c, L]`` bool; region_mask: ``[n, R]`` bool or None.
        smooth: the inverse temperature, a number or ``[n, c, L]`` (one per word of every pair).
        normalise: False skips the final l2 norm (the caller fuses it, see
            :func:`local_similarity`).

    Returns:
        ``(attended [n, c, L, d], attention [n, c, R, L])`` (attention sums to 1 over ``R``).
    """
    n, R, d = regions.shape
    c, L = words.shape[-3:-1]
    if words.dim() == 4:  # per-image queries: one [R, d] x [d, c*L] product per image
        scores = torch.bmm(regions, words.reshape(n, c * L, d).transpose(1, 2)).view(n, R, c, L)
    else:  # one GEMM for the whole block: [n*R, d] x [d, c*L]
        scores = (regions.reshape(n * R, d) @ words.reshape(c * L, d).t()).view(n, R, c, L)
    if isinstance(smooth, Tensor):
        smooth = smooth[:, None]  # [n, 1, c, L]: broadcast over the regions
    weights = attention_weights(
        scores, "clipped_l2norm", smooth, query_dim=3, context_dim=1,
        query_mask=word_mask[None, None],
        context_mask=None if region_mask is None else region_mask[:, :, None, None],
    )  # [n, R, c, L]
    del scores
    # per image: [c*L, R] x [R, d]; the transposed view goes to BLAS without a copy
    attended = torch.bmm(weights.view(n, R, c * L).transpose(1, 2), regions).view(n, c, L, d)
    attention = weights.permute(0, 2, 1, 3)
    return (l2norm(attended, dim=-1, eps=NORM_EPS) if normalise else attended), attention


def scan_attention(query: Tensor, context: Tensor, smooth: float = ATTENTION_SMOOTH) -> Tensor:
    """The reference's per-pair ``SCAN_attention(query, context, smooth)`` (§3.3 c): ``query
    [n, Lq, d]`` (a caption's valid words, repeated per image) over ``context [n, Lc, d]`` (the
    regions; row ``k`` of both forms one pair) -> l2-normalised attended vectors ``[n, Lq, d]``.
    :func:`t2i_attention` is the same for every pair of two blocks."""
    attended, _ = func_attention(query, context, "clipped_l2norm", smooth)
    return l2norm(attended, dim=-1, eps=NORM_EPS)


def local_similarity(attended: Tensor, words: Tensor, linear: nn.Linear) -> Tensor:
    """``W_loc (attended / (||attended|| + eps) - words)^2 + b`` (§3.3 d, before its l2 norm).

    ``attended [n, c, L, d]`` (not yet normalised), ``words [c, L, d]`` -> ``[n, c, L, s]``.

    The attended-vector norm is folded out of the ``[n, c, L, d]`` tensor: with
    ``m = ||a|| + eps``, ``(a / m - w)^2 = (a - m w)^2 / m^2``, so the big tensor takes one
    fused pass (``a - m w``, squared) and the ``1 / m^2`` scale is applied to the ``s``-wide
    output instead (same value to rounding). Without autograd ``attended`` is overwritten, one
    buffer instead of three; with autograd the same maths out of place.
    """
    norm = torch.linalg.vector_norm(attended, dim=-1, keepdim=True) + NORM_EPS  # [n, c, L, 1]
    if torch.is_grad_enabled():
        diff = (attended - norm * words[None]).square()
    else:
        diff = attended.addcmul_(norm, words[None], value=-1.0).square_()
    projected = diff @ linear.weight.t()
    return torch.addcdiv(linear.bias, projected, norm.square()) if linear.bias is not None else projected / norm.square()


class GraphReasoning(nn.Module):
    """One SGR step (§3.3 e1): ``x <- ReLU(W_r (softmax(q kᵀ) x))`` over the similarity graph,
    ``q = W_q x``, ``k = W_k x``. No 1/sqrt(s) scaling, no residual (§8.5)."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.graph_query_w = nn.Linear(sim_dim, sim_dim)
        self.graph_key_w = nn.Linear(sim_dim, sim_dim)
        self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
        self._fused_cache: tuple[tuple, Tensor, Tensor] | None = None

    def _fused_weights(self) -> tuple[Tensor, Tensor]:
        """``([M | W_rᵀ] [s, 2s], u [s])`` with ``M = W_qᵀ W_k`` and ``u = W_kᵀ b_q``.

        Without autograd they are cached until a parameter changes (``Tensor._version`` counts
        in-place updates: optimiser steps, ``load_state_dict``), so evaluation builds them once
        per model instead of once per block."""
        params = (self.graph_query_w.weight, self.graph_query_w.bias, self.graph_key_w.weight, self.sim_graph_w.weight)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if not torch.is_grad_enabled() and self._fused_cache is not None and self._fused_cache[0] == key:
            return self._fused_cache[1], self._fused_cache[2]
        mixed = self.graph_query_w.weight.t() @ self.graph_key_w.weight
        fused = torch.cat([mixed, self.sim_graph_w.weight.t()], dim=1)
        offset = self.graph_key_w.weight.t() @ self.graph_query_w.bias
        if not torch.is_grad_enabled():
            self._fused_cache = (key, fused, offset)
        return fused, offset

    def forward(self, nodes: Tensor, node_mask: Tensor, queries: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """``nodes [..., P, s]``, ``node_mask [..., P]`` bool (broadcastable) -> ``(new nodes
        [..., P', s], edges [..., P', P])`` for the query nodes ``queries`` (all by default;
        ``slice(0, 1)`` computes only the read-out node 0, which is all the last step needs).

        Padded nodes neither send (their key logit is -inf) nor receive (their output is 0).

        Two rewrites of the same maths (equal to rounding; ``tests/test_sgraf.py`` checks them
        against the spec's three-linear form):

        - edge logits ``(W_q x_i + b_q) . (W_k x_j + b_k)`` are ``(x_i M + u) . x_j`` with
          ``M = W_qᵀ W_k``, ``u = W_kᵀ b_q``: the dropped terms ``x_i . W_qᵀ b_k + b_q . b_k``
          are the same for every key ``j`` of query ``i`` and cancel in the softmax;
        - when every node is a query, ``W_r (E x) = E (x W_rᵀ)``, so ``x [M | W_rᵀ]`` is one
          ``[s, 2s]`` GEMM per node instead of three ``[s, s]`` ones (2/3 of the spec's FLOPs).
        """
        lead, (P, s) = nodes.shape[:-2], nodes.shape[-2:]
        flat = nodes.reshape(-1, P, s)  # one [P, s] graph per pair
        fused, offset = self._fused_weights()
        every_node = queries == slice(None)
        if every_node:
            projected = (flat.reshape(-1, s) @ fused).view(flat.shape[0], P, 2 * s)
            query, values = projected[..., :s] + offset, projected[..., s:]
        else:
            query = torch.addmm(offset, flat[:, queries].reshape(-1, s), fused[:, :s]).view(flat.shape[0], -1, s)
        # explicit bmm on [pairs, P, s] views: batched matmul of 4-D operands copies them first
        logits = torch.bmm(query, flat.transpose(1, 2)).view(*lead, -1, P)
        edges = _masked_softmax(logits, node_mask[..., None, :], dim=-1)
        flat_edges = edges.reshape(-1, edges.shape[-2], P)
        if every_node:
            out = torch.relu(torch.baddbmm(self.sim_graph_w.bias, flat_edges, values)).view(*lead, -1, s)
        else:
            out = torch.relu(self.sim_graph_w(torch.bmm(flat_edges, flat).view(*lead, -1, s)))
        return _zero_padded(out, node_mask[..., queries, None]), edges


class AttentionFiltration(nn.Module):
    """SAF (§3.3 e2): gate every similarity node, ``a = sigmoid(BN_1(W_a x))``, L1-normalise over
    the valid nodes, ``l2norm(sum_p a_p x_p)``.

    ``BN_1 = BatchNorm1d(1)``: one scalar mean/var over all gate logits. In eval mode it uses the
    running stats, so every pair is independent of the rest of the block. In train mode the
    reference calls it once per caption (statistics over that caption's ``n x (L_j+1)`` logits
    against all images, one running-stat update per caption, §3.4/§8.3); :meth:`normalise_gates`
    reproduces that for all captions at once.
    """

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)

    def normalise_gates(self, logits: Tensor, node_mask: Tensor) -> Tensor:
        """``logits [n, c, P]``, ``node_mask [c, P]`` -> BatchNorm'd logits ``[n, c, P]``.

        Train mode, per caption ``j`` (vectorised): mean and biased variance over the ``n * P_j``
        valid logits of column ``j``; the running stats then take ``c`` momentum updates in the
        block's caption order, ``rm <- (1 - m) rm + m mean_j`` (unbiased variance for
        ``running_var``), which is the reference's sequence of ``c`` BatchNorm calls in closed
        form. ``num_batches_tracked`` grows by ``c``.
        """
        bn = self.bn
        if not bn.training and bn.track_running_stats:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            return (logits - bn.running_mean) * scale + bn.bias
        n = logits.shape[0]
        valid = node_mask.to(logits.dtype)[None]  # [1, c, P]
        count = n * valid.sum(dim=(0, 2))  # [c]
        mean = (logits * valid).sum(dim=(0, 2)) / count
        centred = (logits - mean[None, :, None]) * valid
        var = (centred * centred).sum(dim=(0, 2)) / count
        normed = (logits - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps)
        if bn.track_running_stats:
            self._update_running_stats(mean.detach(), (var * count / (count - 1).clamp_min(1)).detach())
        return normed * bn.weight + bn.bias

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, unbiased_vars: Tensor) -> None:
        bn = self.bn
        c = means.shape[0]
        if bn.momentum is None:
            # cumulative average over all calls so far: N old calls, c new ones
            seen = float(bn.num_batches_tracked)
            keep, contribution = seen / (seen + c), torch.full_like(means, 1.0 / (seen + c))
        else:
            # c successive updates x <- (1-m) x + m v_j  ==  (1-m)^c x + sum_j m (1-m)^(c-1-j) v_j
            m = bn.momentum
            keep = (1.0 - m) ** c
            contribution = m * (1.0 - m) ** torch.arange(c - 1, -1, -1, dtype=means.dtype, device=means.device)
        bn.running_mean.mul_(keep).add_((contribution * means).sum().to(bn.running_mean.dtype))
        bn.running_var.mul_(keep).add_((contribution * unbiased_vars).sum().to(bn.running_var.dtype))
        bn.num_batches_tracked.add_(c)

    def forward(self, nodes: Tensor, node_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``nodes [n, c, P, s]``, ``node_mask [c, P]`` -> ``(vector [n, c, s], weights [n, c, P])``;
        the weights are 0 on padded nodes and sum to 1 (up to eps) over the valid ones."""
        logits = self.attn_sim_w(nodes).squeeze(-1)
        gates = torch.sigmoid(self.normalise_gates(logits, node_mask))
        gates = gates.masked_fill(~node_mask[None], 0.0)
        weights = gates / (gates.abs().sum(-1, keepdim=True) + NORM_EPS)
        return l2norm((weights[..., None] * nodes).sum(-2), dim=-1, eps=NORM_EPS), weights


class SimilarityEncoder(nn.Module):
    """``EncoderSimilarity`` (§3.3): image/caption sets -> sigmoid scores ``[n, c]``.

    ``global_image``/``global_caption`` (VisualSA / TextSA) depend on one side only, so the model
    calls them at encode time; :meth:`score_block` takes their outputs and does the pairwise part.
    """

    def __init__(
        self, embed_size: int, sim_dim: int, module: Literal["SGR", "SAF"], num_regions: int,
        sgr_step: int = 3, dropout: float = 0.4, smooth: float = ATTENTION_SMOOTH,
    ) -> None:
        super().__init__()
        if module not in ("SGR", "SAF"):
            raise ValueError(
                f"SimilarityEncoder.module: expected 'SGR' or 'SAF' ('SGRAF' is the ensemble of the "
                f"two models, sgraf.md §3.3), found {module!r}"
            )
        self.module_name = module
        self.smooth = smooth
        self.v_global_w = VisualSelfAttention(embed_size, num_regions, dropout)
        self.t_global_w = TextSelfAttention(embed_size, dropout)
        self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)
        self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        if module == "SGR":
            self.SGR_module = nn.ModuleList(GraphReasoning(sim_dim) for _ in range(sgr_step))
        else:
            self.SAF_module = AttentionFiltration(sim_dim)
        xavier_init_(self)

    def global_image(self, regions: Tensor, region_mask: Tensor | None = None) -> Tensor:
        """``[n, R, d] -> [n, d]`` (VisualSA)."""
        return self.v_global_w(regions, region_mask)

    def global_caption(self, words: Tensor, word_mask: Tensor) -> Tensor:
        """``[c, L, d] -> [c, d]`` (TextSA over the valid words)."""
        return self.t_global_w(words, word_mask)

    def similarity_nodes(
        self, regions: Tensor, image_global: Tensor, words: Tensor, caption_global: Tensor,
        word_mask: Tensor, region_mask: Tensor | None = None, details: dict | None = None,
    ) -> Tensor:
        """§3.3 c-d: the similarity graph nodes ``[n, c, L+1, s]`` (node 0 global, nodes 1.. the
        words; padded words give zero nodes)."""
        words = words.masked_fill(~word_mask[..., None], 0.0)
        attended, attention = t2i_attention(regions, words, word_mask, region_mask, self.smooth, normalise=False)
        if details is not None:  # a copy: the no-grad path below overwrites ``attended``
            details["attended"] = l2norm(attended, dim=-1, eps=NORM_EPS)
        local = l2norm(local_similarity(attended, words, self.sim_tranloc_w), dim=-1, eps=NORM_EPS)
        del attended
        if details is not None:
            details["attention"] = attention
        return self.graph_nodes(self.global_node(image_global, caption_global), local, word_mask, details)

    def global_node(self, image_global: Tensor, caption_global: Tensor) -> Tensor:
        """§3.3 d, global: ``l2norm(W_glo (img_glo - cap_glo)^2 + b)`` for every pair -> ``[n, c, s]``."""
        glob_diff = (image_global[:, None, :] - caption_global[None, :, :]).square()
        return l2norm(self.sim_tranglo_w(glob_diff), dim=-1, eps=NORM_EPS)

    def graph_nodes(self, glob: Tensor, local: Tensor, word_mask: Tensor, details: dict | None = None) -> Tensor:
        """``glob [n, c, s]`` and ``local [n, c, L, s]`` -> the nodes ``[n, c, L+1, s]`` (node 0
        global), zero at padded words."""
        nodes = torch.cat([glob[:, :, None, :], local], dim=2)
        nodes = _zero_padded(nodes, self.node_mask(word_mask)[None, :, :, None])
        if details is not None:
            details["nodes"] = nodes
        return nodes

    @staticmethod
    def node_mask(word_mask: Tensor) -> Tensor:
        """``[c, L] -> [c, L+1]``: the global node 0 is always valid."""
        return torch.cat([word_mask.new_ones(word_mask.shape[0], 1), word_mask], dim=1)

    def reason(self, nodes: Tensor, word_mask: Tensor, details: dict | None = None) -> Tensor:
        """§3.3 e: SGR (3 steps, read out node 0) or SAF -> ``[n, c, s]``."""
        node_mask = self.node_mask(word_mask)
        if self.module_name == "SAF":
            vector, weights = self.SAF_module(nodes, node_mask)
            if details is not None:
                details["filtration_weights"] = weights
            return vector
        steps = len(self.SGR_module)
        for i, step in enumerate(self.SGR_module):
            # the read-out uses node 0 only, so the last step need not update the other nodes
            last = i == steps - 1 and details is None
            nodes, edges = step(nodes, node_mask[None], slice(0, 1) if last else slice(None))
            if details is not None:
                details[f"sgr_step{i}"] = nodes
                details[f"sgr_edges{i}"] = edges
        return nodes[:, :, 0, :]

    def score_block(
        self, regions: Tensor, image_global: Tensor, words: Tensor, caption_global: Tensor,
        word_mask: Tensor, region_mask: Tensor | None = None, details: dict | None = None,
    ) -> Tensor:
        """Scores ``[n, c]`` in (0, 1) for every (image, caption) pair (§3.3 c-f).

        Args:
            regions: ``[n, R, d]`` image region embeddings; image_global: ``[n, d]`` (VisualSA).
            words: ``[c, L, d]`` word embeddings (padded positions may hold anything);
            caption_global: ``[c, d]`` (TextSA); word_mask: ``[c, L]`` bool;
            region_mask: ``[n, R]`` bool or None (all regions valid, as in the reference).
            details: if a dict, filled with the intermediates (``attention``, ``attended``, ``nodes``,
                ``sgr_step{i}``/``sgr_edges{i}`` or ``filtration_weights``, ``vector``).
        """
        nodes = self.similarity_nodes(regions, image_global, words, caption_global, word_mask, region_mask, details)
        vector = self.reason(nodes, word_mask, details)
        if details is not None:
            details["vector"] = vector
        return torch.sigmoid(self.sim_eval_w(vector)).squeeze(-1)
