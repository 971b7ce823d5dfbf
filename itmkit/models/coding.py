"""CHAN's parameter-free similarity: *coding* (match words against regions) then *pooling*.

Spec: ``../shared/methods/chan.md`` §3.3. Every function here is a pure function of tensors,
computes a whole block of (image, caption) pairs at once and is exact under padding: features at
padded positions (beyond the masks) are zeroed first and every reduction is masked, so padded
words or regions, whatever they hold, never change a score.

Shapes: ``images [n_img, K, d]`` with ``image_mask [n_img, K]`` (True = real region),
``captions [n_cap, L, d]`` with ``caption_mask [n_cap, L]`` (True = real word). Features are
expected unit-norm (the encoders l2-normalise), so a dot product is a cosine.

A *coding* returns :class:`CodedScores`: ``values [n_img, n_cap, n]`` (one score per word, or
per region) with the reference's sentinel ``-1`` written at padded positions, and ``valid``
(the explicit mask the poolings use; the reference instead treats any entry equal to -1 as
padding, pitfall §8.3). A *pooling* reduces the last axis over the valid entries to
``[n_img, n_cap]``.

| reference name | here | what it codes |
| --- | --- | --- |
| ``VHACoding`` (CHAN default) | :func:`visual_hard_assignment` | each word -> its best region's cosine |
| ``THACoding`` | :func:`textual_hard_assignment` | each region -> its best word's cosine |
| ``VSACoding(alpha)`` | :func:`visual_soft_assignment` | each region -> cosine with its softmax mix of words |
| ``T2ICrossAttentionPool(9)`` | :func:`t2i_soft_assignment` + :func:`mean_pooling` | SCAN t2i: each word -> cosine with its attended mix of regions |
| ``MaxPooling`` / ``MeanPooling`` / ``SumPooling`` | :func:`max_pooling` / :func:`mean_pooling` / :func:`sum_pooling` | |
| ``LSEPooling(belta)`` (CHAN default) | :func:`lse_pooling` | ``logsumexp(s / belta)``, the code's scale (§3.3) |
| ``SoftmaxPooling(belta)`` | :func:`softmax_pooling` | the intended version (the reference returns NaN, §8.2) |
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PADDING_SCORE = -1.0  # reference sentinel (`MASK = -1`): no real cosine is below it
EPS = 1e-8  # the reference's epsilon for norms


class CodedScores(NamedTuple):
    """Output of a coding: ``values [n_img, n_cap, n]`` (``-1`` where invalid) and ``valid``
    (bool, same shape) telling the pooling which entries are real words / regions."""

    values: Tensor
    valid: Tensor


def _check_sets(images: Tensor, image_mask: Tensor, captions: Tensor, caption_mask: Tensor) -> None:
    if images.dim() != 3 or captions.dim() != 3:
        raise ValueError(
            "coding: expected images [n_img, K, d] and captions [n_cap, L, d], "
            f"found images {tuple(images.shape)} and captions {tuple(captions.shape)}"
        )
    if images.shape[-1] != captions.shape[-1]:
        raise ValueError(
            f"coding: images and captions must share the feature size d, found "
            f"{images.shape[-1]} (images) and {captions.shape[-1]} (captions)"
        )
    if tuple(image_mask.shape) != tuple(images.shape[:2]):
        raise ValueError(f"coding: image_mask must be {tuple(images.shape[:2])}, found {tuple(image_mask.shape)}")
    if tuple(caption_mask.shape) != tuple(captions.shape[:2]):
        raise ValueError(
            f"coding: caption_mask must be {tuple(captions.shape[:2])}, found {tuple(caption_mask.shape)}"
        )


def _zero_padding(feats: Tensor, mask: Tensor) -> Tensor:
    # padded slots may hold anything (fc.bias, garbage, NaN); zeroing them makes every product
    # with them exactly 0, so masked softmaxes and Gram terms below stay finite
    return feats.masked_fill(~mask.bool().unsqueeze(-1), 0.0)


def _region_major_cosines(images: Tensor, captions: Tensor) -> Tensor:
    """``[n_img, K, n_cap, L]`` cosines from one GEMM (``[n_img*K, d] @ [d, n_cap*L]``)."""
    n_img, k, d = images.shape
    n_cap, length, _ = captions.shape
    scores = images.reshape(n_img * k, d) @ captions.reshape(n_cap * length, d).t()
    return scores.view(n_img, k, n_cap, length)


def region_word_cosines(images: Tensor, image_mask: Tensor, captions: Tensor, caption_mask: Tensor) -> Tensor:
    """The region-word table ``S[i, c, k, l] = <images[i, k], captions[c, l]>`` (§3.3), with the
    sentinel ``-1`` wherever region ``k`` or word ``l`` is padding. ``[n_img, n_cap, K, L]``
    (a permuted view of one GEMM). For inspection and figures; the codings do not build it."""
    _check_sets(images, image_mask, captions, caption_mask)
    scores = _region_major_cosines(images, captions)
    invalid = ~(image_mask.bool()[:, :, None, None] & caption_mask.bool()[None, None, :, :])
    return scores.masked_fill(invalid, PADDING_SCORE).permute(0, 2, 1, 3)


def visual_hard_assignment(
    images: Tensor, image_mask: Tensor, captions: Tensor, caption_mask: Tensor
) -> CodedScores:
    """VHA coding (CHAN's default, §3.3): every word takes the cosine of its most similar region,
    ``s[i, c, l] = max_k <v_ik, w_cl>`` over real regions. Values ``[n_img, n_cap, L]``; padded
    words are ``-1`` and invalid."""
    values, _ = _hard_assignment_max(images, image_mask, captions, caption_mask)
    valid = caption_mask.bool()[None, :, :].expand_as(values)
    return CodedScores(values.masked_fill(~valid, PADDING_SCORE), valid)


def hard_assignment_regions(images: Tensor, image_mask: Tensor, captions: Tensor, caption_mask: Tensor) -> Tensor:
    """Which region each word is hard-assigned to: ``[n_img, n_cap, L]`` long (argmax over the
    real regions; meaningless at padded words). The picture behind VHA coding."""
    _, index = _hard_assignment_max(images, image_mask, captions, caption_mask)
    return index


def _hard_assignment_max(images, image_mask, captions, caption_mask) -> tuple[Tensor, Tensor]:
    _check_sets(images, image_mask, captions, caption_mask)
    images = _zero_padding(images, image_mask)
    captions = _zero_padding(captions, caption_mask)
    scores = _region_major_cosines(images, captions)  # [n_img, K, n_cap, L]
    # in place on the GEMM output (autograd does not need it); padded regions can never win
    scores.masked_fill_(~image_mask.bool()[:, :, None, None], PADDING_SCORE)
    best = scores.max(dim=1)
    return best.values, best.indices


def textual_hard_assignment(
    images: Tensor, image_mask: Tensor, captions: Tensor, caption_mask: Tensor
) -> CodedScores:
    """THA coding (§3.3): every region takes the cosine of its most similar word,
    ``s[i, c, k] = max_l <v_ik, w_cl>``. Values ``[n_img, n_cap, K]``; padded regions ``-1``."""
    _check_sets(images, image_mask, captions, caption_mask)
    images = _zero_padding(images, image_mask)
    captions = _zero_padding(captions, caption_mask)
    scores = _region_major_cosines(images, captions)  # [n_img, K, n_cap, L]
    scores.masked_fill_(~caption_mask.bool()[None, None, :, :], PADDING_SCORE)
    values = scores.max(dim=3).values.permute(0, 2, 1)  # [n_img, n_cap, K]
    valid = image_mask.bool()[:, None, :].expand_as(values)
    return CodedScores(values.masked_fill(~valid, PADDING_SCORE), valid)


def visual_soft_assignment(
    images: Tensor, image_mask: Tensor, captions: Tensor, caption_mask: Tensor, alpha: float
) -> CodedScores:
    """VSA coding (§3.3, region as query): ``A = softmax_l(S / alpha)`` over the real words,
    ``t[i, c, k] = sum_l A w_cl``, ``s[i, c, k] = <v_ik, t> / (||t|| + 1e-8)`` (no division by the
    region norm, as in the reference). Values ``[n_img, n_cap, K]``; padded regions ``-1``.

    Vectorised without the ``[n_img, n_cap, K, d]`` attended tensor: ``<v, t> = sum_l A S`` and
    ``||t||^2 = A^T G_c A`` with the caption Gram matrix ``G_c = W_c W_c^T [L, L]``.
    """
    if alpha <= 0:
        raise ValueError(f"visual_soft_assignment: alpha must be > 0, found {alpha}")
    _check_sets(images, image_mask, captions, caption_mask)
    images = _zero_padding(images, image_mask)
    captions = _zero_padding(captions, caption_mask)
    n_img, k, _ = images.shape
    n_cap, length, _ = captions.shape
    scores = _region_major_cosines(images, captions)  # [n_img, K, n_cap, L]
    word_valid = caption_mask.bool()[None, None, :, :]
    weights = torch.softmax((scores / alpha).masked_fill(~word_valid, float("-inf")), dim=-1)
    dot = (weights * scores).sum(-1)  # [n_img, K, n_cap]
    gram = captions @ captions.transpose(1, 2)  # [n_cap, L, L]
    # A^T G A per (i, k, c): batch over captions, rows = (image, region)
    w_by_cap = weights.permute(2, 0, 1, 3).reshape(n_cap, n_img * k, length)
    sq_norm = ((w_by_cap @ gram) * w_by_cap).sum(-1).reshape(n_cap, n_img, k).permute(1, 2, 0)
    norm = sq_norm.clamp_min(EPS * EPS).sqrt()  # clamp: rounding can dip below 0; keeps grads finite
    values = (dot / (norm + EPS)).permute(0, 2, 1)  # [n_img, n_cap, K]
    valid = image_mask.bool()[:, None, :].expand_as(values)
    return CodedScores(values.masked_fill(~valid, PADDING_SCORE), valid)


def t2i_attention_weights(
    images: Tensor,
    image_mask: Tensor,
    captions: Tensor,
    caption_mask: Tensor,
    smooth: float = 9.0,
    mask_regions: bool = True,
) -> Tensor:
    """SCAN t2i attention of every word over the regions, as CHAN's ``T2ICrossAttentionPool``
    computes it (§3.3): logits ``S`` -> LeakyReLU(0.1) -> l2-normalised over the real words of
    each region (eps 1e-8) -> ``softmax_k(smooth * .)``. Returns ``[n_img, n_cap, K, L]``
    weights summing to 1 over ``K`` (the soft counterpart of :func:`hard_assignment_regions`).

    ``mask_regions=False`` reproduces the reference quirk of attending over every region slot
    passed in, padding included *as it is* (in the reference a padded region holds the
    normalised ``fc.bias``); zero padding would make no difference, since the cosine ignores
    the scale of the context. Only differs when images have padded regions.
    """
    return _t2i_weights(images, image_mask, captions, caption_mask, smooth, mask_regions)[0].permute(0, 2, 1, 3)


def _t2i_weights(images, image_mask, captions, caption_mask, smooth, mask_regions):
    _check_sets(images, image_mask, captions, caption_mask)
    if mask_regions:
        images = _zero_padding(images, image_mask)
    captions = _zero_padding(captions, caption_mask)
    scores = _region_major_cosines(images, captions)  # [n_img, K, n_cap, L]
    logits = F.leaky_relu(scores, 0.1)  # padded words hold exactly 0, so the norm sees real words only
    logits = logits / (logits.norm(dim=-1, keepdim=True) + EPS)
    logits = logits * smooth
    if mask_regions:
        logits = logits.masked_fill(~image_mask.bool()[:, :, None, None], float("-inf"))
    return torch.softmax(logits, dim=1), scores, images, captions


def t2i_soft_assignment(
    images: Tensor,
    image_mask: Tensor,
    captions: Tensor,
    caption_mask: Tensor,
    smooth: float = 9.0,
    mask_regions: bool = True,
) -> CodedScores:
    """Soft assignment coding of SCAN t2i (§3.3 ``T2ICrossAttentionPool``): each word's cosine
    with its attended region mix ``c_l = sum_k a_kl v_k`` (weights from
    :func:`t2i_attention_weights`). The reference l2-normalises ``c_l`` before the cosine, which
    cancels exactly. Values ``[n_img, n_cap, L]``; :func:`mean_pooling` over them is the
    reference score. Vectorised with the image Gram matrix: ``||c_l||^2 = a_l^T G_i a_l``."""
    weights, scores, images, captions = _t2i_weights(
        images, image_mask, captions, caption_mask, smooth, mask_regions
    )
    n_img, k, n_cap, length = weights.shape
    dot = (weights * scores).sum(1)  # [n_img, n_cap, L]
    gram = images @ images.transpose(1, 2)  # [n_img, K, K]
    flat = weights.reshape(n_img, k, n_cap * length)
    sq_norm = ((gram @ flat) * flat).sum(1).reshape(n_img, n_cap, length)
    context_norm = sq_norm.clamp_min(EPS * EPS).sqrt()
    word_norm = captions.norm(dim=-1)[None, :, :]  # [1, n_cap, L]
    # the reference divides without eps; the clamp only acts at padded words (norm 0), where a
    # 0/0 would otherwise send NaN gradients through the masking below
    values = dot / (word_norm * context_norm).clamp_min(EPS)
    valid = caption_mask.bool()[None, :, :].expand_as(values)
    return CodedScores(values.masked_fill(~valid, PADDING_SCORE), valid)


# ---------------------------------------------------------------------------------- poolings
def max_pooling(coded: CodedScores) -> Tensor:
    """``MaxPooling``: max over the valid entries of the last axis -> ``[n_img, n_cap]``."""
    return coded.values.masked_fill(~coded.valid, float("-inf")).max(dim=-1).values


def mean_pooling(coded: CodedScores) -> Tensor:
    """``MeanPooling``: mean of the valid entries -> ``[n_img, n_cap]``."""
    total = coded.values.masked_fill(~coded.valid, 0.0).sum(-1)
    return total / coded.valid.sum(-1).to(total.dtype)


def sum_pooling(coded: CodedScores) -> Tensor:
    """``SumPooling``: sum of the valid entries -> ``[n_img, n_cap]``."""
    return coded.values.masked_fill(~coded.valid, 0.0).sum(-1)


def lse_pooling(coded: CodedScores, belta: float = 0.1) -> Tensor:
    """``LSEPooling(belta)``: ``log sum_l exp(s_l / belta)`` over the valid entries.

    Follows the code, not the paper: the paper's ``(1/lambda) log sum exp(lambda s)`` with
    ``lambda = 1/belta`` carries a ``1/lambda`` factor that the code omits, so scores are
    ``1/belta`` times the paper's (pitfall §8.1); the hinge margin acts on this scale.
    """
    if belta <= 0:
        raise ValueError(f"lse_pooling: belta must be > 0, found {belta}")
    return torch.logsumexp((coded.values / belta).masked_fill(~coded.valid, float("-inf")), dim=-1)


def softmax_pooling(coded: CodedScores, belta: float = 0.1) -> Tensor:
    """``SoftmaxPooling(belta)``: ``sum_l softmax(s / belta)_l * s_l`` over the valid entries.

    Deviation (§3.3, §8.2): the reference multiplies ``-inf`` padding by its zero weight and
    returns NaN for every caption shorter than the longest in the call; here padded entries get
    weight 0 and contribute 0, which equals the reference wherever the reference is finite.
    """
    if belta <= 0:
        raise ValueError(f"softmax_pooling: belta must be > 0, found {belta}")
    weights = torch.softmax((coded.values / belta).masked_fill(~coded.valid, float("-inf")), dim=-1)
    return (weights * coded.values.masked_fill(~coded.valid, 0.0)).sum(-1)


# ---------------------------------------------------------------------------------- by name
CODINGS: dict[str, str] = {
    "vha": "visual hard assignment: each word -> best region (CHAN)",
    "tha": "textual hard assignment: each region -> best word",
    "vsa": "visual soft assignment: each region -> softmax mix of words (temperature alpha)",
    "t2i": "SCAN t2i soft assignment: each word -> attended mix of regions (smooth 9)",
}
POOLINGS: dict[str, Callable[..., Tensor]] = {
    "max": max_pooling,
    "mean": mean_pooling,
    "sum": sum_pooling,
    "lse": lse_pooling,
    "softmax": softmax_pooling,
}
# the reference's ``--coding_type`` / ``--pooling_type`` values (checkpoint ``opt``) -> names here
REFERENCE_CODING_NAMES = {"VHACoding": "vha", "THACoding": "tha", "VSACoding": "vsa", "T2ICrossAttentionPool": "t2i"}
REFERENCE_POOLING_NAMES = {
    "MaxPooling": "max",
    "MeanPooling": "mean",
    "SumPooling": "sum",
    "LSEPooling": "lse",
    "SoftmaxPooling": "softmax",
}


def code(
    images: Tensor,
    image_mask: Tensor,
    captions: Tensor,
    caption_mask: Tensor,
    coding: str = "vha",
    *,
    alpha: float = 0.1,
    smooth: float = 9.0,
    mask_regions: bool = True,
) -> CodedScores:
    """Run the coding named ``coding`` (a key of :data:`CODINGS`)."""
    if coding == "vha":
        return visual_hard_assignment(images, image_mask, captions, caption_mask)
    if coding == "tha":
        return textual_hard_assignment(images, image_mask, captions, caption_mask)
    if coding == "vsa":
        return visual_soft_assignment(images, image_mask, captions, caption_mask, alpha)
    if coding == "t2i":
        return t2i_soft_assignment(images, image_mask, captions, caption_mask, smooth, mask_regions)
    raise ValueError(f"coding: unknown coding {coding!r}; expected one of {sorted(CODINGS)}")


def pool(coded: CodedScores, pooling: str = "lse", *, belta: float = 0.1) -> Tensor:
    """Run the pooling named ``pooling`` (a key of :data:`POOLINGS`) -> ``[n_img, n_cap]``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pool: unknown pooling {pooling!r}; expected one of {sorted(POOLINGS)}")
    if pooling in ("lse", "softmax"):
        return POOLINGS[pooling](coded, belta)
    return POOLINGS[pooling](coded)


def coded_similarity(
    images: Tensor,
    image_mask: Tensor,
    captions: Tensor,
    caption_mask: Tensor,
    coding: str = "vha",
    pooling: str = "lse",
    *,
    belta: float = 0.1,
    alpha: float = 0.1,
    smooth: float = 9.0,
    mask_regions: bool = True,
) -> Tensor:
    """CHAN's ``SimsEncoder``: coding then pooling for every pair -> ``[n_img, n_cap]`` (§3.3).
    Defaults: VHA + LSE(0.1), the paper's CHAN."""
    coded = code(
        images, image_mask, captions, caption_mask, coding, alpha=alpha, smooth=smooth, mask_regions=mask_regions
    )
    return pool(coded, pooling, belta=belta)


def coding_workspace_bytes(k: int, length: int, d: int, coding: str, element_size: int = 4) -> int:
    """Peak temporaries per (image, caption) pair, for the engine's block sizing: the
    ``[K, L]`` cosine table (+ masked copies / attention weights for the soft codings)."""
    tables = {"vha": 2, "tha": 2, "vsa": 6, "t2i": 7}[coding]
    return element_size * (tables * k * length + 4 * length)
