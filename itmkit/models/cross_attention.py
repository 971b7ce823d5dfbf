"""SCAN's cross-attention core as pure tensor functions (scan.md §3.3–§3.5, §4).

Two families of functions live here:

- *per-pair aligned* (the reference's shape): :func:`func_attention` attends ``query [n, Lq, d]``
  over ``context [n, Lc, d]`` where item ``k`` of both tensors forms one pair. SGRAF, CHAN and
  ESL build on it (or on :func:`attention_weights` when they need the weights only).
- *block* scores: :func:`t2i_scores` / :func:`i2t_scores` score **every** image of a block
  against **every** caption of a block (``[n_img, n_cap]``) with the vectorisation of scan.md §4:
  one GEMM ``[n_img·R, d] × [d, n_cap·L]`` for all word–region dot products, then only per-pair
  ``R×L`` work. The cosine between a query item and its attended vector needs
  ``q·ctx = Σ_c A[c,q] S[c,q]`` and ``||ctx||² = A[:,q]ᵀ Gram(context) A[:,q]``, so the attended
  vectors ``[n_img, n_cap, L, d]`` are never formed.

Axis discipline (scan.md §8.3): the raw-score normalisation runs over the **query** items, the
attention softmax over the **context** items. t2i: words are queries, regions the context;
i2t: the reverse.

Masks (``True`` = a real word / region) make every result independent of padding: padded
query items take no part in the normalisation and are left out of the pooling; padded context
items get attention weight exactly 0. The reference has no region mask (all 36 regions are
real); itmkit needs one when regions are dropped in training and padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RAW_FEATURE_NORMS: tuple[str, ...] = (
    "softmax",
    "l2norm",
    "clipped_l2norm",
    "l1norm",
    "clipped_l1norm",
    "clipped",
    "no_norm",
)
# Derived repositories call SCAN's LeakyReLU variant "clipped_leaky_l2norm" (scan.md §8.2).
RAW_FEATURE_NORM_ALIASES: dict[str, str] = {"clipped_leaky_l2norm": "clipped_l2norm"}
AGGREGATIONS: tuple[str, ...] = ("LogSumExp", "Mean", "Max", "Sum")
DIRECTIONS: tuple[str, ...] = ("t2i", "i2t")

NORM_EPS = 1e-8  # added to the L1/L2 norm, not under the square root (scan.md §3.3)
COSINE_EPS = 1e-8  # clamp on the product of the two norms (scan.md §3.3)
LEAKY_SLOPE = 0.1  # "clipped" is LeakyReLU(0.1) in the reference code, not ReLU (scan.md §8.2)


def check_raw_feature_norm(name: str) -> str:
    """Canonical name of a ``raw_feature_norm`` option (aliases resolved); ``ValueError`` otherwise."""
    name = RAW_FEATURE_NORM_ALIASES.get(name, name)
    if name not in RAW_FEATURE_NORMS:
        raise ValueError(f"raw_feature_norm: expected one of {list(RAW_FEATURE_NORMS)}, found {name!r}")
    return name


def check_aggregation(name: str) -> str:
    if name not in AGGREGATIONS:
        raise ValueError(f"agg_func: expected one of {list(AGGREGATIONS)}, found {name!r}")
    return name


def check_direction(name: str) -> str:
    if name not in DIRECTIONS:
        raise ValueError(f"cross_attn: expected one of {list(DIRECTIONS)}, found {name!r}")
    return name


def _lowest(dtype: torch.dtype) -> float:
    # A finite stand-in for -inf: exp() underflows to exactly 0, and a row with no valid entry
    # stays finite (uniform) instead of turning into NaN.
    return torch.finfo(dtype).min


def normalize_raw_scores(scores: Tensor, raw_feature_norm: str, dim: int, mask: Tensor | None = None) -> Tensor:
    """scan.md §3.3 step 2: normalise raw scores along ``dim`` (the query axis).

    Args:
        scores: raw dot products, any shape.
        raw_feature_norm: one of :data:`RAW_FEATURE_NORMS` (or an alias). ``l1norm`` and
            ``clipped_l1norm`` follow the spec (L1 normalisation, eps 1e-8); the reference
            crashes on them (``l1norm_d`` is undefined there, scan.md §8.1).
        dim: the query axis.
        mask: bool, broadcastable to ``scores``, ``True`` at real query items. Padded items take
            no part in the sums / softmax and come out as 0.

    Returns:
        Tensor of the shape of ``scores``.
    """
    norm = check_raw_feature_norm(raw_feature_norm)
    x = scores
    if norm.startswith("clipped"):
        x = F.leaky_relu(x, LEAKY_SLOPE)
    if norm == "softmax":
        if mask is not None:
            x = x.masked_fill(~mask, _lowest(x.dtype))
        x = torch.softmax(x, dim=dim)
        return x if mask is None else x.masked_fill(~mask, 0.0)
    if mask is not None:
        x = x.masked_fill(~mask, 0.0)  # zero entries add nothing to the L1 / L2 sums
    if norm.endswith("l2norm"):
        return x / (torch.linalg.vector_norm(x, ord=2, dim=dim, keepdim=True) + NORM_EPS)
    if norm.endswith("l1norm"):
        return x / (x.abs().sum(dim=dim, keepdim=True) + NORM_EPS)
    return x  # "clipped" (LeakyReLU only) and "no_norm"


def attention_weights(
    scores: Tensor,
    raw_feature_norm: str,
    smooth: float,
    query_dim: int,
    context_dim: int,
    query_mask: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> Tensor:
    """scan.md §3.3 steps 2–3: ``softmax_context(smooth · norm_query(scores))``.

    Args:
        scores: raw dot products with a query axis and a context axis, e.g. ``[n, Lc, Lq]``.
        smooth: λ1, the inverse temperature of the attention softmax.
        query_dim, context_dim: which axes hold the query and the context items.
        query_mask, context_mask: bool masks broadcastable to ``scores`` (``True`` = real item).

    Returns:
        Weights of the shape of ``scores``; along ``context_dim`` they sum to 1 over the real
        context items and are exactly 0 on padded ones.
    """
    logits = normalize_raw_scores(scores, raw_feature_norm, query_dim, query_mask) * smooth
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask, _lowest(logits.dtype))
    return torch.softmax(logits, dim=context_dim)


def func_attention(
    query: Tensor,
    context: Tensor,
    raw_feature_norm: str = "clipped_l2norm",
    smooth: float = 9.0,
    query_mask: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-pair aligned cross attention (the reference ``func_attention``, scan.md §3.3).

    Args:
        query: ``[n, Lq, d]``.
        context: ``[n, Lc, d]``; row ``k`` of ``query`` and of ``context`` form one pair.
        raw_feature_norm, smooth: §3.3 step 2 option and λ1.
        query_mask: ``[n, Lq]`` bool or None; context_mask: ``[n, Lc]`` bool or None.

    Returns:
        ``(attended [n, Lq, d], attn [n, Lc, Lq])``: ``attended[k, q] = Σ_c attn[k, c, q] ·
        context[k, c]`` (not normalised), ``attn`` sums to 1 over ``Lc``.
    """
    scores = torch.bmm(context, query.transpose(1, 2))  # [n, Lc, Lq]
    attn = attention_weights(
        scores,
        raw_feature_norm,
        smooth,
        query_dim=2,
        context_dim=1,
        query_mask=None if query_mask is None else query_mask[:, None, :],
        context_mask=None if context_mask is None else context_mask[:, :, None],
    )
    attended = torch.bmm(attn.transpose(1, 2), context)  # [n, Lq, d]
    return attended, attn


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int = -1, eps: float = COSINE_EPS) -> Tensor:
    """``Σ x1·x2 / max(||x1||·||x2||, eps)`` along ``dim`` (the reference's clamp on the product of
    the norms: a zero vector gives exactly 0). Keeps every other axis (no squeeze, §8.4)."""
    dot = (x1 * x2).sum(dim)
    norms = torch.linalg.vector_norm(x1, dim=dim) * torch.linalg.vector_norm(x2, dim=dim)
    return dot / norms.clamp_min(eps)


def aggregate(
    relevance: Tensor, agg_func: str, lambda_lse: float = 6.0, mask: Tensor | None = None, dim: int = -1
) -> Tensor:
    """Pool relevances over ``dim`` (scan.md §3.4 step 3), ignoring entries where ``mask`` is False.

    ``LogSumExp``: ``(1/λ2) log Σ exp(λ2 r)``; ``Mean``; ``Max``; ``Sum``. ``mask`` is bool,
    broadcastable to ``relevance``. The reduced axis is removed.
    """
    agg = check_aggregation(agg_func)
    if agg == "Mean":
        if mask is None:
            return relevance.mean(dim)
        kept = relevance.masked_fill(~mask, 0.0).sum(dim)
        return kept / mask.expand_as(relevance).sum(dim).clamp_min(1).to(relevance.dtype)
    if agg == "Sum":
        return relevance.sum(dim) if mask is None else relevance.masked_fill(~mask, 0.0).sum(dim)
    if mask is not None:
        relevance = relevance.masked_fill(~mask, float("-inf"))
    if agg == "Max":
        return relevance.amax(dim)
    # LogSumExp: the reference computes it literally (no max subtraction); with |r| <= 1 the
    # stable form agrees to ~1e-7 (scan.md §8.13) and also survives large λ2.
    return torch.logsumexp(relevance * lambda_lse, dim) / lambda_lse


def attended_relevance(
    context: Tensor,
    query: Tensor,
    raw_feature_norm: str = "clipped_l2norm",
    smooth: float = 9.0,
    context_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
) -> Tensor:
    """Cosine between every query item and its attended context, for every (context set, query
    set) combination of two blocks (scan.md §3.4 steps 1–2 / §3.5 steps 1–2, vectorised per §4).

    Args:
        context: ``[nc, Lc, d]`` context sets (images for t2i, captions for i2t).
        query: ``[nq, Lq, d]`` query sets.
        raw_feature_norm, smooth: §3.3 option and λ1.
        context_mask: ``[nc, Lc]`` bool or None; query_mask: ``[nq, Lq]`` bool or None
            (``True`` = real item; padded items may hold anything).

    Returns:
        ``[nc, nq, Lq]``: ``cos(query[j, q], Σ_c A[c, q] · context[i, c])`` for pair ``(i, j)``.
        Entries of padded query items are meaningless (mask them when pooling).

    Without autograd the work runs in place on two ``[nc, Lc, nq, Lq]`` buffers (fresh
    allocations cost more than the arithmetic here); with autograd a plain out-of-place version
    keeps the graph. Both compute the same thing; see :func:`relevance_workspace_bytes`.
    """
    norm = check_raw_feature_norm(raw_feature_norm)
    if context_mask is not None:
        context = context * context_mask[..., None].to(context.dtype)
    if query_mask is not None:
        # zero padded query items: their raw scores are then exactly 0, which adds nothing to the
        # L1/L2 sums of the raw norm (only "softmax" still needs an explicit mask below)
        query = query * query_mask[..., None].to(query.dtype)
    if context_mask is not None and bool(context_mask.all()):
        context_mask = None  # nothing padded: skip the masking passes
    needs_graph = torch.is_grad_enabled() and (context.requires_grad or query.requires_grad)
    if needs_graph:
        return _relevance_with_graph(context, query, norm, smooth, context_mask, query_mask)
    return _relevance_in_place(context, query, norm, smooth, context_mask, query_mask)


def _block_scores(context: Tensor, query: Tensor) -> Tensor:
    """``[nc, Lc, nq, Lq]`` dot products from one GEMM; this layout makes the Gram contraction a
    plain batched matmul over ``nc`` with no copy."""
    nc, lc, d = context.shape
    nq, lq, _ = query.shape
    scores = (context.reshape(nc * lc, d) @ query.reshape(nq * lq, d).t()).view(nc, lc, nq, lq)
    # reduced-precision GEMM (a CUDA option): everything after it accumulates in fp32
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def _cosine_from_gram(dot: Tensor, ctx_sq: Tensor, query: Tensor) -> Tensor:
    query_norm = torch.linalg.vector_norm(query.to(dot.dtype), dim=-1)  # [nq, Lq]
    # rounding can push ||ctx||^2 a hair below 0
    return dot / (query_norm[None] * ctx_sq.clamp_min(0.0).sqrt()).clamp_min(COSINE_EPS)


def _relevance_with_graph(context, query, norm, smooth, context_mask, query_mask) -> Tensor:
    nc, lc, _ = context.shape
    nq, lq, _ = query.shape
    scores = _block_scores(context, query)
    context = context.to(scores.dtype)
    attn = attention_weights(
        scores,
        norm,
        smooth,
        query_dim=3,
        context_dim=1,
        query_mask=None if query_mask is None else query_mask[None, None, :, :],
        context_mask=None if context_mask is None else context_mask[:, :, None, None],
    )
    dot = (attn * scores).sum(1)  # q . ctx = sum_c A[c, q] S[c, q]
    gram = torch.bmm(context, context.transpose(1, 2))  # [nc, Lc, Lc]
    gram_attn = torch.bmm(gram, attn.reshape(nc, lc, nq * lq)).view(nc, lc, nq, lq)
    ctx_sq = (attn * gram_attn).sum(1)  # ||ctx||^2 = A[:, q]^T Gram A[:, q]
    return _cosine_from_gram(dot, ctx_sq, query)


def _relevance_in_place(context, query, norm, smooth, context_mask, query_mask) -> Tensor:
    nc, lc, _ = context.shape
    nq, lq, _ = query.shape
    scores = _block_scores(context, query)
    context = context.to(scores.dtype)
    # --- raw-score normalisation over the query axis (3), written into a second buffer
    if norm.startswith("clipped"):
        attn = F.leaky_relu(scores, LEAKY_SLOPE)
    else:
        attn = scores.clone()
    if norm == "softmax":
        if query_mask is not None:
            attn.masked_fill_(~query_mask[None, None], _lowest(attn.dtype))
        attn.sub_(attn.amax(3, keepdim=True)).exp_()
        scale = attn.sum(3, keepdim=True).reciprocal_().mul_(smooth)
    elif norm.endswith("l2norm"):
        scale = torch.linalg.vector_norm(attn, dim=3, keepdim=True).add_(NORM_EPS).reciprocal_().mul_(smooth)
    elif norm.endswith("l1norm"):
        scale = torch.linalg.vector_norm(attn, ord=1, dim=3, keepdim=True).add_(NORM_EPS).reciprocal_().mul_(smooth)
    else:
        scale = smooth
    attn.mul_(scale)  # logits = λ1 · normalised scores
    # --- attention softmax over the context axis (1); padded context items get weight 0
    if context_mask is not None:
        attn.masked_fill_(~context_mask[:, :, None, None], _lowest(attn.dtype))
    attn.sub_(attn.amax(1, keepdim=True)).exp_()
    attn.div_(attn.sum(1, keepdim=True))
    # --- q . ctx, then ||ctx||^2 through the context Gram matrix, reusing the scores buffer
    dot = scores.mul_(attn).sum(1)  # [nc, nq, Lq]
    gram = torch.bmm(context, context.transpose(1, 2))  # [nc, Lc, Lc]
    gram_attn = torch.bmm(gram, attn.view(nc, lc, nq * lq), out=scores.view(nc, lc, nq * lq)).view(nc, lc, nq, lq)
    ctx_sq = gram_attn.mul_(attn).sum(1)
    return _cosine_from_gram(dot, ctx_sq, query)


def relevance_workspace_bytes(n_context: int, n_query: int, element_size: int = 4, grad: bool = False) -> int:
    """Bytes :func:`attended_relevance` needs per (context set, query set) pair.

    Without grad the in-place path keeps two ``Lc × Lq`` buffers (scores, attention) plus
    reductions; reduced-precision inputs add the half-size GEMM output. With grad autograd keeps
    about six ``Lc × Lq`` tensors for the backward pass (measured peak of forward + backward:
    ~5.2, tests/test_scan.py). Plus a few ``Lq``-sized results. Per-item costs (masked input
    copies, Gram matrices) are not per pair and are left out.
    ``element_size`` is that of the inputs; the work after the GEMM is at least fp32.
    """
    grid = n_context * n_query
    work = max(element_size, 4)
    if grad:
        return 6 * grid * work + 8 * n_query * work
    extra = grid * element_size if element_size < 4 else 0
    return 2 * grid * work + extra + 8 * n_query * work + 2 * n_context * work


def t2i_scores(
    images: Tensor,
    captions: Tensor,
    image_mask: Tensor | None = None,
    caption_mask: Tensor | None = None,
    raw_feature_norm: str = "clipped_l2norm",
    lambda_softmax: float = 9.0,
    agg_func: str = "LogSumExp",
    lambda_lse: float = 6.0,
) -> Tensor:
    """SCAN t2i (scan.md §3.4): words attend to regions, relevances pooled over the words.

    Args:
        images: ``[n_img, R, d]`` region embeddings; captions: ``[n_cap, L, d]`` word embeddings.
        image_mask: ``[n_img, R]`` bool (None: all regions real); caption_mask: ``[n_cap, L]``.

    Returns:
        ``[n_img, n_cap]`` scores.
    """
    relevance = attended_relevance(images, captions, raw_feature_norm, lambda_softmax, image_mask, caption_mask)
    mask = None if caption_mask is None else caption_mask[None]
    return aggregate(relevance, agg_func, lambda_lse, mask, dim=-1)


def i2t_scores(
    images: Tensor,
    captions: Tensor,
    image_mask: Tensor | None = None,
    caption_mask: Tensor | None = None,
    raw_feature_norm: str = "clipped_l2norm",
    lambda_softmax: float = 4.0,
    agg_func: str = "LogSumExp",
    lambda_lse: float = 5.0,
) -> Tensor:
    """SCAN i2t (scan.md §3.5): regions attend to words, relevances pooled over the regions.

    Same arguments as :func:`t2i_scores`; returns ``[n_img, n_cap]``.
    """
    relevance = attended_relevance(captions, images, raw_feature_norm, lambda_softmax, caption_mask, image_mask)
    mask = None if image_mask is None else image_mask[None]
    return aggregate(relevance, agg_func, lambda_lse, mask, dim=-1).t()


def word_region_attention(
    image: Tensor,
    caption: Tensor,
    raw_feature_norm: str = "clipped_l2norm",
    smooth: float = 9.0,
    direction: str = "t2i",
) -> Tensor:
    """Attention of one (image, caption) pair, for pictures: ``image [R, d]``, ``caption [L, d]``
    (real items only) -> ``[L, R]`` (t2i: each word's weights over regions, rows sum to 1) or
    ``[R, L]`` (i2t: each region's weights over words)."""
    check_direction(direction)
    if direction == "t2i":
        _, attn = func_attention(caption[None], image[None], raw_feature_norm, smooth)
    else:
        _, attn = func_attention(image[None], caption[None], raw_feature_norm, smooth)
    return attn[0].t()
