"""HREM: Hierarchical RElation Modeling (Fu et al., CVPR 2023). Spec: ``hrem.md``.

An *embedding* method like VSE∞ (one unit vector per image and per caption, retrieval is one dot
product), with relations at two levels:

- **fragment level** (kept at test time, §3.2–3.3): projected regions / word states go through a
  one-layer Transformer and are mean-pooled; the result is mixed ``0.2 : 0.8`` with the max-2
  pooled fragments (:class:`~itmkit.models.fragment_pooling.FragmentAggregation`). No GPO.
- **instance level** (training only, §3.4, §5.2): the ``2B`` embeddings of a batch form one graph
  (:mod:`itmkit.models.instance_graph`); a Transformer masked by the graph's connectivity and
  relevance yields relation-enhanced embeddings that get extra matching losses, and a KL term ties
  the learned inter-modal relevance to embedding distances. It starts after ``warmup_steps``.

The matching loss is the reference code's triplet with distance-weighted negatives
(:func:`itmkit.losses.distance_weighted_triplet_loss`, §5.1); ``base_loss = gnn_loss = "vse"``
switches to the VSE++ hinge, which with ``train.max_violation`` from epoch 0 is the paper's plain
hardest-negative triplet (variant ``hardest``).

The trainer calls :meth:`HREM.training_loss` (the kit's hook for methods whose loss needs more than
the batch's score matrix). Text: BERT as released (``text.kind = "hf"``), or a BiGRU for the
embedded course (itmkit design: VSE∞'s BiGRU with averaged directions in place of BERT + Linear,
everything after the word states unchanged).

Public: :class:`HREMConfig`, :class:`HREM`, :class:`Fragments`, :class:`InstanceRelations`,
:class:`RelationLoss`, :func:`matching_loss`, :func:`batch_graph` (one batch's graph as tables,
for notebooks), :func:`convert_checkpoint`, :func:`load_reference_checkpoint`, ``METHOD`` (presets
``smoke``, ``course``, ``paper`` = ``paper-f30k-bert``, ``paper-coco-bert``).
"""

from __future__ import annotations

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
from itmkit.config_checks import FiniteFloat, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range
from itmkit.data.embedded import embedded_feature_dim
from itmkit.encoded import Encoded
from itmkit.losses import (
    TRIPLET_CUTOFF,
    distance_weighted_triplet_loss,
    draw_negatives,
    hinge_triplet_loss,
    same_image_mask,
)
from itmkit.methods.registry import MethodSpec
from itmkit.models.base import MatchingModel
from itmkit.models.fragment_pooling import FragmentAggregation, transformer_layer
from itmkit.models.functional import l2norm
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.instance_graph import (
    BatchGraph,
    InterModalRelevance,
    build_batch_graph,
    graph_attention,
    relevance_regulariser,
)
from itmkit.models.text_encoders import build_text_encoder

# Encoded.extras keys that encode_images / encode_captions add in training mode (the relation
# losses read them); evaluation encodings carry the embedding only.
FRAGMENTS, FRAGMENT_LENGTHS, POOLED = "fragments", "fragment_lengths", "pooled"


@dataclass
class HREMConfig:
    """HREM model and loss options (hrem.md §3, §5; reference option names in brackets).

    Fragment level (§3.2–3.3):
        embed_size: ``d`` [``embed_size``], 1024.
        img_dim: region feature size [``img_dim``]: 2048 BUTD, 1360 for the embedded sets.
        nhead / dropout: of all Transformer layers (fragment and graph) [``nhead`` 16, ``dropout`` 0.1].
        residual_weight: ``β``, the max-k share of the pooled vector [``residual_weight`` 0.8].
        maxk: ``k`` of the max-k pooling (2, hard-coded in the reference).
        maxk_carry_over: reproduce the reference's ``k`` carry-over across a batch (§3.2 step 2; only
            differs for an item with fewer than ``maxk`` fragments).
        no_imgnorm / no_txtnorm: skip the final l2 norm [``no_imgnorm``, ``no_txtnorm``].

    Instance level, training only (§3.4, §5.2):
        instance_relations: build the graph modules (False: the encoders only, e.g. a converted
            checkpoint, which does not carry them; training then uses the base loss alone).
        warmup_steps: optimisation steps before the graph starts [``warmup`` 8000 iterations].
        threshold: share of each block's nodes a row connects to [``threshold`` 0.5].
        topk: ``K`` region–word scores fed to the relevance MLPs [``topk`` 10].
        sigma / kl_temperature: scale of the distance relevance and the KL temperature (1, 1).
        mask_weight: scale of the relevance in the attention mask [``mask_weight`` 1.0 f30k, 1.5 COCO].
        reg_loss_weight: weight of the KL regulariser [``reg_loss_weight`` 10].
        norm_input: graph nodes are the l2-normalised embeddings (False: the un-normalised
            ``e``) [``norm_input`` 1].
        cross_loss: also match plain against enhanced embeddings [``cross_loss`` 1].
        graph_layers: layers of the graph Transformer [``num_layers_enc`` 1].
        graph_lr_factor: LR multiplier of the graph modules [``graph_lr_factor`` 1.0].

    Matching losses (§5.1):
        base_loss / gnn_loss: ``"trip"`` (distance-weighted negatives, the code) or ``"vse"`` (VSE++
            hinge with ``train.margin``, same-image captions not negatives, hardest negatives when
            the trainer says so) [``base_loss``, ``gnn_loss``].
        triplet_margin: the ``trip`` margin (0.2, hard-coded in the reference).
        triplet_cutoff: the ``trip`` distance cut, 1.7 (f30k) / 1.9 (COCO).
        triplet_weights_dtype: ``"float32"`` (reference; can underflow, §8.3) or ``"float64"``.
        triplet_cutoff_before_max: itmkit option against the same underflow (default off = reference).
    """

    embed_size: PositiveInt = 1024
    img_dim: PositiveInt = 2048
    nhead: PositiveInt = 16
    dropout: Fraction = 0.1
    residual_weight: Annotated[float, Range(0, 1)] = 0.8
    maxk: PositiveInt = 2
    maxk_carry_over: bool = False
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    instance_relations: bool = True
    warmup_steps: NonNegativeInt = 8000
    threshold: FiniteFloat = 0.5
    topk: PositiveInt = 10
    sigma: PositiveFloat = 1.0
    kl_temperature: PositiveFloat = 1.0
    mask_weight: NonNegativeFloat = 1.0
    reg_loss_weight: NonNegativeFloat = 10.0
    norm_input: bool = True
    cross_loss: bool = True
    graph_layers: PositiveInt = 1
    graph_lr_factor: NonNegativeFloat = 1.0
    base_loss: Literal["trip", "vse"] = "trip"
    gnn_loss: Literal["trip", "vse"] = "trip"
    triplet_margin: NonNegativeFloat = 0.2
    triplet_cutoff: PositiveFloat = TRIPLET_CUTOFF["f30k"]
    triplet_weights_dtype: Literal["float32", "float64"] = "float32"
    triplet_cutoff_before_max: bool = False

    def __post_init__(self) -> None:
        for name in ("base_loss", "gnn_loss"):
            if getattr(self, name) not in ("trip", "vse"):
                raise ValueError(f"HREMConfig.{name}: expected 'trip' or 'vse', found {getattr(self, name)!r}")
        if self.triplet_weights_dtype not in ("float32", "float64"):
            raise ValueError(f"HREMConfig.triplet_weights_dtype: expected 'float32' or 'float64', "
                             f"found {self.triplet_weights_dtype!r}")  # fmt: skip
        if self.embed_size % self.nhead:
            raise ValueError(f"HREMConfig: embed_size {self.embed_size} must be divisible by nhead {self.nhead}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"HREMConfig.threshold: expected a share in (0, 1], found {self.threshold}")


@dataclass
class Fragments:
    """One modality's encoding, kept whole (training and notebooks).

    Attributes:
        features: ``[B, T, d]`` projected regions / word states before pooling. Padded positions
            hold what the encoder computes there (regions: ``fc(0) + mlp(0)``; BERT: the projected
            ``[PAD]`` states; BiGRU: zeros), as the reference's relation matching reads them (§8.4).
        lengths: ``[B]`` valid positions.
        pooled: ``[B, d]`` ``e = β r + (1 − β) z`` (the reference's ``*_emb_notnorm``).
        embedding: ``[B, d]`` the retrieval embedding (``l2norm(e)`` unless disabled).
        maxk: ``[B, d]`` the max-k pooled fragments ``r`` (None when rebuilt from an ``Encoded``).
        context: ``[B, d]`` the mean of the Transformer-contextualised fragments ``z`` (likewise).
    """

    features: Tensor
    lengths: Tensor
    pooled: Tensor
    embedding: Tensor
    maxk: Tensor | None = None
    context: Tensor | None = None


@dataclass
class RelationLoss:
    """The parts of one training step's loss (hrem.md §5.2).

    ``total = base + gnn + reg_loss_weight · reg``; ``gnn`` and ``reg`` are 0 before the warm-up
    ends (``graph_active`` False). ``zero_directions`` counts the triplet directions that returned 0
    for want of an eligible negative (§5.1, logged as the reference's silent ``except`` is not).
    """

    total: Tensor
    base: Tensor
    gnn: Tensor
    reg: Tensor
    graph_active: bool
    zero_directions: int = 0
    graph: BatchGraph | None = None

    def as_dict(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "base": float(self.base.detach()),
                "gnn": float(self.gnn.detach()), "reg": float(self.reg.detach()),
                "graph_active": float(self.graph_active), "zero_directions": float(self.zero_directions)}  # fmt: skip


def matching_loss(
    kind: str,
    images: Tensor,
    captions: Tensor,
    image_ids: Tensor,
    cfg: HREMConfig,
    margin: float = 0.2,
    max_violation: bool = True,
    sampler: Callable[[Tensor], Tensor] = draw_negatives,
) -> tuple[Tensor, int]:
    """One matching loss between ``images [B, d]`` and ``captions [B, d]`` of pairs with ``image_ids [B]``.

    ``"trip"``: :func:`~itmkit.losses.distance_weighted_triplet_loss` with the config's margin,
    cutoff and weight dtype (§5.1). ``"vse"``: :func:`~itmkit.losses.hinge_triplet_loss` with
    ``margin`` and ``max_violation`` from the trainer, captions of the same image not negatives
    (the reference's ``mask_repeat = 1``). Returns ``(loss, zero_directions)``.
    """
    scores = images.float() @ captions.float().t()
    positives = same_image_mask(image_ids.to(scores.device))
    if kind == "vse":
        return hinge_triplet_loss(scores, margin=margin, max_violation=max_violation, positives=positives), 0
    if kind != "trip":
        raise ValueError(f"matching_loss kind: expected 'trip' or 'vse', found {kind!r}")
    dtype = torch.float64 if cfg.triplet_weights_dtype == "float64" else torch.float32
    return distance_weighted_triplet_loss(
        scores, positives, margin=cfg.triplet_margin, cutoff=cfg.triplet_cutoff, sampler=sampler,
        dtype=dtype, cutoff_before_max=cfg.triplet_cutoff_before_max,
    )  # fmt: skip


class InstanceRelations(nn.Module):
    """The training-only instance-level modules (the reference's ``GraphLoss`` parameters, §3.4).

    Submodules: ``inter`` (:class:`~itmkit.models.instance_graph.InterModalRelevance`, the
    reference's ``adj_model.adj_learning.mlp_{t2i,i2t}``) and ``graph`` (the masked Transformer,
    the reference's ``gnn``). Neither is in the released checkpoints.

    Steps, each a method so that AAHR can extend one of them: :meth:`build_graph` (connectivity and
    relevance), :meth:`propagate` (graph nodes -> enhanced nodes; AAHR inserts its GCNs here),
    :meth:`losses` (gnn matching losses + KL regulariser).
    """

    def __init__(self, cfg: HREMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.inter = InterModalRelevance(cfg.topk)
        self.graph = transformer_layer(cfg.embed_size, cfg.nhead, cfg.dropout, cfg.graph_layers)

    def build_graph(self, images: Fragments, captions: Fragments) -> BatchGraph:
        """The batch graph from the two modalities' fragments (§3.4 a-b)."""
        cfg = self.cfg
        return build_batch_graph(
            images.embedding, captions.embedding, images.features, captions.features, captions.lengths,
            threshold=cfg.threshold, topk=cfg.topk, sigma=cfg.sigma, inter_relevance=self.inter,
        )  # fmt: skip

    def graph_nodes(self, images: Fragments, captions: Fragments) -> Tensor:
        """``[2B, d]``: images then captions, normalised (``norm_input``) or the pooled ``e``."""
        if self.cfg.norm_input:
            return torch.cat([images.embedding, captions.embedding], dim=0)
        return torch.cat([images.pooled, captions.pooled], dim=0)

    def propagate(self, nodes: Tensor, graph: BatchGraph) -> Tensor:
        """The masked Transformer over the graph (§3.4 d): ``[2B, d]`` -> ``[2B, d]`` (not normalised)."""
        return graph_attention(self.graph, nodes, graph.attention_mask(self.cfg.mask_weight))

    def enhance(self, images: Fragments, captions: Fragments) -> tuple[BatchGraph, Tensor, Tensor]:
        """``(graph, v̂ [B, d], t̂ [B, d])``: the relation-enhanced, normalised embeddings."""
        graph = self.build_graph(images, captions)
        out = self.propagate(self.graph_nodes(images, captions).float(), graph)
        batch = graph.n_images
        return graph, F.normalize(out[:batch], dim=-1), F.normalize(out[batch:], dim=-1)

    def losses(self, images: Fragments, captions: Fragments, image_ids: Tensor, margin: float,
               max_violation: bool, sampler: Callable[[Tensor], Tensor] = draw_negatives,
               ) -> tuple[Tensor, Tensor, int, BatchGraph]:  # fmt: skip
        """``(gnn, reg, zero_directions, graph)`` of §5.2: ``Trip(v, t̂) + Trip(v̂, t) + Trip(v̂, t̂)``
        (only the last without ``cross_loss``) and the KL regulariser."""
        cfg = self.cfg
        graph, v_hat, t_hat = self.enhance(images, captions)
        v, t = images.embedding.float(), captions.embedding.float()
        pairs = [(v, t_hat), (v_hat, t), (v_hat, t_hat)] if cfg.cross_loss else [(v_hat, t_hat)]
        gnn, zero = v.sum() * 0.0, 0
        for im, s in pairs:
            loss, skipped = matching_loss(cfg.gnn_loss, im, s, image_ids, cfg, margin, max_violation, sampler)
            gnn, zero = gnn + loss, zero + skipped
        reg = relevance_regulariser(v, t, graph, cfg.sigma, cfg.kl_temperature)
        return gnn, reg, zero, graph


def _xavier_linears(module: nn.Module) -> None:
    """Xavier-uniform weights, zero biases for every Linear (the reference's ``init_weights`` on ``FC_MLP``)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


class HREM(MatchingModel):
    """HREM (``pairwise = False``): fragment-level encoders giving one embedding per item (§3.2–3.3)
    and the training-only instance graph (§3.4).

    Submodules (state-dict prefixes): ``image`` (``fc``, ``mlp.layers.{0,1}``, ``mlp.bns.{0,1}``; the
    reference's ``fc.fc`` / ``fc.mlp``), ``image_pool`` (``transformer.layers.0.*``; reference
    ``aggr``), ``text`` (``backbone`` + ``linear`` for BERT, ``embed`` + ``rnn`` for the BiGRU),
    ``text_pool``, and ``relations`` (:class:`InstanceRelations`, absent when
    ``instance_relations=False``).

    Test-time embeddings depend on the item alone: BatchNorm uses its running statistics, padding
    is masked in the Transformer and excluded from both poolings, and nothing crosses items.
    """

    pairwise = False
    method_name = "hrem"

    def __init__(self, cfg: HREMConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.embed_size
        # padded region slots keep fc(0) + mlp(0): the relation matching reads them (§3.1, §8.4)
        self.image = PrecompRegionEncoder(cfg.img_dim, d, mlp_residual=True, zero_padding=False)
        _xavier_linears(self.image)  # all three Linear layers, not only fc (§3.1)
        text_options = {"zero_padding": False} if text_cfg.kind == "hf" else {}
        self.text = build_text_encoder(text_cfg, d, vocab_size, **text_options)

        def aggregation() -> FragmentAggregation:
            return FragmentAggregation(d, cfg.nhead, cfg.dropout, cfg.residual_weight, cfg.maxk, cfg.maxk_carry_over)

        self.image_pool = aggregation()
        self.text_pool = aggregation()
        self.relations = InstanceRelations(cfg) if cfg.instance_relations else None
        self.sampler: Callable[[Tensor], Tensor] = draw_negatives  # tests swap in argmax_negatives
        self.last_loss: RelationLoss | None = None

    # ------------------------------------------------------------------ encoders
    def _fragments(self, pool: FragmentAggregation, features: Tensor, lengths: Tensor, normalise: bool) -> Fragments:
        lengths = lengths.to(features.device).long()
        r, z = pool.parts(features, lengths)
        pooled = pool.residual_weight * r + (1.0 - pool.residual_weight) * z
        embedding = l2norm(pooled, dim=-1) if normalise else pooled
        return Fragments(features, lengths, pooled, embedding, r, z)

    def image_fragments(self, images: Tensor, lengths: Tensor) -> Fragments:
        """``images [B, K, img_dim]`` (zero-padded), ``lengths [B]`` -> :class:`Fragments` (§3.2)."""
        features = self.image(images, lengths)
        return self._fragments(self.image_pool, features, lengths, not self.config.no_imgnorm)

    def caption_fragments(self, tokens: Tensor, lengths: Tensor) -> Fragments:
        """``tokens [B, L]``, ``lengths [B]`` -> :class:`Fragments` (§3.3)."""
        features = self.text(tokens, lengths)
        return self._fragments(self.text_pool, features, lengths, not self.config.no_txtnorm)

    @staticmethod
    def _encoded(fragments: Fragments, training: bool) -> Encoded:
        if not training:
            return Encoded(fragments.embedding)
        extras = {FRAGMENTS: fragments.features, FRAGMENT_LENGTHS: fragments.lengths, POOLED: fragments.pooled}
        return Encoded(fragments.embedding, extras=extras)

    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``[B, K, img_dim]`` -> ``Encoded(feats [B, d])``; in training mode ``extras`` also carry
        ``fragments [B, K, d]``, ``fragment_lengths [B]`` and ``pooled [B, d]`` for :meth:`training_loss`."""
        return self._encoded(self.image_fragments(images, lengths), self.training)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``[B, L]`` ids -> ``Encoded(feats [B, d])`` (training extras as :meth:`encode_images`)."""
        return self._encoded(self.caption_fragments(tokens, lengths), self.training)

    # ------------------------------------------------------------------ training
    @staticmethod
    def _from_encoded(encoded: Encoded, side: str) -> Fragments:
        missing = [key for key in (FRAGMENTS, FRAGMENT_LENGTHS, POOLED) if key not in encoded.extras]
        if missing:
            raise ValueError(
                f"HREM.training_loss {side}: expected Encoded.extras {missing} (encode in training mode, "
                f"model.train()), found extras {sorted(encoded.extras)}"
            )
        extras = encoded.extras
        return Fragments(extras[FRAGMENTS].float(), extras[FRAGMENT_LENGTHS], extras[POOLED].float(), encoded.feats.float())

    def relation_loss(self, images: Fragments, captions: Fragments, image_ids: Tensor, *, step: int,
                      margin: float = 0.2, max_violation: bool = True) -> RelationLoss:  # fmt: skip
        """The loss of §5.2 for one batch: ``base + gnn + reg_loss_weight · reg``, the graph parts
        from ``step >= warmup_steps`` on (``step`` = optimisation steps already taken)."""
        cfg = self.config
        base, zero = matching_loss(cfg.base_loss, images.embedding, captions.embedding, image_ids, cfg,
                                   margin, max_violation, self.sampler)  # fmt: skip
        nothing = base * 0.0
        if self.relations is None or step < cfg.warmup_steps:
            return RelationLoss(base, base, nothing, nothing, False, zero)
        gnn, reg, skipped, graph = self.relations.losses(images, captions, image_ids, margin, max_violation, self.sampler)
        total = base + gnn + cfg.reg_loss_weight * reg
        return RelationLoss(total, base, gnn, reg, True, zero + skipped, graph)

    def training_loss(self, images: Encoded, captions: Encoded, batch: Any, *, step: int, epoch: int = 0,
                      margin: float = 0.2, max_violation: bool = True) -> Tensor:  # fmt: skip
        """The trainer's hook: the scalar loss of a batch from its training-mode encodings.

        Args:
            images / captions: what :meth:`encode_images` / :meth:`encode_captions` returned in
                training mode for the batch.
            batch: the :class:`~itmkit.data.loaders.Batch` (its ``image_index`` gives the positives).
            step: optimisation steps taken before this one (drives the warm-up; restored on resume).
            epoch: 0-based epoch (unused by HREM).
            margin / max_violation: the trainer's hinge settings (read by ``"vse"`` losses only).

        The parts of the last call are kept in ``self.last_loss`` (:class:`RelationLoss`).
        """
        del epoch
        result = self.relation_loss(self._from_encoded(images, "images"), self._from_encoded(captions, "captions"),
                                    batch.image_index, step=step, margin=margin, max_violation=max_violation)  # fmt: skip
        self.last_loss = RelationLoss(result.total.detach(), result.base.detach(), result.gnn.detach(),
                                      result.reg.detach(), result.graph_active, result.zero_directions)  # fmt: skip
        return result.total

    def param_groups(self, lr: float, backbone_lr_scale: float = 0.1) -> list[dict[str, Any]]:
        """The base groups, with the instance-level modules at ``lr · graph_lr_factor`` (§5.3)."""
        groups = super().param_groups(lr, backbone_lr_scale)
        if self.relations is None or self.config.graph_lr_factor == 1.0:
            return groups
        return separate_param_group(groups, list(self.relations.parameters()), lr * self.config.graph_lr_factor, "relations")


def separate_param_group(groups: list[dict[str, Any]], params: list[nn.Parameter], lr: float, name: str) -> list[dict[str, Any]]:
    """Move ``params`` out of the optimiser ``groups`` into one group of their own at ``lr``
    (HREM's instance-level modules, AAHR's whole criterion: §5.3's separate learning rate)."""
    ids = {id(p) for p in params}
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    groups.append({"params": [p for p in params if p.requires_grad], "lr": lr, "name": name})
    return groups


def build(run_cfg: RunConfig, vocab_size: int | None) -> HREM:
    """``MethodSpec.build``: the model of ``run_cfg`` (parameters drawn from torch's current RNG)."""
    cfg = run_cfg.model
    if isinstance(cfg, dict):
        cfg = HREMConfig(**cfg)
    return HREM(cfg, run_cfg.text, vocab_size)


# ----------------------------------------------------------------------------- one batch's graph, as data


@dataclass
class BatchGraphTables:
    """One batch's instance graph as a trained model builds it (for notebooks and figures).

    Attributes:
        nodes: one row per node: ``node`` (0..2B-1), ``modality`` (``image`` / ``caption``),
            ``position`` (row in the batch), ``image_index``, ``caption_index`` (of the pair).
        edges: one row per **kept** edge (connectivity rule): ``source`` (the node that attends),
            ``target``, ``block`` (``i2i``, ``i2t``, ``t2i``, ``t2t``), ``relevance`` (the weight the
            attention mask adds, before ``mask_weight``), ``attention`` (the graph Transformer's
            attention from source to target, averaged over heads; rows sum to 1 over kept edges),
            ``same_image`` (both nodes belong to the same image).
        connect: ``[2B, 2B]`` bool; ``relevance``: ``[2B, 2B]`` float (every entry, kept or not).
        embeddings: ``[2B, d]`` the retrieval embeddings (graph input, normalised);
        enhanced: ``[2B, d]`` the relation-enhanced embeddings (graph output, normalised).
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    connect: np.ndarray
    relevance: np.ndarray
    embeddings: np.ndarray
    enhanced: np.ndarray


@torch.no_grad()
def batch_graph(model: HREM, batch: Any) -> BatchGraphTables:
    """The instance graph of ``batch`` (a :class:`~itmkit.data.loaders.Batch`) under ``model``.

    Everything is computed in eval mode (no dropout, BatchNorm running statistics), so the same
    model and batch always give the same graph; the model's mode is restored afterwards. The graph
    is the one training builds after the warm-up (hrem.md §3.4): nodes ``0..B-1`` are the batch's
    images, ``B..2B-1`` its captions.
    """
    if model.relations is None:
        raise ValueError("batch_graph: this HREM model has no instance-level modules (instance_relations=False)")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch = batch.to(device)
        images = model.image_fragments(batch.images, batch.img_lengths)
        captions = model.caption_fragments(batch.tokens, batch.cap_lengths)
        relations = model.relations
        graph = relations.build_graph(images, captions)
        nodes_in = relations.graph_nodes(images, captions)
        mask = graph.attention_mask(model.config.mask_weight)
        out = relations.propagate(nodes_in, graph)
        attention = _first_layer_attention(relations.graph, nodes_in, mask)
    finally:
        model.train(was_training)
    b = graph.n_images
    image_index, caption_index = batch.image_index.cpu().numpy(), batch.caption_index.cpu().numpy()
    nodes = pd.DataFrame({
        "node": np.arange(2 * b),
        "modality": ["image"] * b + ["caption"] * b,
        "position": np.concatenate([np.arange(b), np.arange(b)]),
        "image_index": np.concatenate([image_index, image_index]),
        "caption_index": np.concatenate([caption_index, caption_index]),
    })  # fmt: skip
    connect = graph.connect.cpu().numpy()
    relevance = graph.relevance.float().cpu().numpy()
    source, target = np.nonzero(connect)
    kinds = np.array([["i2i", "i2t"], ["t2i", "t2t"]])
    node_image = nodes["image_index"].to_numpy()
    edges = pd.DataFrame({
        "source": source, "target": target, "block": kinds[(source >= b).astype(int), (target >= b).astype(int)],
        "relevance": relevance[source, target], "attention": attention.cpu().numpy()[source, target],
        "same_image": node_image[source] == node_image[target],
    })  # fmt: skip
    embeddings = nodes_in.float().cpu().numpy()
    enhanced = F.normalize(out.float(), dim=-1).cpu().numpy()
    return BatchGraphTables(nodes, edges, connect, relevance, embeddings, enhanced)


def _first_layer_attention(transformer: nn.TransformerEncoder, nodes: Tensor, mask: Tensor) -> Tensor:
    """``[2B, 2B]`` head-averaged attention weights of the graph Transformer's first layer."""
    layer = transformer.layers[0]
    sequence = nodes[:, None]  # [2B, 1, d]: sequence-first, batch 1
    _, weights = layer.self_attn(sequence, sequence, sequence, attn_mask=mask, need_weights=True,
                                 average_attn_weights=True)  # fmt: skip
    return weights[0]


# ----------------------------------------------------------------------------- presets


def paper_preset(dataset: Literal["f30k", "coco"] = "f30k") -> RunConfig:
    """The released recipe (§5.3, README commands): BERT (``text.hf_path``; ``None`` = the offline
    MiniLM, set a local ``bert-base-uncased`` folder to reproduce), d = 1024, 30 epochs, batch 128
    (f30k) / 256 (COCO), AdamW lr 5e-4 wd 1e-4, BERT at lr x 0.1, x0.1 at epochs 15 and 25, clip
    2.0, graph from iteration 8000, cutoff 1.7 / 1.9, mask_weight 1.0 / 1.5.

    Model selection on ``dev`` (the reference selects on the test split, §8.1). ``data.data_dir``
    is a placeholder (``data/{f30k,coco}_precomp``).
    """
    if dataset not in ("f30k", "coco"):
        raise KeyError(f"paper preset: dataset must be f30k or coco, found {dataset!r}")
    coco = dataset == "coco"
    return RunConfig(
        method="hrem",
        model=HREMConfig(embed_size=1024, img_dim=2048, mask_weight=1.5 if coco else 1.0,
                         triplet_cutoff=TRIPLET_CUTOFF[dataset]),  # fmt: skip
        text=TextConfig(kind="hf", hf_path=None),
        data=DataConfig(data_dir=f"data/{dataset}_precomp", test_split="testall" if coco else "test",
                        dev_max_captions=5000, region_drop=0.2, caption_augment=True),  # fmt: skip
        train=TrainConfig(
            epochs=30,
            batch_size=256 if coco else 128,
            lr=5e-4,
            lr_decay_epochs=(15, 25),
            lr_decay_factor=0.1,
            optimizer="adamw",
            weight_decay=1e-4,
            backbone_lr_scale=0.1,
            grad_clip=2.0,
            margin=0.2,
            max_violation=True,  # read by base_loss / gnn_loss "vse" only, as the reference's switch
            sum_warmup_epochs=1,
        ),
    )


def course_preset() -> RunConfig:
    """The embedded ``course`` set on a 2-core CPU (hrem.md §9, itmkit): BiGRU text (word_dim 64),
    d = 128, 4 heads, batch 64 (47 steps/epoch), 8 epochs, lr 2e-3 (x0.1 at epoch 6), graph from
    step 94 (epoch 3), topk 4 (short captions, 12 regions).

    Measured (seed 0, test rsum, loaded machine): this preset 515.0 (i2t R@1 90.0, t2i R@1 52.6;
    VSE∞'s course preset: 491.0); lr 2e-3 / 10 epochs 515.4; lr 1e-3 / 10 epochs 484.2; without
    the graph (variant ``no-graph``, lr 2e-3, 10 epochs) 491.2.
    Before the graph starts the sampled-negative triplet learns slowly and unevenly across seeds
    (dev rsum 66-299 after 2 epochs); the graph losses speed it up markedly (epoch 3: 426-444 with
    the graph, 152 without)."""
    return RunConfig(
        method="hrem",
        model=HREMConfig(embed_size=128, img_dim=embedded_feature_dim("course"), nhead=4, warmup_steps=94, topk=4),
        text=TextConfig(kind="bigru", word_dim=64),
        data=DataConfig(embedded_preset="course", region_drop=0.2, caption_augment=True),
        train=TrainConfig(
            epochs=8,
            batch_size=64,
            lr=2e-3,
            lr_decay_epochs=(6,),
            optimizer="adamw",
            weight_decay=1e-4,
            grad_clip=2.0,
            max_violation=True,
            sum_warmup_epochs=1,
            log_every_steps=10,
        ),
    )


def smoke_preset() -> RunConfig:
    """Every code path (the graph from step 4 of 8 per epoch) on the embedded ``tiny`` set in seconds."""
    return RunConfig(
        method="hrem",
        model=HREMConfig(embed_size=32, img_dim=embedded_feature_dim("tiny"), nhead=4, warmup_steps=4, topk=3),
        text=TextConfig(kind="bigru", word_dim=16),
        data=DataConfig(embedded_preset="tiny"),
        train=TrainConfig(epochs=2, batch_size=32, lr=5e-4, lr_decay_epochs=(1,), weight_decay=1e-4,
                          sum_warmup_epochs=1, log_every_steps=5),  # fmt: skip
    )


PRESETS = {
    "smoke": smoke_preset,
    "course": course_preset,
    "paper": paper_preset,
    "paper-f30k-bert": lambda: paper_preset("f30k"),
    "paper-coco-bert": lambda: paper_preset("coco"),
}

VARIANTS = {
    # the paper's loss (issue #10): plain hardest-negative triplet instead of the sampled negatives
    "hardest": {"model.base_loss": "vse", "model.gnn_loss": "vse", "train.max_violation": True,
                "train.sum_warmup_epochs": 0},  # fmt: skip
    # fragment level only: no instance graph (the base loss alone)
    "no-graph": {"model.instance_relations": False},
}


# ----------------------------------------------------------------------------- checkpoint import (§7)


class CheckpointFormatError(ValueError):
    """A reference HREM checkpoint that does not have the layout of hrem.md §7."""

    def __init__(self, source: str, field: str, expected: str, found: str) -> None:
        self.source, self.field, self.expected, self.found = source, field, expected, found
        super().__init__(f"{source}: field {field!r}: expected {expected}, found {found}")


_IMAGE_RULES = [("fc.fc.", "image.fc."), ("fc.mlp.", "image.mlp."), ("aggr.", "image_pool.transformer.")]
_TEXT_RULES = [("bert.", "text.backbone."), ("linear.", "text.linear."), ("aggr.", "text_pool.transformer.")]


def convert_checkpoint(
    source: str | Path | Mapping[str, Any], *, hf_path: str | Path | None = None
) -> tuple[RunConfig, dict[str, Tensor]]:
    """A released HREM ``model_best.pth`` (§7) -> ``(RunConfig, state dict for HREM)``.

    ``source``: the file (opened with ``weights_only=False``: trusted files only) or its loaded dict
    ``{'model': [img_enc, txt_enc], 'opt': Namespace, ...}``. Keys lose DataParallel's ``module.``
    and are renamed: ``fc.fc.* -> image.fc.*``, ``fc.mlp.* -> image.mlp.*``,
    ``aggr.* -> image_pool.transformer.*``; ``bert.* -> text.backbone.*``, ``linear.* -> text.linear.*``,
    ``aggr.* -> text_pool.transformer.*`` (BERT's ``position_ids`` dropped; the loader restores it).
    Keys no rule knows are kept (prefixed ``image.`` / ``text.``) so a strict load names them.

    The checkpoint has no graph modules (the reference does not save its criterion), so the config
    has ``instance_relations=False``: the model embeds and evaluates; to fine-tune with the graph,
    build with ``instance_relations=True`` and load the encoders from this state dict. Sizes come
    from the tensors, the options (``nhead``, ``residual_weight``, ``dataset``, the recipe) from
    ``opt``. ``hf_path``: local folder of the BERT it was trained with (``bert-base-uncased``).
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
    opt = checkpoint.get("opt")

    for key in ("fc.fc.weight", "fc.mlp.layers.0.weight", "aggr.layers.0.self_attn.in_proj_weight"):
        if key not in img_state:
            raise CheckpointFormatError(name, "model[0] (img_enc)", f"key {key!r} (HREM's EncoderImageAggr)",
                                        f"keys {sorted(img_state)[:6]}")  # fmt: skip
    if "linear.weight" not in txt_state or not any(k.startswith("bert.") for k in txt_state):
        raise CheckpointFormatError(name, "model[1] (txt_enc)", "a BERT text encoder ('bert.*', 'linear.weight', 'aggr.*')",
                                    f"keys {sorted(txt_state)[:6]}")  # fmt: skip
    state = rename_keys(img_state, _IMAGE_RULES + [("", "image.")])
    state.update(rename_keys(txt_state, _TEXT_RULES + [("", "text.")]))
    state.pop(BERT_POSITION_IDS, None)  # a fixed arange buffer; load_reference_checkpoint restores it if needed

    embed_size, img_dim = (int(s) for s in state["image.fc.weight"].shape)
    dataset = "coco" if str(opt_value(opt, "dataset", "f30k")) == "coco" else "f30k"
    run_cfg = paper_preset(dataset)
    run_cfg.preset = f"converted (paper-{dataset}-bert)"
    defaults = HREMConfig()

    def option(attr: str, ref: str, cast: Callable[[Any], Any]) -> Any:
        value = opt_value(opt, ref)
        return cast(value) if value is not None else getattr(run_cfg.model, attr, getattr(defaults, attr))

    run_cfg.model = HREMConfig(
        embed_size=embed_size,
        img_dim=img_dim,
        nhead=option("nhead", "nhead", int),
        dropout=option("dropout", "dropout", float),
        residual_weight=option("residual_weight", "residual_weight", float),
        no_imgnorm=bool(opt_value(opt, "no_imgnorm", False)),
        no_txtnorm=bool(opt_value(opt, "no_txtnorm", False)),
        instance_relations=False,
        warmup_steps=option("warmup_steps", "warmup", int),
        threshold=option("threshold", "threshold", float),
        topk=option("topk", "topk", int),
        mask_weight=option("mask_weight", "mask_weight", float),
        reg_loss_weight=option("reg_loss_weight", "reg_loss_weight", float),
        norm_input=option("norm_input", "norm_input", bool),
        cross_loss=option("cross_loss", "cross_loss", bool),
        graph_layers=option("graph_layers", "num_layers_enc", int),
        graph_lr_factor=option("graph_lr_factor", "graph_lr_factor", float),
        base_loss=option("base_loss", "base_loss", str),
        gnn_loss=option("gnn_loss", "gnn_loss", str),
        triplet_cutoff=TRIPLET_CUTOFF[dataset],
    )
    run_cfg.text.hf_path = None if hf_path is None else str(hf_path)
    recipe = {"lr": ("learning_rate", float), "epochs": ("num_epochs", int), "batch_size": ("batch_size", int),
              "margin": ("margin", float), "grad_clip": ("grad_clip", float), "lr_decay_factor": ("decay_rate", float),
              "sum_warmup_epochs": ("vse_mean_warmup_epochs", int)}  # fmt: skip
    apply_reference_recipe(run_cfg.train, opt, recipe)
    schedule = opt_value(opt, "lr_schedules")  # HREM decays at several epochs (VSE∞'s lr_update is one)
    if schedule is not None:
        run_cfg.train.lr_decay_epochs = tuple(int(e) for e in schedule)
    return run_cfg, state


def load_reference_checkpoint(
    source: str | Path | Mapping[str, Any], *, hf_path: str | Path | None = None
) -> tuple[HREM, RunConfig]:
    """Convert (:func:`convert_checkpoint`), build and load **strictly** (any missing, unexpected or
    misshaped key raises :class:`itmkit.checkpoints.CheckpointMismatchError` naming it). The model
    comes back in eval mode with its :class:`RunConfig`."""
    from itmkit.checkpoints import build_converted

    return build_converted(convert_checkpoint, build, source, hf_path=hf_path)


METHOD = MethodSpec(
    name="hrem",
    config_cls=HREMConfig,
    build=build,
    presets=PRESETS,
    spec="hrem.md",
    description="HREM (CVPR 2023): fragment-level Transformer pooling + a training-only instance graph over the "
    "batch's images and captions (masked Transformer, relation losses); one dot product at test time",
    convert_checkpoint=convert_checkpoint,
    variants=VARIANTS,
)

__all__ = [
    "HREM",
    "METHOD",
    "BatchGraphTables",
    "CheckpointFormatError",
    "Fragments",
    "HREMConfig",
    "InstanceRelations",
    "RelationLoss",
    "batch_graph",
    "build",
    "convert_checkpoint",
    "load_reference_checkpoint",
    "matching_loss",
    "paper_preset",
]
