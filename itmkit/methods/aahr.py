"""AAHR: Ambiguity-Aware and High-Order Relation learning (Chen et al., KBS 2025). Spec: ``aahr.md``.

HREM (:mod:`itmkit.methods.hrem`) extended with four things; retrieval stays one dot product of two
embeddings, everything graph/prototype/momentum related is training-only:

1. **Global guidance** (§3.2, kept at test time): a frozen global embedding per image and caption
   (OpenCLIP ViT-B/32 in the paper; precomputed arrays, :mod:`itmkit.data.global_features`) is
   projected (``fc_clip``), guides an attention pooling over the Transformer-contextualised
   fragments (:class:`~itmkit.models.aahr_modules.GuidedAttentionPooling`, in place of HREM's mean)
   and is fused with the pooled embedding by a sigmoid gate (:class:`GatedFusion`).
2. **Clustering prototypes** (§3.5): SwAV-style swapped prediction between the fused image and
   caption embeddings over learnable prototypes with Sinkhorn soft assignments.
3. **Richer instance graph** (§3.6): intra-modal GCNs and a joint GCN over HREM's batch graph
   before its masked Transformer (:class:`AAHRRelations`, extending HREM's ``InstanceRelations``).
4. **MoCo** (§3.7, §5.2): momentum copies of both encoders and queues of their keys as extra negatives.

How the global features reach the model through the kit's ordinary loaders
(:meth:`AAHR.prepare_data`, itmkit design): each image's global vector is appended to every one of
its region rows (region dropping keeps at least one row), and each caption's token ids are
prefixed by one *key* id that indexes the caption's global vector in a table the model holds
(:class:`GlobalKeyPipeline`). The encoders split both off again. ``clip_branch='none'`` needs
neither (§8: no fusion, the pooling query is the max-2 pooled vector).

The trainer calls :meth:`AAHR.training_loss` (the step order of §5.2 happens inside it: losses,
momentum update, keys, InfoNCE, enqueue; the trainer then steps the optimiser).

Public: :class:`AAHRConfig`, :class:`AAHR`, :class:`AAHRRelations`, :class:`AAHRLoss`,
:class:`GlobalKeyPipeline`, :class:`SetViews`, :func:`set_views`, :func:`convert_checkpoint`,
:func:`load_reference_checkpoint`, ``METHOD`` (presets ``smoke``, ``course``, ``paper-f30k``,
``paper-coco``, ``paper`` = ``paper-f30k``; variants ``no-clip``, ``no-prototypes``, ``no-momentum``,
``no-gcn``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig
from itmkit.config_checks import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range
from itmkit.data.embedded import embedded_feature_dim
from itmkit.data.global_features import GlobalSource, global_features_for
from itmkit.data.precomp import PrecompSplit, RegionColumns
from itmkit.encoded import Encoded
from itmkit.losses import TRIPLET_CUTOFF, draw_negatives
from itmkit.methods.hrem import (CheckpointFormatError, Fragments, HREMConfig, InstanceRelations, _xavier_linears, matching_loss,
                                 separate_param_group)
from itmkit.methods.registry import MethodSpec
from itmkit.models.aahr_modules import (
    GatedFusion,
    GCNLayer,
    GlobalProjection,
    GuidedAttentionPooling,
    MomentumQueue,
    Prototypes,
    info_nce,
    momentum_update,
    sinkhorn,
)
from itmkit.models.base import MatchingModel
from itmkit.models.fragment_pooling import FragmentAggregation, maxk_pool
from itmkit.models.functional import l2norm
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.instance_graph import BatchGraph, build_batch_graph, graph_attention
from itmkit.models.text_encoders import build_text_encoder

GLOBAL_COLUMNS = "aahr-global"  # RegionColumns name of the appended image global features
# Encoded.extras keys of training-mode encodings
FRAGMENTS, FRAGMENT_LENGTHS, POOLED, PRE_FUSION, GATE = "fragments", "fragment_lengths", "pooled", "pre_fusion", "gate"


@dataclass
class AAHRConfig(HREMConfig):
    """AAHR options on top of :class:`~itmkit.methods.hrem.HREMConfig` (aahr.md §3, §5.7; reference
    names in brackets). HREM's fields keep their meaning (``warmup_steps`` = graph start,
    ``mask_weight``, ``triplet_cutoff``, ...).

    Global branch (§3.2, §8):
        clip_branch: ``"clip"`` (global guidance + gated fusion) or ``"none"`` (pooling query = the
            max-2 pooled vector, no fusion; itmkit, §8).
        global_source: ``"precomp"`` (``{split}_clip_{img,cap}.npy`` beside the features) or
            ``"embedded"`` (itmkit's frozen stand-ins for the embedded sets).
        global_img_dim / global_txt_dim: sizes of the global features (512 for CLIP ViT-B/32).
        mha_heads: heads of the guided pooling (8, hard-coded in the reference).
        pool_mask_padding: False = reference (the pooling softmax includes padded positions, §8.3,
            so caption embeddings depend on the batch's padding); True = itmkit's recommended fix.

    Prototypes (§3.5): ``prototypes`` on/off; ``n_prototypes`` [``nmb_prototypes`` 384 f30k,
    768 COCO]; ``sinkhorn_epsilon`` [0.1]; ``sinkhorn_iterations`` [3]; ``swav_temperature`` [0.1];
    ``swav_weight`` (0.2, hard-coded); ``freeze_prototypes_steps``: the loss is zero while
    ``step <= freeze_prototypes_steps`` [``freeze_prototypes_niters`` 2200].

    Graph (§3.6): ``gcn`` (intra-modal + joint GCNs before the masked Transformer; off = HREM's
    graph); ``gcn_dropout`` (0.6); ``inter_relevance_mlp``: False = reference (AAHR overwrites HREM's
    learned inter-modal relevance by the plain mean scores, §8.2), True = HREM's MLPs.

    Momentum (§3.7, §5.1): ``momentum`` on/off [``use_moco``]; ``moco_queue`` [``moco_M`` 2048];
    ``moco_momentum`` [``moco_r`` 0.999]; ``moco_temperature`` (0.07); ``key_train_mode``: True =
    reference (the key encoders stay in train mode: dropout, BatchNorm batch statistics, §8.8).
    """

    clip_branch: Literal["clip", "none"] = "clip"
    global_source: GlobalSource = "precomp"
    global_img_dim: PositiveInt = 512
    global_txt_dim: PositiveInt = 512
    mha_heads: PositiveInt = 8
    pool_mask_padding: bool = False
    prototypes: bool = True
    n_prototypes: PositiveInt = 384
    sinkhorn_epsilon: PositiveFloat = 0.1
    sinkhorn_iterations: PositiveInt = 3
    swav_temperature: PositiveFloat = 0.1
    swav_weight: NonNegativeFloat = 0.2
    freeze_prototypes_steps: NonNegativeInt = 2200
    gcn: bool = True
    gcn_dropout: Fraction = 0.6
    inter_relevance_mlp: bool = False
    momentum: bool = True
    moco_queue: PositiveInt = 2048
    moco_momentum: Annotated[float, Range(0, 1)] = 0.999
    moco_temperature: PositiveFloat = 0.07
    key_train_mode: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip_branch not in ("clip", "none"):
            raise ValueError(f"AAHRConfig.clip_branch: expected 'clip' or 'none', found {self.clip_branch!r}")
        if self.global_source not in ("precomp", "embedded"):
            raise ValueError(f"AAHRConfig.global_source: expected 'precomp' or 'embedded', found {self.global_source!r}")


# ----------------------------------------------------------------------------- one modality's encoder


@dataclass
class SideOutput:
    """One modality's encoding (aahr.md §3.2 / §3.3).

    Attributes:
        features: ``[B, T, d]`` fragments before pooling (``X`` / ``W``); lengths ``[B]``.
        maxk: ``[B, d]`` ``r``; context: ``[B, d]`` ``z`` (guided pooling); pooled: ``[B, d]``
            ``e = β r + (1 − β) z``; pre_fusion: ``[B, d]`` ``ẽ = l2n(e)`` (graph nodes, MoCo queries);
            fused: ``[B, d]`` ``f`` (the retrieval embedding; ``= ẽ`` without the global branch);
            gate: ``[B, d]`` ``g`` or None; guide: ``[B, d]`` projected global ``c`` or None.
    """

    features: Tensor
    lengths: Tensor
    maxk: Tensor
    context: Tensor
    pooled: Tensor
    pre_fusion: Tensor
    fused: Tensor
    gate: Tensor | None
    guide: Tensor | None

    def fragments(self) -> Fragments:
        """The HREM view the instance graph reads (embedding = the pre-fusion ``ẽ``, §8.1)."""
        return Fragments(self.features.float(), self.lengths, self.pooled.float(), self.pre_fusion.float(),
                         self.maxk, self.context)  # fmt: skip


class ModalityEncoder(nn.Module):
    """Fragments -> ``f`` for one modality: ``fragments`` (region MLP / text encoder), ``pool``
    (HREM's Transformer, reference ``aggr``), ``attention`` (``mha_pool``), and with the global
    branch ``projection`` (``fc_clip``) and ``gate`` (``gated_fusion``)."""

    def __init__(self, fragments: nn.Module, cfg: AAHRConfig, global_dim: int, normalise: bool) -> None:
        super().__init__()
        d = cfg.embed_size
        self.fragments = fragments
        self.pool = FragmentAggregation(d, cfg.nhead, cfg.dropout, cfg.residual_weight, cfg.maxk, cfg.maxk_carry_over)
        self.attention = GuidedAttentionPooling(d, cfg.mha_heads, cfg.pool_mask_padding)
        self.projection = GlobalProjection(global_dim, d) if cfg.clip_branch == "clip" else None
        self.gate = GatedFusion(d, normalise) if cfg.clip_branch == "clip" else None
        self.normalise = normalise

    def forward(self, inputs: Tensor, lengths: Tensor, global_features: Tensor | None) -> SideOutput:
        lengths = lengths.to(inputs.device).long()
        x = self.fragments(inputs, lengths)
        r = maxk_pool(x, lengths, self.pool.k, self.pool.carry_over)
        states = self.pool.contextualise(x, lengths)
        guide = self.projection(global_features) if self.projection is not None else None
        z = self.attention(guide if guide is not None else r, states, lengths)
        e = self.pool.residual_weight * r + (1.0 - self.pool.residual_weight) * z
        e_hat = l2norm(e, dim=-1) if self.normalise else e
        if self.gate is None:
            return SideOutput(x, lengths, r, z, e, e_hat, e_hat, None, None)
        fused, gate = self.gate(e, guide)
        return SideOutput(x, lengths, r, z, e, e_hat, fused, gate, guide)


# ----------------------------------------------------------------------------- instance graph with GCNs


class AAHRRelations(InstanceRelations):
    """HREM's instance-level modules plus AAHR's GCNs (aahr.md §3.6): ``gcn_img`` over ``R_ii``,
    ``gcn_txt`` over ``R_tt``, ``gcn_joint`` over the whole relevance; ``Y = normalize(h) + X0``
    feeds HREM's masked Transformer. The inter-modal relevance is the plain mean matching score
    unless ``inter_relevance_mlp`` (then also HREM's KL term has a gradient)."""

    def __init__(self, cfg: AAHRConfig) -> None:
        super().__init__(cfg)
        d = cfg.embed_size
        self.gcn_img = GCNLayer(d, cfg.gcn_dropout) if cfg.gcn else None
        self.gcn_txt = GCNLayer(d, cfg.gcn_dropout) if cfg.gcn else None
        self.gcn_joint = GCNLayer(d, cfg.gcn_dropout) if cfg.gcn else None

    def build_graph(self, images: Fragments, captions: Fragments) -> BatchGraph:
        cfg = self.cfg
        return build_batch_graph(
            images.embedding, captions.embedding, images.features, captions.features, captions.lengths,
            threshold=cfg.threshold, topk=cfg.topk, sigma=cfg.sigma,
            inter_relevance=self.inter if cfg.inter_relevance_mlp else None,
        )  # fmt: skip

    def propagate(self, nodes: Tensor, graph: BatchGraph) -> Tensor:
        if self.gcn_joint is not None:
            b = graph.n_images
            h_img = self.gcn_img(nodes[:b], graph.block("i2i")[1])
            h_txt = self.gcn_txt(nodes[b:], graph.block("t2t")[1])
            h = self.gcn_joint(torch.cat([h_img, h_txt], dim=0), graph.relevance)
            nodes = F.normalize(h, dim=-1) + nodes
        return graph_attention(self.graph, nodes, graph.attention_mask(self.cfg.mask_weight))


# ----------------------------------------------------------------------------- global features through the loaders


class GlobalKeyPipeline:
    """A caption pipeline that prefixes every caption's ids with one *key*: the row of its global
    vector in the model's table (:meth:`AAHR.prepare_data`). The key is outside the base
    pipeline's augmentation, so it is never masked, replaced or dropped."""

    def __init__(self, base: Any, keys: Mapping[str, int]) -> None:
        if isinstance(base, GlobalKeyPipeline):
            base = base.base
        self.base, self.keys = base, dict(keys)
        self.vocab_size, self.pad_id = base.vocab_size, base.pad_id

    def key(self, caption: str) -> int:
        try:
            return self.keys[caption]
        except KeyError:
            raise KeyError(f"GlobalKeyPipeline: no global feature for the caption {caption!r} (not in a prepared split)") from None

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        return [self.key(caption)] + list(self.base.encode(caption, rng))

    def tokens(self, caption: str) -> list[str]:
        return self.base.tokens(caption)

    def __repr__(self) -> str:
        return f"GlobalKeyPipeline({self.base!r}, {len(self.keys)} captions)"


# ----------------------------------------------------------------------------- losses


@dataclass
class AAHRLoss:
    """The parts of one training step's loss (aahr.md §5.1), detached.

    ``total = base + gnn + swav_weight · swav + reg_loss_weight · reg + moco``; each flag says
    whether its part was active this step (schedule: graph from ``warmup_steps``, prototypes after
    ``freeze_prototypes_steps``, MoCo once the queue is full).
    """

    total: Tensor
    base: Tensor
    gnn: Tensor
    reg: Tensor
    swav: Tensor
    moco: Tensor
    graph_active: bool
    swav_active: bool
    moco_active: bool
    zero_directions: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"loss": float(self.total), "base": float(self.base), "gnn": float(self.gnn), "reg": float(self.reg),
                "swav": float(self.swav), "moco": float(self.moco), "graph_active": float(self.graph_active),
                "swav_active": float(self.swav_active), "moco_active": float(self.moco_active),
                "zero_directions": float(self.zero_directions)}  # fmt: skip


# ----------------------------------------------------------------------------- the model


class AAHR(MatchingModel):
    """AAHR (``pairwise = False``, aahr.md §3).

    Submodules (state-dict prefixes): ``image`` / ``text`` (:class:`ModalityEncoder`: the
    reference's ``img_enc`` / ``txt_enc``), ``relations`` (:class:`AAHRRelations`), ``prototypes``
    (:class:`~itmkit.models.aahr_modules.Prototypes`), ``key_image`` / ``key_text`` (momentum copies,
    no gradient) and ``image_queue`` / ``text_queue``. Only ``image`` and ``text`` are used at test time.

    Test-time embeddings depend on the item alone when ``pool_mask_padding`` is True (the course
    presets); the reference setting lets caption padding into the pooling (§4, §8.3), and then
    ``batch_dependent_captions`` is True so the evaluator encodes captions in file order.
    """

    pairwise = False
    method_name = "aahr"

    def __init__(self, cfg: AAHRConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.embed_size
        regions = PrecompRegionEncoder(cfg.img_dim, d, mlp_residual=True, zero_padding=False)
        _xavier_linears(regions)
        words = build_text_encoder(text_cfg, d, vocab_size, **({"zero_padding": False} if text_cfg.kind == "hf" else {}))
        self.image = ModalityEncoder(regions, cfg, cfg.global_img_dim, not cfg.no_imgnorm)
        self.text = ModalityEncoder(words, cfg, cfg.global_txt_dim, not cfg.no_txtnorm)
        self.relations = AAHRRelations(cfg) if cfg.instance_relations else None
        self.prototypes = (Prototypes(cfg.n_prototypes, d, cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations,
                                      cfg.swav_temperature) if cfg.prototypes else None)  # fmt: skip
        self.key_image = self.key_text = self.image_queue = self.text_queue = None
        if cfg.momentum:
            # deep copies made at construction (§3.7): equal to the query encoders at step 0
            self.key_image, self.key_text = copy.deepcopy(self.image), copy.deepcopy(self.text)
            for p in [*self.key_image.parameters(), *self.key_text.parameters()]:
                p.requires_grad_(False)
            self.image_queue, self.text_queue = MomentumQueue(d, cfg.moco_queue), MomentumQueue(d, cfg.moco_queue)
        self.sampler: Callable[[Tensor], Tensor] = draw_negatives  # tests swap in argmax_negatives
        self.last_loss: AAHRLoss | None = None
        # caption global vectors of the prepared splits (runtime state, not in the state dict)
        self._caption_globals: Tensor = torch.zeros(0, cfg.global_txt_dim)
        self._caption_tables: dict[tuple, int] = {}

    @property
    def batch_dependent_captions(self) -> bool:
        return not self.config.pool_mask_padding

    @property
    def uses_global(self) -> bool:
        return self.config.clip_branch == "clip"

    # ------------------------------------------------------------------ data
    def prepare_data(self, split: PrecompSplit, pipeline: Any) -> tuple[PrecompSplit, Any]:
        """Attach the split's global features (see the module doc); unchanged without the global
        branch. Idempotent. Missing arrays raise a :class:`~itmkit.data.errors.DataFormatError`
        listing the files to supply."""
        if not self.uses_global:
            return split, pipeline
        if isinstance(split.images, RegionColumns) and split.images.name == GLOBAL_COLUMNS and isinstance(pipeline, GlobalKeyPipeline):
            return split, pipeline
        cfg = self.config
        found = global_features_for(split, cfg.global_source)
        for what, array, dim in (("image", found.images, cfg.global_img_dim), ("caption", found.captions, cfg.global_txt_dim)):
            if array.shape[1] != dim:
                raise ValueError(f"AAHR global {what} features in {found.folder}: expected {dim} columns "
                                 f"(model.global_{what[:3] if what == 'image' else 'txt'}_dim), found {array.shape[1]}")  # fmt: skip
        n_rows, n_regions = split.images.shape[0], split.images.shape[1]
        per_row = found.images[np.arange(n_rows) // split.image_step]
        extra = np.broadcast_to(per_row[:, None, :], (n_rows, n_regions, per_row.shape[1]))
        key = (str(Path(split.root).resolve()), split.split, split.image_range, str(found.folder))
        if key not in self._caption_tables:
            self._caption_tables[key] = self._caption_globals.shape[0]
            self._caption_globals = torch.cat([self._caption_globals, torch.from_numpy(found.captions)])
        offset = self._caption_tables[key]
        keys: dict[str, int] = {}
        for row, caption in enumerate(split.captions):
            keys.setdefault(caption, offset + row)
        wrapped = None if pipeline is None else GlobalKeyPipeline(pipeline, keys)  # None: images only
        return split.with_region_columns(extra, GLOBAL_COLUMNS), wrapped

    def _image_inputs(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.uses_global:
            return images, None
        expected = self.config.img_dim + self.config.global_img_dim
        if images.dim() != 3 or images.shape[2] != expected:
            raise ValueError(
                f"AAHR images: expected [B, K, {self.config.img_dim} + {self.config.global_img_dim}] (region features, then "
                f"the image's global feature; AAHR.prepare_data appends it, as the trainer and encode_split do), "
                f"found shape {tuple(images.shape)}"
            )
        return images[..., : self.config.img_dim], images[:, 0, self.config.img_dim :].float()

    def _caption_inputs(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        if not self.uses_global:
            return tokens, lengths, None
        keys = tokens[:, 0].long()
        n = self._caption_globals.shape[0]
        if n == 0 or bool((keys < 0).any() | (keys >= n).any()):
            raise ValueError(
                f"AAHR captions: expected each row to start with a global-feature key in 0..{n - 1} (GlobalKeyPipeline; "
                f"AAHR.prepare_data sets it up, as the trainer and encode_split do), found first ids {keys[:8].tolist()}"
            )
        table = self._caption_globals.to(tokens.device)
        return tokens[:, 1:], lengths.to(tokens.device) - 1, table[keys]

    def encode_image_side(self, images: Tensor, lengths: Tensor, encoder: ModalityEncoder | None = None) -> SideOutput:
        """``images [B, K, img_dim (+ global)]`` -> :class:`SideOutput` (``encoder``: a momentum copy)."""
        regions, global_features = self._image_inputs(images)
        return (encoder or self.image)(regions, lengths, global_features)

    def encode_caption_side(self, tokens: Tensor, lengths: Tensor, encoder: ModalityEncoder | None = None) -> SideOutput:
        """``tokens [B, 1 + L]`` (key + ids), ``lengths [B]`` -> :class:`SideOutput`."""
        ids, ids_lengths, global_features = self._caption_inputs(tokens, lengths)
        return (encoder or self.text)(ids, ids_lengths, global_features)

    def _encoded(self, side: SideOutput) -> Encoded:
        if not self.training:
            return Encoded(side.fused)
        extras = {FRAGMENTS: side.features, FRAGMENT_LENGTHS: side.lengths, POOLED: side.pooled, PRE_FUSION: side.pre_fusion}
        if side.gate is not None:
            extras[GATE] = side.gate
        return Encoded(side.fused, extras=extras)

    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """-> ``Encoded(f [B, d])``; training mode adds ``fragments``, ``fragment_lengths``,
        ``pooled``, ``pre_fusion`` (and ``gate``) for :meth:`training_loss`."""
        return self._encoded(self.encode_image_side(images, lengths))

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        return self._encoded(self.encode_caption_side(tokens, lengths))

    # ------------------------------------------------------------------ training
    @staticmethod
    def _fragments(encoded: Encoded, side: str) -> Fragments:
        missing = [k for k in (FRAGMENTS, FRAGMENT_LENGTHS, POOLED, PRE_FUSION) if k not in encoded.extras]
        if missing:
            raise ValueError(f"AAHR.training_loss {side}: expected Encoded.extras {missing} (encode in training mode, "
                             f"model.train()), found extras {sorted(encoded.extras)}")  # fmt: skip
        x = encoded.extras
        return Fragments(x[FRAGMENTS].float(), x[FRAGMENT_LENGTHS], x[POOLED].float(), x[PRE_FUSION].float())

    @torch.no_grad()
    def momentum_keys(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(k_img, k_txt)`` ``[B, d]``: the momentum encoders' fused outputs on the same (augmented)
        batch (§5.2 step 4), in train mode unless ``key_train_mode`` is False."""
        self.key_image.train(self.config.key_train_mode)
        self.key_text.train(self.config.key_train_mode)
        k_img = self.encode_image_side(batch.images, batch.img_lengths, self.key_image).fused
        k_txt = self.encode_caption_side(batch.tokens, batch.cap_lengths, self.key_text).fused
        return k_img.float(), k_txt.float()

    def training_loss(self, images: Encoded, captions: Encoded, batch: Any, *, step: int, epoch: int = 0,
                      margin: float = 0.2, max_violation: bool = True) -> Tensor:  # fmt: skip
        """The trainer's hook: the loss of §5.1 in the order of §5.2.

        1. ``base = Trip(f_img, f_txt)``; ``swav`` over the fused embeddings (zero while
        ``step <= freeze_prototypes_steps``); ``gnn`` + ``reg`` from the graph over the pre-fusion
        ``ẽ`` (from ``step >= warmup_steps``); 2. momentum update of the key encoders; 3. keys on the
        same batch; 4. InfoNCE of the pre-fusion ``e`` against the other modality's key and queue
        (once the queue is full); 5. enqueue. The trainer then back-propagates and steps.
        ``step`` = optimisation steps taken before this one. Parts kept in ``self.last_loss``.
        """
        del epoch
        cfg = self.config
        img, txt = self._fragments(images, "images"), self._fragments(captions, "captions")
        f_img, f_txt = images.feats.float(), captions.feats.float()
        ids = batch.image_index
        base, zero = matching_loss(cfg.base_loss, f_img, f_txt, ids, cfg, margin, max_violation, self.sampler)
        nothing = base * 0.0
        total, gnn, reg, swav, moco = base, nothing, nothing, nothing, nothing
        swav_active = graph_active = moco_active = False
        if self.prototypes is not None:
            swav = self.prototypes(f_img, f_txt)[0]
            swav_active = step > cfg.freeze_prototypes_steps
            total = total + (cfg.swav_weight * swav if swav_active else 0.0 * swav)
        if self.relations is not None and step >= cfg.warmup_steps:
            gnn, reg, skipped, _ = self.relations.losses(img, txt, ids, margin, max_violation, self.sampler)
            total, zero, graph_active = total + gnn + cfg.reg_loss_weight * reg, zero + skipped, True
        if self.key_image is not None:
            momentum_update(self.key_image, self.image, cfg.moco_momentum)
            momentum_update(self.key_text, self.text, cfg.moco_momentum)
            k_img, k_txt = self.momentum_keys(batch)
            moco_active = self.image_queue.full and self.text_queue.full
            if moco_active:
                moco = (info_nce(img.pooled, k_txt, self.text_queue.negatives(), cfg.moco_temperature)
                        + info_nce(txt.pooled, k_img, self.image_queue.negatives(), cfg.moco_temperature))  # fmt: skip
                total = total + moco
            self.image_queue.enqueue(k_img)
            self.text_queue.enqueue(k_txt)
        self.last_loss = AAHRLoss(total.detach(), base.detach(), gnn.detach(), reg.detach(), swav.detach(), moco.detach(),
                                  graph_active, swav_active, moco_active, zero)  # fmt: skip
        return total

    def param_groups(self, lr: float, backbone_lr_scale: float = 0.1) -> list[dict[str, Any]]:
        """The base groups, with the criterion (graph, GCNs, prototypes) at ``lr · graph_lr_factor`` (§5.3)."""
        groups = super().param_groups(lr, backbone_lr_scale)
        criterion = [m for m in (self.relations, self.prototypes) if m is not None]
        if not criterion or self.config.graph_lr_factor == 1.0:
            return groups
        params = [p for m in criterion for p in m.parameters()]
        return separate_param_group(groups, params, lr * self.config.graph_lr_factor, "criterion")


def build(run_cfg: RunConfig, vocab_size: int | None) -> AAHR:
    """``MethodSpec.build``: the model of ``run_cfg`` (parameters drawn from torch's current RNG)."""
    cfg = run_cfg.model
    if isinstance(cfg, dict):
        cfg = AAHRConfig(**cfg)
    return AAHR(cfg, run_cfg.text, vocab_size)


# ----------------------------------------------------------------------------- a whole split, as data (notebooks)


@dataclass
class SetViews:
    """What a trained AAHR computes on a split (eval mode), for notebooks and figures.

    Attributes:
        images / captions: ``[n_img, d]`` / ``[n_cap, d]`` the fused retrieval embeddings.
        image_gate / caption_gate: ``[n_img, d]`` / ``[n_cap, d]`` the fusion gate ``g`` (share of
            the pooled local embedding; ``1 − g`` is the global feature's share), or None.
        image_scores / caption_scores: ``[n, K]`` dot products with the (normalised) prototypes, or None.
        image_assign / caption_assign: ``[n, K]`` Sinkhorn soft assignments over the whole split
            (rows sum to 1; the training loss computes them per batch), or None.
        caption_image: ``[n_cap]`` the image of each caption.
    """

    images: np.ndarray
    captions: np.ndarray
    image_gate: np.ndarray | None
    caption_gate: np.ndarray | None
    image_scores: np.ndarray | None
    caption_scores: np.ndarray | None
    image_assign: np.ndarray | None
    caption_assign: np.ndarray | None
    caption_image: np.ndarray


@torch.no_grad()
def set_views(model: AAHR, split: PrecompSplit, pipeline: Any, batch_size: int = 128) -> SetViews:
    """Encode ``split`` in eval mode (the model's mode is restored) -> :class:`SetViews`."""
    from itmkit.data.loaders import image_batches, pad_token_lists

    split, pipeline = model.prepare_data(split, pipeline)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        img_sides = [model.encode_image_side(f.to(device), n.to(device)) for f, n in image_batches(split, batch_size)]
        ids = [pipeline.encode(c) for c in split.captions]
        cap_sides = []
        for start in range(0, len(ids), batch_size):
            tokens, lengths = pad_token_lists(ids[start : start + batch_size], pipeline.pad_id)
            cap_sides.append(model.encode_caption_side(tokens.to(device), lengths.to(device)))
    finally:
        model.train(was_training)

    def stack(sides: list[SideOutput], name: str) -> np.ndarray | None:
        parts = [getattr(s, name) for s in sides]
        return None if parts[0] is None else torch.cat(parts).float().cpu().numpy()

    images, captions = stack(img_sides, "fused"), stack(cap_sides, "fused")
    scores = assign = (None, None)
    if model.prototypes is not None:
        model.prototypes.renormalise()
        p = model.prototypes.prototypes.detach().float().cpu().numpy()
        scores = (images @ p.T, captions @ p.T)
        cfg = model.config
        assign = tuple(sinkhorn(torch.from_numpy(s), cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations).numpy() for s in scores)
    return SetViews(images, captions, stack(img_sides, "gate"), stack(cap_sides, "gate"), scores[0], scores[1],
                    assign[0], assign[1], np.arange(len(split.captions)) // 5)  # fmt: skip


def _entropy(q: np.ndarray) -> np.ndarray:
    return -(q * np.log(np.clip(q, 1e-12, None))).sum(axis=1)


def prototype_table(views: SetViews, captions: list[str]) -> pd.DataFrame:
    """One row per prototype that holds any item (by each item's largest soft assignment):
    ``prototype``, ``images``, ``captions`` (counts), ``captions_with_own_image`` (share of its
    captions whose image sits in the same prototype), ``example`` (its first caption)."""
    if views.image_assign is None:
        raise ValueError("prototype_table: the model has no prototypes (model.prototypes = False)")
    img_top, cap_top = views.image_assign.argmax(1), views.caption_assign.argmax(1)
    same = img_top[views.caption_image] == cap_top
    k = views.image_assign.shape[1]
    first = {int(p): captions[int(np.nonzero(cap_top == p)[0][0])] for p in np.unique(cap_top)}
    table = pd.DataFrame({
        "prototype": np.arange(k),
        "images": np.bincount(img_top, minlength=k),
        "captions": np.bincount(cap_top, minlength=k),
        "captions_with_own_image": [float(same[cap_top == p].mean()) if (cap_top == p).any() else np.nan for p in range(k)],
        "example": [first.get(p, "") for p in range(k)],
    })  # fmt: skip
    return table[(table["images"] > 0) | (table["captions"] > 0)].reset_index(drop=True)


def soft_positive_table(views: SetViews, captions: list[str], n: int = 6) -> pd.DataFrame:
    """The ``n`` captions with the most spread-out soft assignment (highest entropy of ``Q``), the
    ones whose "positive" is least one cluster: ``caption``, ``entropy`` (nats; ``log K`` = uniform),
    ``top``/``top_weight``, ``second``/``second_weight`` (prototypes and their ``q``), ``own_image_top``
    (the caption's image's prototype), ``images_sharing_top`` (other images in the caption's top
    prototype: the soft positives the swapped prediction pulls it towards)."""
    if views.caption_assign is None:
        raise ValueError("soft_positive_table: the model has no prototypes (model.prototypes = False)")
    q = views.caption_assign
    order = np.argsort(-q, axis=1)
    entropy = _entropy(q)
    img_top = views.image_assign.argmax(1)
    chosen = np.argsort(-entropy, kind="stable")[:n]
    rows = np.arange(len(q))
    table = pd.DataFrame({
        "caption": [captions[c] for c in chosen], "entropy": entropy[chosen],
        "top": order[chosen, 0], "top_weight": q[rows, order[:, 0]][chosen],
        "second": order[chosen, 1], "second_weight": q[rows, order[:, 1]][chosen],
        "own_image_top": img_top[views.caption_image[chosen]],
        "images_sharing_top": [int((img_top == order[c, 0]).sum() - (img_top[views.caption_image[c]] == order[c, 0]))
                               for c in chosen],
    })  # fmt: skip
    return table


def gate_table(views: SetViews) -> pd.DataFrame:
    """Per modality: the fusion gate ``g`` (share of the pooled local embedding; ``1 − g`` is the
    global feature's) over items and dimensions: ``mean``, ``std``, ``min``, ``max``, and the
    share of dimensions where the local side dominates (``g > 0.5``)."""
    if views.image_gate is None:
        raise ValueError("gate_table: the model has no global branch (model.clip_branch = 'none')")
    rows = []
    for modality, gate in (("image", views.image_gate), ("caption", views.caption_gate)):
        rows.append({"modality": modality, "mean": gate.mean(), "std": gate.std(), "min": gate.min(),
                     "max": gate.max(), "local_dominates": float((gate > 0.5).mean())})  # fmt: skip
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- presets


def paper_preset(dataset: Literal["f30k", "coco"] = "f30k") -> RunConfig:
    """The released recipe (§5.3, §5.7, ``run_{f30k,coco}.sh``): BERT (``text.hf_path``: None = the
    offline MiniLM; set a local ``bert-base-uncased`` to reproduce), d = 1024, CLIP features beside
    the precomp files, 40 epochs, batch 128 / 256, AdamW lr 5e-4 wd 1e-4, BERT at 0.1 lr, x0.1 at
    epochs 15 and 25, clip 2.0, graph from iteration 8000, prototypes 384 / 768 after 2200
    iterations, MoCo queue 2048 (m 0.999), mask_weight 1.0 / 1.5, cutoff 1.7 / 1.9, reference
    quirks on (unmasked pooling padding, plain-mean inter relevance, train-mode key encoders).
    Model selection on ``dev`` (one reference version selects on test, §5.6)."""
    if dataset not in ("f30k", "coco"):
        raise KeyError(f"paper preset: dataset must be f30k or coco, found {dataset!r}")
    coco = dataset == "coco"
    return RunConfig(
        method="aahr",
        model=AAHRConfig(embed_size=1024, img_dim=2048, mask_weight=1.5 if coco else 1.0,
                         triplet_cutoff=TRIPLET_CUTOFF[dataset], n_prototypes=768 if coco else 384),  # fmt: skip
        text=TextConfig(kind="hf", hf_path=None),
        data=DataConfig(data_dir=f"data/{dataset}_precomp", test_split="testall" if coco else "test",
                        dev_max_captions=5000, region_drop=0.2, caption_augment=True),  # fmt: skip
        train=TrainConfig(epochs=40, batch_size=256 if coco else 128, lr=5e-4, lr_decay_epochs=(15, 25),
                          lr_decay_factor=0.1, optimizer="adamw", weight_decay=1e-4, backbone_lr_scale=0.1,
                          grad_clip=2.0, margin=0.2, max_violation=True, sum_warmup_epochs=1),  # fmt: skip
    )


def course_preset() -> RunConfig:
    """The embedded ``course`` set on a 2-core CPU (aahr.md §9, itmkit): HREM's course recipe
    (BiGRU word_dim 64, d = 128, 4 heads, batch 64, lr 2e-3, x0.1 at epoch 6, graph from step 94,
    topk 4) with 2 guided-pooling heads, itmkit's embedded global features (whole-image CNN RoI
    feature, MiniLM sentence embedding), padding masked in the pooling, 16 prototypes after 40
    steps, a MoCo queue of 256 with m = 0.99. 8 epochs."""
    return RunConfig(
        method="aahr",
        model=AAHRConfig(embed_size=128, img_dim=embedded_feature_dim("course"), nhead=4, warmup_steps=94, topk=4,
                         global_source="embedded", global_img_dim=embedded_feature_dim("course"), global_txt_dim=384,
                         mha_heads=2, pool_mask_padding=True, n_prototypes=16, freeze_prototypes_steps=40,
                         moco_queue=256, moco_momentum=0.99),  # fmt: skip
        text=TextConfig(kind="bigru", word_dim=64),
        data=DataConfig(embedded_preset="course", region_drop=0.2, caption_augment=True),
        train=TrainConfig(epochs=8, batch_size=64, lr=2e-3, lr_decay_epochs=(6,), optimizer="adamw", weight_decay=1e-4,
                          grad_clip=2.0, max_violation=True, sum_warmup_epochs=1, log_every_steps=10),  # fmt: skip
    )


def smoke_preset() -> RunConfig:
    """Every code path (graph from step 4, prototypes after step 2, MoCo once 64 keys are queued)
    on the embedded ``tiny`` set in seconds."""
    return RunConfig(
        method="aahr",
        model=AAHRConfig(embed_size=32, img_dim=embedded_feature_dim("tiny"), nhead=4, warmup_steps=4, topk=3,
                         global_source="embedded", global_img_dim=embedded_feature_dim("tiny"), global_txt_dim=384,
                         mha_heads=2, pool_mask_padding=True, n_prototypes=8, freeze_prototypes_steps=2,
                         moco_queue=64, moco_momentum=0.99),  # fmt: skip
        text=TextConfig(kind="bigru", word_dim=16),
        data=DataConfig(embedded_preset="tiny"),
        train=TrainConfig(epochs=2, batch_size=32, lr=5e-4, lr_decay_epochs=(1,), weight_decay=1e-4,
                          sum_warmup_epochs=1, log_every_steps=5),  # fmt: skip
    )


PRESETS = {
    "smoke": smoke_preset,
    "course": course_preset,
    "paper": paper_preset,
    "paper-f30k": lambda: paper_preset("f30k"),
    "paper-coco": lambda: paper_preset("coco"),
}

VARIANTS = {
    # the ablations of notebook 11: one part off at a time
    "no-clip": {"model.clip_branch": "none"},
    "no-prototypes": {"model.prototypes": False},
    "no-momentum": {"model.momentum": False},
    "no-gcn": {"model.gcn": False},
}


# ----------------------------------------------------------------------------- checkpoint import (§7)

_SIDE_RULES = [
    ("fc_clip.fc.", "projection.fc."),
    ("fc_clip.mlp.layers.0.", "projection.extra."),
    ("aggr.", "pool.transformer."),
    ("gated_fusion.", "gate."),
    ("mha_pool.", "attention."),
]
_IMAGE_RULES = [("fc.fc.", "fragments.fc."), ("fc.mlp.", "fragments.mlp."), *_SIDE_RULES]
_TEXT_RULES = [("bert.", "fragments.backbone."), ("linear.", "fragments.linear."), *_SIDE_RULES]


def convert_checkpoint(
    source: str | Path | Mapping[str, Any], *, hf_path: str | Path | None = None
) -> tuple[RunConfig, dict[str, Tensor]]:
    """A released AAHR ``model_best.pth`` (§7) -> ``(RunConfig, state dict for AAHR)``.

    ``source``: the file (trusted files only: it is unpickled) or its loaded dict ``{'model':
    [img_enc, txt_enc], 'opt': Namespace, ...}``. Keys lose ``module.`` and are renamed per side:
    ``fc.fc.*``/``fc.mlp.*`` -> ``image.fragments.{fc,mlp}.*``; ``bert.*``/``linear.*`` ->
    ``text.fragments.{backbone,linear}.*``; then for both ``fc_clip.fc.*`` -> ``projection.fc.*``,
    ``fc_clip.mlp.layers.0.*`` -> ``projection.extra.*``, ``aggr.*`` -> ``pool.transformer.*``,
    ``gated_fusion.*`` -> ``gate.*``, ``mha_pool.*`` -> ``attention.*``. Unknown keys are kept
    (prefixed) so a strict load names them.

    The checkpoint holds neither the criterion (graph, GCNs, prototypes) nor the momentum encoders,
    so the config turns those off (``instance_relations``, ``prototypes``, ``momentum`` False): the
    model embeds and evaluates; build with them on and load these encoders to fine-tune. Sizes come
    from the tensors (``d``, region and CLIP dims, pooling heads), the options from ``opt``.
    """
    from itmkit.checkpoints import (
        BERT_POSITION_IDS,
        apply_reference_recipe,
        open_reference_checkpoint,
        opt_value,
        rename_keys,
        strip_prefix,
    )

    name, checkpoint = open_reference_checkpoint(source)
    parts = checkpoint.get("model")
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, Mapping) for p in parts):
        found = type(parts).__name__ if not isinstance(parts, (list, tuple)) else f"a list of {len(parts)} entries"
        raise CheckpointFormatError(name, "model", "a list of 2 state dicts [img_enc, txt_enc]", found)
    img_state, txt_state = strip_prefix(parts[0]), strip_prefix(parts[1])
    for side, state, keys in (
        ("model[0] (img_enc)", img_state, ("fc.fc.weight", "fc_clip.fc.weight", "gated_fusion.fc_gate.weight", "mha_pool.query.0.weight")),
        ("model[1] (txt_enc)", txt_state, ("linear.weight", "fc_clip.fc.weight", "gated_fusion.fc_gate.weight", "mha_pool.query.0.weight")),
    ):  # fmt: skip
        for key in keys:
            if key not in state:
                raise CheckpointFormatError(name, side, f"key {key!r} (AAHR's encoder with the CLIP branch)",
                                            f"keys {sorted(state)[:6]}")  # fmt: skip
    if not any(k.startswith("bert.") for k in txt_state):
        raise CheckpointFormatError(name, "model[1] (txt_enc)", "a BERT text encoder ('bert.*')", f"keys {sorted(txt_state)[:6]}")
    state = {f"image.{k}": v for k, v in rename_keys(img_state, _IMAGE_RULES).items()}
    state.update({f"text.{k}": v for k, v in rename_keys(txt_state, _TEXT_RULES).items()})
    for key in [k for k in state if k.endswith(BERT_POSITION_IDS.split("backbone.", 1)[1])]:
        state.pop(key)  # a fixed arange buffer; load_converted restores it when this transformers keeps one

    embed_size, img_dim = (int(s) for s in state["image.fragments.fc.weight"].shape)
    heads = sum(1 for k in img_state if k.startswith("mha_pool.query.") and k.endswith(".weight"))
    dataset = "coco" if str(opt_value(opt := checkpoint.get("opt"), "dataset", "f30k")) == "coco" else "f30k"
    run_cfg = paper_preset(dataset)
    run_cfg.preset = f"converted (paper-{dataset})"
    base: AAHRConfig = run_cfg.model

    def option(attr: str, ref: str, cast: Callable[[Any], Any]) -> Any:
        value = opt_value(opt, ref)
        return cast(value) if value is not None else getattr(base, attr)

    run_cfg.model = AAHRConfig(
        embed_size=embed_size, img_dim=img_dim,
        global_img_dim=int(img_state["fc_clip.fc.weight"].shape[1]), global_txt_dim=int(txt_state["fc_clip.fc.weight"].shape[1]),
        mha_heads=heads, nhead=option("nhead", "nhead", int), dropout=option("dropout", "dropout", float),
        residual_weight=option("residual_weight", "residual_weight", float),
        no_imgnorm=bool(opt_value(opt, "no_imgnorm", False)), no_txtnorm=bool(opt_value(opt, "no_txtnorm", False)),
        instance_relations=False, prototypes=False, momentum=False,
        warmup_steps=option("warmup_steps", "warmup", int), threshold=option("threshold", "threshold", float),
        topk=option("topk", "topk", int), mask_weight=option("mask_weight", "mask_weight", float),
        n_prototypes=option("n_prototypes", "nmb_prototypes", int),
        freeze_prototypes_steps=option("freeze_prototypes_steps", "freeze_prototypes_niters", int),
        moco_queue=option("moco_queue", "moco_M", int), moco_momentum=option("moco_momentum", "moco_r", float),
        triplet_cutoff=TRIPLET_CUTOFF[dataset],
    )  # fmt: skip
    run_cfg.text.hf_path = None if hf_path is None else str(hf_path)
    recipe = {"lr": ("learning_rate", float), "epochs": ("num_epochs", int), "batch_size": ("batch_size", int),
              "grad_clip": ("grad_clip", float), "lr_decay_factor": ("decay_rate", float)}  # fmt: skip
    apply_reference_recipe(run_cfg.train, opt, recipe)
    schedule = opt_value(opt, "lr_schedules")
    if schedule is not None:
        run_cfg.train.lr_decay_epochs = tuple(int(e) for e in schedule)
    return run_cfg, state


def load_reference_checkpoint(
    source: str | Path | Mapping[str, Any], *, hf_path: str | Path | None = None
) -> tuple[AAHR, RunConfig]:
    """Convert, build and load **strictly** (a missing, unexpected or misshaped key raises
    :class:`itmkit.checkpoints.CheckpointMismatchError` naming it); eval mode."""
    from itmkit.checkpoints import build_converted

    return build_converted(convert_checkpoint, build, source, hf_path=hf_path)


METHOD = MethodSpec(
    name="aahr",
    config_cls=AAHRConfig,
    build=build,
    presets=PRESETS,
    spec="aahr.md",
    description="AAHR (KBS 2025): HREM + frozen global (CLIP) guidance with gated fusion, SwAV-style clustering "
    "prototypes, GCNs in the instance graph and MoCo queues; one dot product at test time",
    convert_checkpoint=convert_checkpoint,
    variants=VARIANTS,
)

__all__ = [
    "AAHR",
    "METHOD",
    "AAHRConfig",
    "AAHRLoss",
    "AAHRRelations",
    "GlobalKeyPipeline",
    "ModalityEncoder",
    "SetViews",
    "SideOutput",
    "build",
    "convert_checkpoint",
    "gate_table",
    "load_reference_checkpoint",
    "prototype_table",
    "soft_positive_table",
    "paper_preset",
    "set_views",
]
