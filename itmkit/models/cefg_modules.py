"""CEFG's similarity encoder: SGRAF plus spatial context and RCAR's correspondence regulator.

Spec: ``../shared/methods/cefg.md`` §3.3 (with ``sgraf.md`` for what it inherits). The reference
(``MMM-design/CEFG``, ``model.py`` ``EncoderSimilarity``) loops over captions; here a whole
(image block x caption block) is scored at once, with padded words masked wherever the reference
slices them off (see ``tests/test_cefg.py`` for the per-pair loop it is checked against).

Built on :mod:`itmkit.models.sgraf_modules`: :class:`ContextSimilarityEncoder` *is* SGRAF's
:class:`~itmkit.models.sgraf_modules.SimilarityEncoder` (TextSA, the local/global similarity
vectors, SGR/SAF, the read-out, all with the reference's key names) with

- (a)-(d), image side, once per image: the global attention logits ``ω`` (SGRAF's VisualSA layers
  under another name), the neighbourhood gather over the spatial adjacency weighted by ``ω``, the
  context-modulated regions and the GRU over original + modulated regions (``2R`` enhanced
  regions) -> :meth:`ContextSimilarityEncoder.enhance_regions`;
- (f) the correspondence regulator: ``rcr_steps`` rounds that learn a per-word modulation of the
  query and a per-word attention temperature -> :meth:`ContextSimilarityEncoder.similarity_nodes`.

Shapes: ``n`` images, ``R`` regions, ``c`` captions, ``L`` padded words, ``d = embed_size``,
``s = sim_dim``, ``P`` gather slots (5).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmkit.models.cross_attention import LEAKY_SLOPE
from itmkit.models.functional import l2norm
from itmkit.models.sgraf_modules import (
    NORM_EPS,
    SimilarityEncoder,
    VisualSelfAttention,
    local_similarity,
    t2i_attention,
    xavier_init_,
)

#: ``collect_emb``'s ``num_partial``: gather slots per region (hard-coded 5 in the reference).
NEIGHBOURHOOD_SLOTS = 5
#: The regulator's starting temperature λ_0 (hard-coded ``smooth = 10.0``, §3.3 f).
INITIAL_TEMPERATURE = 10.0
#: Regulator rounds (hard-coded ``rcr_step = 3``; ``opts.rcr_step`` is parsed but unused, §5).
REGULATOR_STEPS = 3
#: [itmkit design, §3.5] attention inverse temperature of the gated AMR fusion (SGRAF's λ).
AMR_SMOOTH = 9.0


def _filled(value: Tensor | float, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``value`` (a tensor that broadcasts, or a number) as a ``shape`` tensor, for ``details``."""
    return value.expand(shape) if isinstance(value, Tensor) else like.new_full(shape, value)


def neighbourhood_slots(adjacency: Tensor, slots: int = NEIGHBOURHOOD_SLOTS) -> Tensor:
    """``collect_emb``'s slot rule (§3.3 b): ``adjacency [n, R, R]`` 0/1 -> ``[n, R, slots]`` long.

    Row ``r`` takes the regions ``j`` with ``A[r, j] = 1`` and fills the remaining slots with ``r``
    itself (duplicates count separately in the softmax that follows). The reference takes
    ``topk(A[r], 5)``, whose order among equal values is unspecified; with at most 5 ones per row
    (both adjacency rules here) the slot *multiset* is the same whatever the order. A row with more
    than ``slots`` ones keeps its first ``slots`` by region index (our deterministic choice, §8.5).
    """
    n, R, _ = adjacency.shape
    ones = adjacency == 1
    take = min(slots, R)
    order = torch.argsort((~ones).to(torch.int8), dim=-1, stable=True)[..., :take]  # ones first, by index
    itself = torch.arange(R, device=adjacency.device)[None, :, None]
    chosen = torch.where(torch.gather(ones, -1, order), order, itself)
    if take < slots:  # fewer regions than slots: the reference's topk would fail; pad with self
        chosen = torch.cat([chosen, itself.expand(n, R, slots - take)], dim=-1)
    return chosen


def gather_neighbourhood(regions: Tensor, logits: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """``p_r = Σ_k softmax_k(ω[slot_k]) · V[slot_k]`` (§3.3 b).

    Args:
        regions: ``[n, R, d]``; logits: the global-attention logits ``ω [n, R]``;
        slots: ``[n, R, P]`` from :func:`neighbourhood_slots`.

    Returns:
        ``(partial [n, R, d], slot_weights [n, R, P])``. The slot weights are scattered into an
        ``[n, R, R]`` mixing matrix (duplicate slots add up) and applied with one batched
        product, instead of materialising the ``[n, R, P, d]`` gathered regions.
    """
    n, R, P = slots.shape
    slot_weights = torch.softmax(torch.gather(logits, 1, slots.reshape(n, R * P)).view(n, R, P), dim=-1)
    mixing = regions.new_zeros(n, R, R).scatter_add(2, slots, slot_weights)
    return torch.bmm(mixing, regions), slot_weights


class CorrespondenceRegulator(nn.Module):
    """RCAR's ``Correpondence_regulator`` (§3.3 f), one round.

    ``rcr_smooth_w = Linear(s, s/2) -> Tanh -> Linear(s/2, 1)``, ``rcr_matrix_w = Linear(s, 2s) ->
    Tanh -> Linear(2s, d)`` (reference key names). PyTorch's default initialisation: the
    reference's ``init_weights`` only looks at direct children, which are the Sequentials (§3.3).
    """

    def __init__(self, sim_dim: int, embed_size: int) -> None:
        super().__init__()
        self.rcr_smooth_w = nn.Sequential(nn.Linear(sim_dim, sim_dim // 2), nn.Tanh(), nn.Linear(sim_dim // 2, 1))
        self.rcr_matrix_w = nn.Sequential(nn.Linear(sim_dim, sim_dim * 2), nn.Tanh(), nn.Linear(sim_dim * 2, embed_size))

    def temperature(self, sims: Tensor, previous: Tensor | float) -> Tensor:
        """``λ' = ReLU(U₂ tanh(U₁ σ + c₁) + c₂ + λ)``: ``sims σ [n, c, L, s]`` -> ``[n, c, L]``
        (it can reach 0: a uniform attention over the regions, §8.7)."""
        return torch.relu(self.rcr_smooth_w(sims).squeeze(-1) + previous)

    def modulation(self, sims: Tensor, previous: Tensor | float) -> Tensor:
        """``M' = clip(tanh(W₂ tanh(W₁ σ + b₁) + b₂) + M, −1, 1)`` -> ``[n, c, L, d]``."""
        return (torch.tanh(self.rcr_matrix_w(sims)) + previous).clamp(-1.0, 1.0)


class ContextSimilarityEncoder(SimilarityEncoder):
    """CEFG's ``EncoderSimilarity`` (§3.3): SGRAF's similarity encoder with spatial context and
    the correspondence regulator.

    Submodules beyond SGRAF's (reference names in brackets; the converter maps them):
    ``context_attention`` (the inline global attention ``emb_local_li/bn``, ``emb_global_li/bn``,
    ``emb_common``: SGRAF's VisualSA layers, separate weights), ``img_rnn`` (GRU d -> d, default
    init), ``rcr_modules`` (:class:`CorrespondenceRegulator` x ``rcr_steps``, default init),
    ``sim_transform_w`` (unused by the forward, kept for the checkpoint keys). SGRAF's
    ``v_global_w`` exists for the same reason and is never run: the reference computes it and
    throws the result away (§8.8).
    """

    def __init__(
        self, embed_size: int, sim_dim: int, module: Literal["SGR", "SAF"], num_regions: int,
        sgr_step: int = 3, dropout: float = 0.4, rcr_steps: int = REGULATOR_STEPS,
        slots: int = NEIGHBOURHOOD_SLOTS, initial_temperature: float = INITIAL_TEMPERATURE,
    ) -> None:
        super().__init__(embed_size, sim_dim, module, num_regions, sgr_step, dropout, initial_temperature)
        if rcr_steps < 1:
            raise ValueError(f"ContextSimilarityEncoder rcr_steps: expected >= 1, found {rcr_steps}")
        self.slots = slots
        self.context_attention = VisualSelfAttention(embed_size, num_regions, dropout)
        self.sim_transform_w = nn.Linear(embed_size, sim_dim)
        xavier_init_(self.context_attention)  # direct Linear children of the reference: Xavier, bias 0
        xavier_init_(self.sim_transform_w)
        self.img_rnn = nn.GRU(embed_size, embed_size, 1, batch_first=True)
        self.rcr_modules = nn.ModuleList(CorrespondenceRegulator(sim_dim, embed_size) for _ in range(rcr_steps))

    # --- image side, once per image (§3.3 a-d) ---------------------------------------------------
    def enhance_regions(self, regions: Tensor, adjacency: Tensor, details: dict | None = None) -> tuple[Tensor, Tensor]:
        """``regions V [n, R, d]``, ``adjacency [n, R, R]`` -> ``(enhanced V' [n, 2R, d], global [n, d])``.

        (a) ``ω`` = the global-attention logits, ``w = softmax(ω)``, ``u = Σ w_r V_r``,
        ``ν = ||u|| + 1e-8``, global ``u / ν``; (b) ``p_r`` the ``ω``-weighted neighbourhood gather;
        (c) ``q_r = l2n(LReLU(V_r ⊙ p_r / ν))``; (d) ``V' = l2n(GRU([V; q]) + [V; V])``: the GRU
        runs over the ``2R`` sequence original-then-modulated (region order matters, §8.9).
        ``details`` (a dict) receives ``region_attention [n, R]`` (``w``), ``neighbours [n, R, P]``,
        ``neighbour_weights [n, R, P]``, ``context [n, R, d]`` (``q``).
        """
        logits = self.context_attention.attention_logits(regions)
        weights = torch.softmax(logits, dim=1)
        pooled = (weights[..., None] * regions).sum(1)
        norm = torch.linalg.vector_norm(pooled, dim=-1, keepdim=True) + NORM_EPS  # ν: kept un-normalised (§3.3 c)
        slots = neighbourhood_slots(adjacency, self.slots)
        partial, slot_weights = gather_neighbourhood(regions, logits, slots)
        context = l2norm(F.leaky_relu(regions * (partial / norm[:, None]), LEAKY_SLOPE), dim=-1, eps=NORM_EPS)
        hidden, _ = self.img_rnn(torch.cat([regions, context], dim=1))
        enhanced = l2norm(hidden + torch.cat([regions, regions], dim=1), dim=-1, eps=NORM_EPS)
        if details is not None:
            details.update(region_attention=weights, neighbours=slots, neighbour_weights=slot_weights, context=context)
        return enhanced, pooled / norm

    # --- pairwise (§3.3 e-h) ---------------------------------------------------------------------
    def similarity_nodes(
        self, regions: Tensor, image_global: Tensor, words: Tensor, caption_global: Tensor,
        word_mask: Tensor, region_mask: Tensor | None = None, details: dict | None = None,
    ) -> Tensor:
        """§3.3 f-g: the regulated local similarity vectors and the global one -> nodes
        ``[n, c, L+1, s]`` (``regions`` are the enhanced ``V' [n, 2R, d]``).

        Round ``m`` attends with the query ``W ⊙ M_m`` and temperature ``λ_m`` (``M_0 = 1``,
        ``λ_0 = 10``), measures ``σ_m = l2n(W_loc (ctx − W)² + b)`` against the *un-modulated*
        words and updates ``M``, ``λ``. The final alignment uses the plain words with ``λ_steps``:
        the last round's modulation is discarded by the reference (§8.7), so it is not computed
        (its ``rcr_matrix_w`` gets no gradient there either).

        ``details`` receives ``temperatures [steps+1, n, c, L]`` (``λ_0 .. λ_steps``),
        ``modulations [steps, n, c, L, d]`` (``M_0 .. M_{steps-1}``, the ones each round used),
        ``step_attention [steps, n, c, 2R, L]``, and SGRAF's ``attention`` (the final one),
        ``attended``, ``nodes``.
        """
        words = words.masked_fill(~word_mask[..., None], 0.0)
        matrix: Tensor | float = 1.0
        temperature: Tensor | float = self.smooth
        recorded: dict[str, list[Tensor]] = {"temperatures": [], "modulations": [], "step_attention": []}
        steps = len(self.rcr_modules)
        for m, regulator in enumerate(self.rcr_modules):
            query = words if isinstance(matrix, float) else words[None] * matrix
            attended, attention = t2i_attention(regions, query, word_mask, region_mask, temperature, normalise=False)
            sims = l2norm(local_similarity(attended, words, self.sim_tranloc_w), dim=-1, eps=NORM_EPS)
            del attended
            if details is not None:
                recorded["temperatures"].append(_filled(temperature, sims.shape[:3], sims))
                recorded["modulations"].append(_filled(matrix, (*sims.shape[:3], words.shape[-1]), sims))
                recorded["step_attention"].append(attention)
            if m < steps - 1:
                matrix = regulator.modulation(sims, matrix)
            temperature = regulator.temperature(sims, temperature)
        attended, attention = t2i_attention(regions, words, word_mask, region_mask, temperature, normalise=False)
        if details is not None:
            recorded["temperatures"].append(temperature)
            details.update({key: torch.stack(values) for key, values in recorded.items()})
            details["attention"] = attention
            details["attended"] = l2norm(attended, dim=-1, eps=NORM_EPS)  # a copy: overwritten below
        local = l2norm(local_similarity(attended, words, self.sim_tranloc_w), dim=-1, eps=NORM_EPS)
        del attended
        return self.graph_nodes(self.global_node(image_global, caption_global), local, word_mask, details)


class AMRGatedFusion(nn.Module):
    """[itmkit design choice, cefg.md §3.5] the paper's "hierarchical semantic parsing" fusion.

    The released code encodes the AMR tokens and never reads them (§8.3); the README figure shows
    a sigmoid gate between the word embeddings and a word-level AMR context. Our reading: every
    word attends over the caption's AMR token features ``Z`` (encoded by the caption encoder),
    ``κ_t = l2n(Σ_a softmax_a(λ · cos(T_t, Z_a)) Z_a)`` with ``λ = 9``, then
    ``T'_t = l2n(g_t ⊙ T_t + (1 − g_t) ⊙ κ_t)``, ``g_t = σ(W_g [T_t ; κ_t] + b_g)``
    (``gate = Linear(2d, d)``, Xavier, bias 0).
    """

    def __init__(self, embed_size: int, smooth: float = AMR_SMOOTH) -> None:
        super().__init__()
        self.smooth = smooth
        self.gate = nn.Linear(2 * embed_size, embed_size)
        xavier_init_(self)

    def forward(self, words: Tensor, word_mask: Tensor, amr: Tensor, amr_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``words [c, L, d]``, ``word_mask [c, L]``, ``amr [c, La, d]``, ``amr_mask [c, La]`` ->
        ``(fused [c, L, d] (zero at padded words), gates [c, L, d], attention [c, L, La])``."""
        words = words.masked_fill(~word_mask[..., None], 0.0)
        amr = amr.masked_fill(~amr_mask[..., None], 0.0)
        dots = words @ amr.transpose(1, 2)
        norms = torch.linalg.vector_norm(words, dim=-1)[..., :, None] * torch.linalg.vector_norm(amr, dim=-1)[..., None, :]
        cosine = dots / norms.clamp_min(1e-8)
        logits = (self.smooth * cosine).masked_fill(~amr_mask[:, None, :], torch.finfo(cosine.dtype).min)
        attention = torch.softmax(logits, dim=-1)
        kappa = l2norm(attention @ amr, dim=-1, eps=NORM_EPS)
        gates = torch.sigmoid(self.gate(torch.cat([words, kappa], dim=-1)))
        fused = l2norm(gates * words + (1 - gates) * kappa, dim=-1, eps=NORM_EPS)
        return fused.masked_fill(~word_mask[..., None], 0.0), gates, attention
