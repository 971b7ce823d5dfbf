"""ESL: Enhanced Semantic similarity Learning (Zhang et al., IEEE TCSVT 2024). Spec: ``esl.md``.

A cosine compares two vectors dimension by dimension: its *measure-unit* is one dimension. ESL
builds, for every region and word vector, eight coarser views by repeatedly merging groups of
``kernel_size = 2`` dimensions (``d -> d/2 -> ... -> d/256``; level ``l`` aggregates ``2^l``
original dimensions), and scores a region-word pair on every level (§3.3–§3.4):

- **ESL-H** (*heuristic*): a fixed local pairing, a stride-2 convolution (dims ``2j, 2j+1``);
- **ESL-A** (*adaptive*): a learned sparse selection of 2 input dimensions per output dimension.

Region-word scores are a sum over the 9 levels of learned bilinear forms ``x_l G_l y_lᵀ`` whose
matrices carry a learned per-level *contribution degree* ``α_l`` (soft-thresholded towards
sparsity in ESL-H), pooled by SCAN-style attention in both directions (t2i + i2t). The encoders
are VSE∞'s region encoder (fc + MLP, l2 per region, no GPO) and per-token text features.

Everything that depends on one item only is computed once per item: the level features of
regions and words (``encode_images`` / ``encode_captions``) and the image side of the bilinear
forms (``Ŷ_l = Y_l G_lᵀ``, kept in ``Encoded.extras["projected"]``), so a block of pairs costs
one GEMM ``[n_cap·L, F] x [F, n_img·R]`` plus the two softmax poolings (§4, exact).

Public: :class:`ESLConfig`, :class:`ESL`, :class:`MultiLevelAggregation`,
:class:`EnhancedCorrespondence`, :func:`level_dims`, :func:`adaptive_selection`,
:func:`attention_pooling_weights`, :func:`pooled_score`, :func:`convert_checkpoint`,
:func:`load_reference_checkpoint`, ``METHOD`` (presets ``smoke``, ``course``, ``paper``,
``paper-{f30k,coco}-{h,a}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig
from itmkit.config_checks import FiniteFloat, PositiveFloat, PositiveInt, Range
from itmkit.data.embedded import embedded_feature_dim
from itmkit.encoded import Encoded
from itmkit.methods.registry import MethodSpec
from itmkit.models.base import (
    REGION_SCORES,
    REGION_WORD_WEIGHTS,
    WORD_REGION_WEIGHTS,
    WORD_SCORES,
    Explanation,
    MatchingModel,
    as_numpy,
    check_one_pair,
    eval_mode,
)
from itmkit.models.functional import l2norm
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.text_encoders import build_text_encoder

# The reference's eps everywhere: added to norms (l2norm, selection rows, attention columns) and the
# LayerNorm over each level matrix (§3.3, §3.4).
EPS = 1e-8
LEAKY_SLOPE = 0.1  # SCAN's "clipped" attention: leaky_relu(tanh(A), 0.1) (§3.4)


@dataclass
class ESLConfig:
    """ESL model options (esl.md §3; reference names in brackets).

    Attributes:
        variant: ``"H"`` heuristic (fixed stride-2 pairing, soft-thresholded level weights) or
            ``"A"`` adaptive (learned top-2 selection, plain level weights) [``heuristic_strategy``].
        embed_size: joint space size ``D`` [``embed_size``]; needs ``D // k^(levels-1) >= 1``.
        img_dim: region feature size of the precomp data [``img_dim``].
        kernel_size: dimensions merged per step ``k`` [``kernel_size``]; 2 in every recipe.
        levels: number of levels including level 0 (9 in the reference).
        conv_channels: ESL-H conv output channels, summed (4 in the reference, §8.8).
        selected_per_row: ESL-A entries kept per selection row (2, hard-coded in the reference).
        attend_padded_regions: the reference never masks regions: in training the zero-padded
            regions of a batch (after region drop) become ``l2(fc.bias + MLP(0))`` and act as extra
            regions (§8.5). ``True`` reproduces that (checkpoint parity; no effect at test time,
            where every region is real); ``False`` masks them (padding-invariant model).
        init_level_weight: initial contribution degree of every level (``sim_eval`` init 0.1).
        init_temperature: initial attention temperature (``temp_scale = log(1/0.07)``).
        init_threshold_position / init_log_sharpness: initial σ (0) and ``log λ`` (3) of ESL-H's
            soft threshold.
    """

    variant: Literal["H", "A"] = "H"
    embed_size: PositiveInt = 512
    img_dim: PositiveInt = 2048
    kernel_size: Annotated[int, Range(2, why="each level merges k >= 2 dimensions")] = 2
    levels: PositiveInt = 9
    conv_channels: PositiveInt = 4
    selected_per_row: PositiveInt = 2
    attend_padded_regions: bool = False
    init_level_weight: FiniteFloat = 0.1
    init_temperature: PositiveFloat = 0.07
    init_threshold_position: FiniteFloat = 0.0
    init_log_sharpness: FiniteFloat = 3.0

    def __post_init__(self) -> None:
        if self.variant not in ("H", "A"):
            raise ValueError(f"ESLConfig.variant: expected 'H' (heuristic) or 'A' (adaptive), found {self.variant!r}")
        level_dims(self.embed_size, self.kernel_size, self.levels)  # raises on sizes that reach 0


def level_dims(embed_size: int, kernel_size: int = 2, levels: int = 9) -> list[int]:
    """Feature size of every level, ``D_l = floor(D / k^l)``, l = 0..levels-1 (§3):
    512 -> [512, 256, ..., 2]; 256 -> [256, 128, ..., 1]."""
    if kernel_size < 2 or levels < 1:
        raise ValueError(f"ESL level sizes: expected kernel_size >= 2 and levels >= 1, found {kernel_size}, {levels}")
    dims = [embed_size // kernel_size**level for level in range(levels)]
    if dims[-1] < 1:
        raise ValueError(
            f"ESLConfig.embed_size: expected at least kernel_size^(levels-1) = {kernel_size ** (levels - 1)} "
            f"so that level {levels - 1} keeps one dimension, found {embed_size} (§8.8)"
        )
    return dims


def level_slices(dims: list[int]) -> list[slice]:
    """Where each level sits in the concatenated ``[..., sum(D_l)]`` features."""
    starts = [sum(dims[:level]) for level in range(len(dims))]
    return [slice(start, start + dim) for start, dim in zip(starts, dims)]


# ------------------------------------------------------------------- §3.3 multi-level aggregation
def adaptive_selection(weight: Tensor, keep: int = 2) -> Tensor:
    """ESL-A's selection matrix ``M̃ [D_out, D_in]`` from the raw mask ``M [D_out, D_in]`` (§3.3).

    Rows are l2-normalised (``M / (||row|| + 1e-8)``); per row the entries ``>=`` the row's
    ``keep``-th largest *signed* value are kept (ties keep more; all entries when a row is
    shorter than ``keep``), the rest set to 0. The 0/1 choice carries no gradient; the kept
    values keep their normalised size, so dropped entries still get gradient through the norm.
    """
    rows = weight / (torch.linalg.vector_norm(weight, dim=1, keepdim=True) + EPS)
    k = min(keep, rows.shape[1])
    threshold = rows.topk(k, dim=1).values[:, -1:]
    return rows * (rows >= threshold).to(rows.dtype)


class MultiLevelAggregation(nn.Module):
    """One modality's measure-unit hierarchy: ``x [..., D] -> concat[y_0, f_1, ..., f_8] [..., ΣD_l]``
    (§3.3, ``Image_levels`` / ``Text_levels``).

    ``merge[l-1]`` maps level ``l-1`` to level ``l``: ESL-H a ``Conv1d(1, channels, k, stride=k)``
    whose channels are summed, i.e. one kernel ``κ = Σ_c W[c, 0]``, ``y_l[j] = Σ_t κ[t] y_{l-1}[k j + t]``;
    ESL-A an ``Embedding(D_l, D_{l-1})`` used as the matrix ``M_l`` through
    :func:`adaptive_selection`. Level outputs are ``f_l = y_l / (||y_l|| + 1e-8)``; level 0 is the
    input unchanged.

    ``normalised_chain``: the image side feeds the *normalised* ``f_{l-1}`` to level ``l``, the text
    side the *un-normalised* ``y_{l-1}`` (a reference asymmetry reproduced exactly, §3.3, §8.4).
    """

    def __init__(self, cfg: ESLConfig, normalised_chain: bool) -> None:
        super().__init__()
        self.variant = cfg.variant
        self.kernel_size = cfg.kernel_size
        self.selected_per_row = cfg.selected_per_row
        self.normalised_chain = normalised_chain
        self.dims = level_dims(cfg.embed_size, cfg.kernel_size, cfg.levels)
        if cfg.variant == "H":
            # Conv1d's default init (kaiming-uniform, U(-1/sqrt(k), 1/sqrt(k))), as the reference
            self.merge = nn.ModuleList(
                nn.Conv1d(1, cfg.conv_channels, cfg.kernel_size, stride=cfg.kernel_size, bias=False)
                for _ in self.dims[1:]
            )
        else:
            # nn.Embedding's N(0, 1) init, as the reference's masks_l
            self.merge = nn.ModuleList(nn.Embedding(d_out, d_in) for d_in, d_out in zip(self.dims, self.dims[1:]))

    def merge_matrix(self, level: int) -> Tensor:
        """The linear map of level ``level`` (1-based) as a dense ``[D_l, D_{l-1}]`` matrix
        (ESL-H: the banded pairing; ESL-A: the selection ``M̃_l``). For figures and tests."""
        d_in, d_out = self.dims[level - 1], self.dims[level]
        weight = self.merge[level - 1].weight
        if self.variant == "A":
            return adaptive_selection(weight, self.selected_per_row)
        kernel = weight.sum(dim=0)[0]  # [k]
        dense = weight.new_zeros(d_out, d_in)
        rows = torch.arange(d_out, device=weight.device)
        for offset in range(self.kernel_size):
            dense[rows, rows * self.kernel_size + offset] = kernel[offset]
        return dense

    def _merge(self, level: int, y: Tensor) -> Tensor:
        d_out = self.dims[level]
        weight = self.merge[level - 1].weight
        if self.variant == "A":
            return y @ adaptive_selection(weight, self.selected_per_row).t()
        kernel = weight.sum(dim=0)[0]  # the 4 output channels are summed: one kernel [k]
        # stride-k windows that fit (Conv1d drops a trailing remainder): [..., D_l, k] @ [k]
        used = d_out * self.kernel_size
        windows = (y if used == y.shape[-1] else y[..., :used]).reshape(*y.shape[:-1], d_out, self.kernel_size)
        return windows @ kernel

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D]`` (unit-norm region / word vectors) -> ``[..., sum(D_l)]``."""
        if x.shape[-1] != self.dims[0]:
            raise ValueError(f"MultiLevelAggregation input: expected [..., {self.dims[0]}], found {tuple(x.shape)}")
        outputs, previous = [x], x
        for level in range(1, len(self.dims)):
            y = self._merge(level, previous)
            f = l2norm(y, dim=-1, eps=EPS)
            outputs.append(f)
            previous = f if self.normalised_chain else y
        return torch.cat(outputs, dim=-1)


# -------------------------------------------------------------- §3.4 enhanced correspondence
class EnhancedCorrespondence(nn.Module):
    """Per-level bilinear forms and contribution degrees (§3.4, ``sims_claculator``).

    Parameters: ``level_weight`` (``Linear(levels, 1, bias=False)``, ``w [1, levels]``, init 0.1),
    ``log_inverse_temperature`` (``smooth = exp(.)``, init ``log(1/0.07)``), ``threshold_position``
    (σ, init 0), ``log_sharpness`` (``λ = exp(.)``, init 3), ``level_matrices[l]`` (``M_l [D_l, D_l]``,
    init N(0, 1)) and ``level_norms[l]`` (``LayerNorm([D_l, D_l], eps=1e-8)`` over the whole matrix).

    ``contribution_degrees()`` gives ``α`` and ``interaction_matrices()`` ``G_l = LN_l(M_l) · α_l``;
    a region-word score is ``A = Σ_l x_l G_l y_lᵀ``.
    """

    def __init__(self, cfg: ESLConfig) -> None:
        super().__init__()
        self.variant = cfg.variant
        self.dims = level_dims(cfg.embed_size, cfg.kernel_size, cfg.levels)
        self.slices = level_slices(self.dims)
        self.level_weight = nn.Linear(len(self.dims), 1, bias=False)
        nn.init.constant_(self.level_weight.weight, cfg.init_level_weight)
        self.log_inverse_temperature = nn.Parameter(torch.full((1, 1), math.log(1.0 / cfg.init_temperature)))
        # ESL-A never reads σ and λ: they get no gradient and stay at their init (§7), as in the reference
        self.threshold_position = nn.Parameter(torch.full((1, 1), float(cfg.init_threshold_position)))
        self.log_sharpness = nn.Parameter(torch.full((1, 1), float(cfg.init_log_sharpness)))
        self.level_matrices = nn.ParameterList(nn.Parameter(torch.randn(d, d)) for d in self.dims)
        self.level_norms = nn.ModuleList(nn.LayerNorm([d, d], eps=EPS) for d in self.dims)

    @property
    def smooth(self) -> Tensor:
        """Inverse temperature of the attention softmaxes, ``exp(temp_scale)`` (scalar)."""
        return self.log_inverse_temperature.exp().reshape(())

    def contribution_degrees(self) -> Tensor:
        """``α [levels]``. ESL-H: ``α_l = exp((|w_l| - thr) λ) w_l`` with
        ``thr = (max|w| - min|w|) σ + min|w|`` (levels below the threshold shrink towards 0);
        ESL-A: ``α = w``."""
        w = self.level_weight.weight[0]
        if self.variant == "A":
            return w
        magnitude = w.abs()
        low = magnitude.min()
        threshold = (magnitude.max() - low) * self.threshold_position.reshape(()) + low
        return torch.exp((magnitude - threshold) * self.log_sharpness.exp().reshape(())) * w

    def interaction_matrices(self) -> list[Tensor]:
        """``G_l = LayerNorm_l(M_l) * α_l``, each ``[D_l, D_l]``."""
        alpha = self.contribution_degrees()
        return [
            F.layer_norm(m, m.shape, norm.weight, norm.bias, norm.eps) * alpha[level]
            for level, (m, norm) in enumerate(zip(self.level_matrices, self.level_norms))
        ]

    def project_regions(self, levels: Tensor) -> Tensor:
        """``Ŷ = concat_l Y_l G_lᵀ``: ``[..., ΣD_l] -> [..., ΣD_l]``, so that ``A = X · Ŷᵀ``
        equals ``Σ_l X_l G_l Y_lᵀ`` (the image side is projected: fewer rows than captions)."""
        # split (not slicing): its backward is one cat instead of a zero-filled full-size tensor per level
        parts = [y @ g.t() for y, g in zip(levels.split(self.dims, dim=-1), self.interaction_matrices())]
        return torch.cat(parts, dim=-1)


def attention_pooling_weights(
    scores: Tensor, word_mask: Tensor, region_mask: Tensor, smooth: Tensor | float
) -> tuple[Tensor, Tensor]:
    """The two attention maps of ESL's pooling (§3.4) from raw region-word scores.

    Args:
        scores: ``A [bi, bc, L, R]`` (image, caption, word, region).
        word_mask: ``[bc, L]`` bool, True at real words; region_mask: ``[bi, R]`` bool.
        smooth: softmax inverse temperature.

    Returns:
        ``a [bi, bc, L, R]``: each word's weights over the regions (t2i), from
        ``P = leaky_relu(tanh(A), 0.1)`` normalised per region column over the words;
        ``b [bi, bc, L, R]``: each region's weights over the words (i2t), from the same ``P``
        normalised per word row over the regions. Masked positions get weight 0.
    """
    valid = word_mask[None, :, :, None] & region_mask[:, None, None, :]
    clipped = F.leaky_relu(torch.tanh(scores), LEAKY_SLOPE).masked_fill(~valid, 0.0)
    over_words = clipped / (torch.linalg.vector_norm(clipped, dim=2, keepdim=True) + EPS)
    over_regions = clipped / (torch.linalg.vector_norm(clipped, dim=3, keepdim=True) + EPS)
    no_region = ~region_mask[:, None, None, :]
    no_word = ~word_mask[None, :, :, None]
    a = torch.softmax((smooth * over_words).masked_fill(no_region, float("-inf")), dim=3)
    b = torch.softmax((smooth * over_regions).masked_fill(no_word, float("-inf")), dim=2)
    return a, b


def pooled_score(values: Tensor, a: Tensor, b: Tensor, word_mask: Tensor, region_mask: Tensor) -> Tensor:
    """``s_t2i + s_i2t [bi, bc]``: mean over real words of ``Σ_r a·values`` plus mean over real
    regions of ``Σ_w b·values`` (§3.4). Linear in ``values``, so the score of ``A = Σ_l A_l``
    splits exactly into per-level parts."""
    values = values.masked_fill(~(word_mask[None, :, :, None] & region_mask[:, None, None, :]), 0.0)
    per_word = (a * values).sum(dim=3)  # [bi, bc, L]
    per_region = (b * values).sum(dim=2)  # [bi, bc, R]
    words = word_mask.sum(dim=1).to(values.dtype)  # [bc]
    regions = region_mask.sum(dim=1).to(values.dtype)  # [bi]
    t2i = per_word.masked_fill(~word_mask[None], 0.0).sum(dim=2) / words[None, :]
    i2t = per_region.masked_fill(~region_mask[:, None], 0.0).sum(dim=2) / regions[:, None]
    return t2i + i2t


# ------------------------------------------------------------------------------------ the model
class ESL(MatchingModel):
    """ESL-H / ESL-A as a pairwise :class:`MatchingModel` (§3).

    Submodules (state-dict prefixes): ``image`` (``fc``, ``mlp.layers.{0,1}``, ``mlp.bns.{0,1}``),
    ``text`` (``embed``/``rnn`` or ``backbone``/``linear``), ``image_levels`` / ``text_levels``
    (``merge.{l-1}.weight``), ``correspondence``.

    - ``encode_images(images [B, K, img_dim], lengths)`` -> ``Encoded(feats [B, K, ΣD_l],
      extras={"projected": Ŷ [B, K, ΣD_l]})`` (lengths = K for all when ``attend_padded_regions``);
    - ``encode_captions(tokens [B, L], lengths)`` -> ``Encoded(feats [B, L, ΣD_l])``;
    - ``score_block`` -> ``[bi, bc]``, one GEMM + two masked softmax poolings.
    """

    pairwise = True
    method_name = "esl"
    similarity_prefixes = ("image_levels.", "text_levels.", "correspondence.")

    def __init__(self, cfg: ESLConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dims = level_dims(cfg.embed_size, cfg.kernel_size, cfg.levels)
        self.slices = level_slices(self.dims)
        # VSE∞'s basic region encoder + per-region l2 norm, no GPO (§3.1); the reference lets padded
        # regions through (fc.bias + MLP(0)), kept when they are attended to
        self.image = PrecompRegionEncoder(
            cfg.img_dim, cfg.embed_size, mlp_residual=True, l2_regions=True, zero_padding=not cfg.attend_padded_regions
        )
        # every token's feature, l2-normalised per token (§3.2); BiGRU is a course option, not the reference
        self.text = build_text_encoder(text_cfg, cfg.embed_size, vocab_size, l2_words=True)
        self.image_levels = MultiLevelAggregation(cfg, normalised_chain=True)
        self.text_levels = MultiLevelAggregation(cfg, normalised_chain=False)
        self.correspondence = EnhancedCorrespondence(cfg)

    @property
    def feature_size(self) -> int:
        return sum(self.dims)

    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, K, img_dim]`` (zero-padded), ``lengths [B]`` -> level features and their
        projection through the level matrices, both ``[B, K, ΣD_l]``."""
        regions = self.image(images, lengths)
        if self.cfg.attend_padded_regions:
            # quirk kept for checkpoint parity: every padded region counts as a region (§8.5)
            lengths = torch.full_like(lengths, images.shape[1])
        return self.images_from_regions(regions, lengths)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]`` ids, ``lengths [B]`` (incl. start/end or CLS/SEP) -> ``[B, L, ΣD_l]``."""
        return self.captions_from_words(self.text(tokens, lengths), lengths)

    def images_from_regions(self, regions: Tensor, lengths: Tensor) -> Encoded:
        """Unit region embeddings ``[B, K, D]`` -> their level features ``[B, K, ΣD_l]`` (§3.3) with
        ``extras["projected"]``, the image side of the bilinear forms (§3.4)."""
        levels = self.image_levels(regions)
        return Encoded(levels, lengths, {"projected": self.correspondence.project_regions(levels)})

    def captions_from_words(self, words: Tensor, lengths: Tensor) -> Encoded:
        """Unit word embeddings ``[B, L, D]`` -> their level features ``[B, L, ΣD_l]`` (§3.3)."""
        return Encoded(self.text_levels(words), lengths)

    def _scores(self, images: Encoded, captions: Encoded) -> Tensor:
        """``A [bi, bc, L, R]`` in fp32: one GEMM ``[bc·L, F] x [F, bi·R]``."""
        return torch.einsum("cwf,irf->icwr", captions.feats, images.extras["projected"]).float()

    def score_block(self, images: Encoded, captions: Encoded) -> Tensor:
        """``[bi, bc]`` ESL similarities ``s_t2i + s_i2t`` of every image against every caption (§3.4)."""
        scores = self._scores(images, captions)
        word_mask, region_mask = captions.mask, images.mask
        a, b = attention_pooling_weights(scores, word_mask, region_mask, self.correspondence.smooth)
        return pooled_score(scores, a, b, word_mask, region_mask)

    def pair_workspace_bytes(self, images: Encoded, captions: Encoded) -> int:
        """About 16 fp32 ``[L, R]`` temporaries per pair (scores, tanh, two normalisations, two
        softmaxes, products; the training graph keeps them all) plus the GEMM output."""
        regions, words = images.feats.shape[1], captions.feats.shape[1]
        return words * regions * (16 * 4 + captions.feats.element_size())

    @torch.no_grad()
    def level_scores(self, images: Encoded, captions: Encoded) -> Tensor:
        """``[bi, bc, levels]``: each level's share of the similarity; sums to :meth:`score_block`.

        The attention maps come from the full ``A``; level ``l``'s part pools ``A_l = X_l G_l Y_lᵀ``
        with them (the pooled sums are linear in ``A``)."""
        scores = self._scores(images, captions)
        word_mask, region_mask = captions.mask, images.mask
        a, b = attention_pooling_weights(scores, word_mask, region_mask, self.correspondence.smooth)
        parts = []
        words, regions = captions.feats.split(self.dims, dim=-1), images.extras["projected"].split(self.dims, dim=-1)
        for x, y in zip(words, regions):
            level = torch.einsum("cwf,irf->icwr", x, y).float()
            parts.append(pooled_score(level, a, b, word_mask, region_mask))
        return torch.stack(parts, dim=-1)

    @torch.no_grad()
    def explain(self, image: Encoded, caption: Encoded) -> Explanation:
        """How ESL scores one image against one caption (``len == 1`` each), unpadded (§3.4).

        Parts: ``word_region_scores [n_words, n_regions]``, the region-word scores ``A = Σ_l
        x_l G_l y_lᵀ``; ``word_region_weights [n_words, n_regions]`` (t2i attention ``a``, each
        word over the regions) and ``region_word_weights [n_regions, n_words]`` (i2t attention
        ``b``, each region over the words), rows summing to 1; ``word_scores [n_words]`` =
        ``Σ_r a·A`` and ``region_scores [n_regions]`` = ``Σ_w b·A`` (the score is the mean of each
        plus each other); ``level_scores [levels]``, each level's share of the score (sums to it).
        With ``attend_padded_regions`` every region slot of the image counts (§8.5).
        """
        n_regions, n_words = check_one_pair(image, caption)
        image, caption = image.slice(0, 1), caption.slice(0, 1)
        with eval_mode(self):
            scores = self._scores(image, caption)  # [1, 1, n_words, n_regions]
            a, b = attention_pooling_weights(scores, caption.mask, image.mask, self.correspondence.smooth)
            parts = {
                "word_region_scores": as_numpy(scores[0, 0]),
                WORD_REGION_WEIGHTS: as_numpy(a[0, 0]),
                REGION_WORD_WEIGHTS: as_numpy(b[0, 0].t()),
                WORD_SCORES: as_numpy((a * scores).sum(dim=3)[0, 0]),
                REGION_SCORES: as_numpy((b * scores).sum(dim=2)[0, 0]),
                "level_scores": as_numpy(self.level_scores(image, caption)[0, 0]),
            }
            score = float(self.similarity(image, caption)[0, 0])
        return Explanation(self.method_name, score, n_regions, n_words, parts)

    @torch.no_grad()
    def level_summary(self) -> pd.DataFrame:
        """One row per level: size ``D_l``, original dimensions per measure-unit (``k^l``), the raw
        weight ``w_l`` and the contribution degree ``α_l`` (``|α|`` share in ``share``)."""
        w = self.correspondence.level_weight.weight[0].detach().cpu()
        alpha = self.correspondence.contribution_degrees().detach().cpu()
        return pd.DataFrame({
            "level": range(len(self.dims)),
            "dims": self.dims,
            "dims_per_unit": [self.cfg.kernel_size**level for level in range(len(self.dims))],
            "raw_weight": w.numpy(),
            "contribution": alpha.numpy(),
            "share": (alpha.abs() / alpha.abs().sum().clamp_min(1e-12)).numpy(),
        })


def level_score_gap(model: ESL, images: Encoded, captions: Encoded, captions_per_image: int = 5) -> pd.DataFrame:
    """Mean per-level share of the score (:meth:`ESL.level_scores`) of matching and of
    non-matching pairs, and their gap (esl.md §3): which granularities separate the pairs.

    ``images [n_img, R, d]`` and ``captions [n_cap, L, d]`` encoded (caption ``c`` belongs to
    image ``c // captions_per_image``); all ``n_img x n_cap`` pairs are scored at once, so keep
    the sets small (notebook 07 uses 100 images). Returns one row per level: ``level``,
    ``matching``, ``non-matching``, ``gap``.
    """
    with torch.no_grad():
        per_level = model.level_scores(images, captions).cpu().numpy()  # [n_img, n_cap, levels]
    n_img, n_cap = per_level.shape[:2]
    matching = np.arange(n_cap)[None, :] // captions_per_image == np.arange(n_img)[:, None]
    if not matching.any() or matching.all():
        raise ValueError(f"level_score_gap: expected matching and non-matching pairs among {n_img} images x {n_cap} captions")
    table = pd.DataFrame({
        "level": np.arange(per_level.shape[-1]),
        "matching": per_level[matching].mean(axis=0),
        "non-matching": per_level[~matching].mean(axis=0),
    })
    table["gap"] = table["matching"] - table["non-matching"]
    return table


def build(run_cfg: RunConfig, vocab_size: int | None) -> ESL:
    """Registry hook: an :class:`ESL` from a :class:`RunConfig` (``model`` is an :class:`ESLConfig`)."""
    cfg = run_cfg.model
    if isinstance(cfg, dict):
        cfg = ESLConfig(**cfg)
    if not isinstance(cfg, ESLConfig):
        raise TypeError(f"esl.build: run_cfg.model must be an ESLConfig, found {type(cfg).__name__}")
    return ESL(cfg, run_cfg.text, vocab_size)


# ------------------------------------------------------------------------------ presets (§5, §9)
def paper_preset(dataset: Literal["f30k", "coco"], variant: Literal["H", "A"]) -> RunConfig:
    """``train_region_{f30k,coco}.sh`` (§5): D 512, k 2, BERT (all tokens), batch 128, AdamW lr 5e-4
    wd 1e-4 (BERT at lr x 0.1), x0.1 at epoch 15 of 30 (f30k) / 10 of 20 (COCO), clip 2, margin
    0.2, one sum-mode epoch then hardest negatives, region drop 0.2, token augmentation.

    ``data.data_dir`` is a placeholder (``data/{f30k,coco}_precomp``); ``text.hf_path=None`` is
    the offline MiniLM: point it at a local ``bert-base-uncased`` to match the paper. The
    reference sets no seed (§8.6); ours is 0. It validates on the test split (§5, model selection
    on test); we validate on dev.
    """
    if dataset not in ("f30k", "coco") or variant not in ("H", "A"):
        raise KeyError(f"ESL paper preset: dataset f30k|coco and variant H|A, found {dataset!r}, {variant!r}")
    coco = dataset == "coco"
    return RunConfig(
        method="esl",
        model=ESLConfig(variant=variant, embed_size=512, img_dim=2048, kernel_size=2, attend_padded_regions=True),
        text=TextConfig(kind="hf", hf_path=None),
        data=DataConfig(
            data_dir=f"data/{dataset}_precomp",
            test_split="testall" if coco else "test",
            dev_max_captions=5000,
            region_drop=0.2,
            caption_augment=True,
        ),
        train=TrainConfig(
            epochs=20 if coco else 30,
            batch_size=128,
            lr=5e-4,
            lr_decay_epochs=(10,) if coco else (15,),
            lr_decay_factor=0.1,
            optimizer="adamw",
            weight_decay=1e-4,
            backbone_lr_scale=0.1,
            grad_clip=2.0,
            margin=0.2,
            max_violation=False,  # hardest negatives from epoch 1, after the sum-mode warm-up
            sum_warmup_epochs=1,
            amp=False,  # the reference trains in full fp32 (§5)
        ),
    )


def course_preset(variant: Literal["H", "A"] = "H") -> RunConfig:
    """§9 on the embedded ``course`` set: D 256 (the smallest with 9 levels; level 8 is 1-d),
    fc + MLP region encoder, a 1-layer BiGRU (word_dim 32; not the reference's BERT, for speed),
    batch 32, AdamW lr 5e-4 wd 1e-4, 8 epochs with x0.1 at epoch 5, margin 0.2, two sum-mode
    epochs (the paper recipe has one), clip 2, region drop 0.2 (padded regions masked).

    Two, because one was fragile here: ESL-H learns slower than ESL-A in its first epoch (dev
    i2t R@1 7 against 19), and with seed 0 on 2 CPU threads hardest negatives from epoch 2
    squeezed every score together (loss stuck at batch x 2 x margin, test rsum 294.6). With two
    sum-mode epochs (2026-12-06, 2 threads): ESL-H seeds 0 and 1 gave 544.4 and 544.6, ESL-A seed 0
    545.4 (544.4 with one)."""
    return RunConfig(
        method="esl",
        model=ESLConfig(variant=variant, embed_size=256, img_dim=embedded_feature_dim("course")),
        text=TextConfig(kind="bigru", word_dim=32),
        data=DataConfig(embedded_preset="course", region_drop=0.2, caption_augment=True),
        train=TrainConfig(
            epochs=8,
            batch_size=32,
            lr=5e-4,
            lr_decay_epochs=(5,),
            optimizer="adamw",
            weight_decay=1e-4,
            grad_clip=2.0,
            margin=0.2,
            max_violation=False,  # hardest negatives from the third epoch, after the sum-mode warm-up
            sum_warmup_epochs=2,
            log_every_steps=10,
        ),
    )


def smoke_preset(variant: Literal["H", "A"] = "H") -> RunConfig:
    """Every code path on the embedded ``tiny`` set in seconds; numbers are not judged."""
    cfg = course_preset(variant)
    cfg.model = ESLConfig(variant=variant, embed_size=256, img_dim=embedded_feature_dim("tiny"))
    cfg.text = TextConfig(kind="bigru", word_dim=16)
    cfg.data = DataConfig(embedded_preset="tiny", region_drop=0.2, caption_augment=True)
    cfg.train.epochs = 2
    cfg.train.lr_decay_epochs = (1,)
    cfg.train.sum_warmup_epochs = 1  # one epoch of each loss mode: both code paths run
    cfg.train.log_every_steps = 5
    return cfg


PRESETS = {
    "smoke": smoke_preset,
    "course": course_preset,
    "course-a": lambda: course_preset("A"),
    "paper": lambda: paper_preset("f30k", "H"),
    "paper-f30k-h": lambda: paper_preset("f30k", "H"),
    "paper-f30k-a": lambda: paper_preset("f30k", "A"),
    "paper-coco-h": lambda: paper_preset("coco", "H"),
    "paper-coco-a": lambda: paper_preset("coco", "A"),
}

VARIANTS = {"H": {"model.variant": "H"}, "A": {"model.variant": "A"}}


# ------------------------------------------------------------------------- checkpoints (§7)
class CheckpointFormatError(ValueError):
    """A reference ESL checkpoint that does not have the layout of esl.md §7."""

    def __init__(self, source: str, field: str, expected: str, found: str) -> None:
        self.source, self.field, self.expected, self.found = source, field, expected, found
        super().__init__(f"{source}: field {field!r}: expected {expected}, found {found}")


_LEVELS_PREFIX = "plus_encoder.encoders_1."
_CALCULATOR_PREFIX = "sims.calculator_1."
_CALCULATOR_SCALARS = {
    "sim_eval.weight": "correspondence.level_weight.weight",
    "temp_scale.weight": "correspondence.log_inverse_temperature",
    "temp_scale_1.weight": "correspondence.threshold_position",
    "temp_scale_2.weight": "correspondence.log_sharpness",
}


def _similarity_keys(sim_state: Mapping[str, Tensor], name: str) -> tuple[dict[str, Tensor], str, int]:
    """Rename the ``sim_vec`` state (§7) to ours; returns ``(state, variant, levels)``."""
    heuristic = any(f"{_LEVELS_PREFIX}image_levels.kernel_img_" in k for k in sim_state)
    adaptive = any(f"{_LEVELS_PREFIX}image_levels.masks_" in k for k in sim_state)
    if heuristic == adaptive:
        raise CheckpointFormatError(
            name, "model[2] (sim_vec)",
            "ESL-H keys 'plus_encoder.encoders_1.image_levels.kernel_img_<l>.weight' or ESL-A keys "
            "'plus_encoder.encoders_1.image_levels.masks_<l>.weight' (exactly one kind)",
            "both" if heuristic else f"neither (keys {sorted(sim_state)[:4]})",
        )
    variant = "H" if heuristic else "A"
    state: dict[str, Tensor] = {}
    for key, value in sim_state.items():
        if key.startswith(_CALCULATOR_PREFIX):
            rest = key[len(_CALCULATOR_PREFIX):]
            if rest in _CALCULATOR_SCALARS:
                state[_CALCULATOR_SCALARS[rest]] = value
            elif rest.startswith("masks_") and rest.endswith(".weight"):
                state[f"correspondence.level_matrices.{int(rest[6:-7])}"] = value
            elif rest.startswith("lynorm_"):
                level, _, param = rest[7:].partition(".")
                state[f"correspondence.level_norms.{int(level)}.{param}"] = value
            else:
                state[f"correspondence.{rest}"] = value  # unknown: a strict load names it
        elif key.startswith(_LEVELS_PREFIX):
            rest = key[len(_LEVELS_PREFIX):]
            side, _, leaf = rest.partition(".")
            ours = {"image_levels": "image_levels", "text_levels": "text_levels"}.get(side)
            stem = leaf.split(".")[0]
            digits = stem.rsplit("_", 1)[-1]
            if ours is None or not digits.isdigit():
                state[f"unknown.{rest}"] = value
                continue
            # reference levels count from 1 (kernel_img_1 makes level 1); ours index merge steps from 0
            state[f"{ours}.merge.{int(digits) - 1}.weight"] = value
        else:
            state[f"unknown.{key}"] = value
    levels = 1 + sum(1 for k in state if k.startswith("image_levels.merge."))
    return state, variant, levels


def _encoder_states(
    name: str, img_state: dict[str, Tensor], txt_state: dict[str, Tensor], state: dict[str, Tensor]
) -> tuple[int, int]:
    """Check and rename the ``img_enc`` / ``txt_enc`` states (§7) into ``state``; returns
    ``(embed_size, img_dim)``."""
    from itmkit.checkpoints import BERT_POSITION_IDS

    if "fc.weight" not in img_state:
        raise CheckpointFormatError(name, "model[0] (img_enc)", "key 'fc.weight'", f"keys {sorted(img_state)[:6]}")
    if "mlp.layers.0.weight" not in img_state:
        raise CheckpointFormatError(
            name, "model[0] (img_enc)", "the residual MLP key 'mlp.layers.0.weight' (precomp_enc_type basic)",
            f"keys {sorted(img_state)[:6]}",
        )
    embed_size, img_dim = (int(s) for s in img_state["fc.weight"].shape)
    state.update({f"image.{k}": v for k, v in img_state.items()})

    if "linear.weight" not in txt_state or not any(k.startswith("bert.") for k in txt_state):
        raise CheckpointFormatError(
            name, "model[1] (txt_enc)", "a BERT text encoder ('bert.*' and 'linear.weight')", f"keys {sorted(txt_state)[:6]}"
        )
    for key, value in txt_state.items():
        state[("text.backbone." + key[len("bert."):]) if key.startswith("bert.") else ("text." + key)] = value
    state.pop(BERT_POSITION_IDS, None)  # a fixed arange buffer; load_reference_checkpoint restores it if needed
    return embed_size, img_dim


def convert_checkpoint(
    source: str | Path | Mapping[str, Any], *, hf_path: str | Path | None = None, similarity_only: bool = False
) -> tuple[RunConfig, dict[str, Tensor]]:
    """A released ESL checkpoint (§7) -> ``(RunConfig, state_dict for ESL)``.

    ``source``: the ``.tar``/``.pth`` path (opened with ``weights_only=False``: trusted files only)
    or the loaded dict ``{'model': [img_enc, txt_enc, sim_vec], 'opt': Namespace, ...}``. Keys lose
    DataParallel's ``module.``; the variant comes from the keys (``kernel_img_l`` -> ESL-H,
    ``masks_l`` -> ESL-A; ``opt`` does not store it), sizes from the tensors, the recipe from
    ``opt``. Mapping: ``img_enc.X -> image.X``; ``bert.X -> text.backbone.X``,
    ``linear.X -> text.linear.X``; ``...image_levels.kernel_img_l`` / ``masks_l`` ->
    ``image_levels.merge.{l-1}.weight`` (text likewise); ``sims.calculator_1.sim_eval`` ->
    ``correspondence.level_weight.weight``, ``temp_scale{,_1,_2}`` -> ``log_inverse_temperature``,
    ``threshold_position``, ``log_sharpness``; ``masks_l`` -> ``level_matrices.l``;
    ``lynorm_l.*`` -> ``level_norms.l.*``. ``hf_path``: local folder of the BERT it was trained
    with (``bert-base-uncased``). Load with :func:`load_reference_checkpoint` (strict).
    ``similarity_only``: convert ``sim_vec`` alone (``img_enc`` / ``txt_enc`` may be empty):
    the state holds the ``image_levels`` / ``text_levels`` / ``correspondence`` keys, ``embed_size``
    comes from the level matrices and ``img_dim`` keeps its default; load it with
    :func:`itmkit.checkpoints.load_similarity_part`.
    """
    from itmkit.checkpoints import (
        BERT_POSITION_IDS,
        apply_reference_recipe,
        open_reference_checkpoint,
        reference_dataset,
        reference_max_violation,
        strip_prefix,
    )

    name, checkpoint = open_reference_checkpoint(source)
    parts = checkpoint.get("model")
    if not isinstance(parts, (list, tuple)) or len(parts) != 3 or not all(isinstance(p, Mapping) for p in parts):
        found = type(parts).__name__ if not isinstance(parts, (list, tuple)) else f"a list of {len(parts)} entries"
        raise CheckpointFormatError(name, "model", "a list of 3 state dicts [img_enc, txt_enc, sim_vec]", found)
    img_state, txt_state, sim_state = (strip_prefix(p) for p in parts)
    opt = checkpoint.get("opt")
    state: dict[str, Tensor] = {}
    embed_size, img_dim = 0, ESLConfig.img_dim  # similarity only: embed_size from the level matrices below
    if not similarity_only:
        embed_size, img_dim = _encoder_states(name, img_state, txt_state, state)

    sim_renamed, variant, levels = _similarity_keys(sim_state, name)
    state.update(sim_renamed)
    if "correspondence.level_matrices.1" not in state or levels < 2:
        raise CheckpointFormatError(name, "model[2] (sim_vec)", "level matrices 'sims.calculator_1.masks_<l>.weight'",
                                    f"keys {sorted(sim_state)[:4]}")
    if similarity_only:
        embed_size = int(state["correspondence.level_matrices.0"].shape[0])  # level 0 is [D, D]
    level1 = int(state["correspondence.level_matrices.1"].shape[0])
    kernel_size = embed_size // level1 if level1 else 2
    model = ESLConfig(
        variant=variant, embed_size=embed_size, img_dim=img_dim, kernel_size=kernel_size, levels=levels,
        conv_channels=int(state["image_levels.merge.0.weight"].shape[0]) if variant == "H" else 4,
        attend_padded_regions=True,
    )

    dataset = reference_dataset(opt)
    run_cfg = paper_preset(dataset, variant)
    run_cfg.preset = f"converted (paper-{dataset}-{variant.lower()})"
    run_cfg.model = model
    run_cfg.text.hf_path = None if hf_path is None else str(hf_path)
    train = run_cfg.train
    recipe = {
        "lr": ("learning_rate", float), "epochs": ("num_epochs", int), "batch_size": ("batch_size", int),
        "margin": ("margin", float), "grad_clip": ("grad_clip", float),
        "sum_warmup_epochs": ("vse_mean_warmup_epochs", int),
    }  # fmt: skip
    apply_reference_recipe(train, opt, recipe)
    # the saved flag is the reference's own switch once the warm-up is over (baselines.md §B.5)
    train.max_violation = reference_max_violation(checkpoint, opt)
    return run_cfg, state


def load_reference_checkpoint(
    source: str | Path | Mapping[str, Any], *, hf_path: str | Path | None = None
) -> tuple[ESL, RunConfig]:
    """Convert (:func:`convert_checkpoint`), build and load **strictly** (any missing, unexpected or
    misshaped key raises :class:`itmkit.checkpoints.CheckpointMismatchError` naming it). The
    model comes back in eval mode with its :class:`RunConfig`."""
    from itmkit.checkpoints import build_converted

    return build_converted(convert_checkpoint, build, source, hf_path=hf_path)


METHOD = MethodSpec(
    name="esl",
    config_cls=ESLConfig,
    build=build,
    presets=PRESETS,
    spec="esl.md",
    description="ESL (TCSVT 2024): 9-level measure-unit hierarchy of region/word features, learned per-level "
    "bilinear forms and contribution degrees, two-way attention pooling (ESL-H heuristic / ESL-A adaptive)",
    convert_checkpoint=convert_checkpoint,
    variants=VARIANTS,
)

__all__ = [
    "ESL",
    "ESLConfig",
    "METHOD",
    "CheckpointFormatError",
    "EnhancedCorrespondence",
    "MultiLevelAggregation",
    "adaptive_selection",
    "attention_pooling_weights",
    "build",
    "convert_checkpoint",
    "level_dims",
    "level_slices",
    "load_reference_checkpoint",
    "paper_preset",
    "pooled_score",
]
