"""CEFG: Enhancing Image-Text Matching through Contextual Fine-Grained Alignment (MMM-design/CEFG).

Spec: ``../shared/methods/cefg.md`` (paper not found; everything is read from the released code,
which does not run as released: the minimal fixes are listed in ``docs/cefg.md``). CEFG is SGRAF
(``sgraf.md``) with

- a **spatial context module** on the image side (§3.3 a-d): every region gathers its spatial
  neighbours (a direction-sector adjacency built from the detection boxes, §3.4,
  :mod:`itmkit.data.spatial_adjacency`) weighted by the global-attention logits; the
  neighbourhood modulates the region; a GRU over the original + modulated regions gives ``2R``
  context-enhanced regions that the words attend to;
- RCAR's **correspondence regulator** (§3.3 f): 3 rounds that learn a per-word attention
  temperature (and a per-word query modulation for the next round);
- SGR or SAF on top, trained separately; their ensemble goes through
  :func:`itmkit.evaluate.ensemble.evaluate_ensemble`.

How the adjacency reaches the model: :meth:`CEFG.prepare_data` appends each region's adjacency
row to its features (``[K, img_dim + K]``, :meth:`~itmkit.data.precomp.PrecompSplit.with_region_columns`),
read from ``{split}_ims_dir_selfadj4.npy`` (``data_prep/cefg_adjacency.py`` writes it; the
reference's ``adj.py`` output works too) or computed on the fly from ``{split}_boxes.npy`` (the
embedded sets). :meth:`CEFG.encode_images` splits the columns off and runs the whole image side
once per image; the enhanced regions and the global vector travel in :class:`Encoded`.

Text: bi-GRU (released) or a Hugging Face encoder (the BERT variant, [itmkit design], §3.6: no
code was released). AMR: ``amr_fusion='none'`` is what the released code computes (its AMR
branch is dead, §8.3); ``'gated'`` is our reading of the paper's figure (§3.5, [itmkit design]),
fed by :class:`~itmkit.data.amr.AMRTextPipeline` from an offline-parsed ``{split}_amr_caps.txt``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from itmkit.checkpoints import rename_keys, strip_prefix
from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig
from itmkit.config_checks import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from itmkit.data.amr import AMRTextPipeline, split_amr_tokens
from itmkit.data.precomp import PrecompSplit, RegionColumns
from itmkit.data.spatial_adjacency import ADJACENCY_RULES, split_adjacency
from itmkit.encoded import Encoded
from itmkit.methods.registry import MethodSpec
from itmkit.methods.sgraf import convert_family_checkpoint, reference_config_fields
from itmkit.methods.sgraf import reference_state_to_itmkit as sgraf_state_to_itmkit
from itmkit.models.base import Explanation, MatchingModel
from itmkit.models.cefg_modules import (
    INITIAL_TEMPERATURE,
    NEIGHBOURHOOD_SLOTS,
    REGULATOR_STEPS,
    AMRGatedFusion,
    ContextSimilarityEncoder,
)
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.text_encoders import build_text_encoder


@dataclass
class CEFGConfig:
    """CEFG model settings (cefg.md §3, §5; defaults = the released code).

    Attributes:
        module: ``"SGR"`` or ``"SAF"`` (two separately trained models; the paper's table is most
            likely their ensemble, §6).
        num_regions: regions per image ``R`` (the context attention's ``BatchNorm1d(R)`` and the
            GRU run over exactly that many; the reference hard-codes 36, §8.6).
        rcr_steps: regulator rounds (3, hard-coded). neighbourhood_slots: ``collect_emb``'s 5.
        initial_temperature: ``λ_0 = 10`` (hard-coded; SGRAF's attention uses 9).
        adjacency: ``"released"`` (only the "left" sector, as ``adj.py`` ships), ``"all_sectors"``
            [itmkit, §8.5] or ``"identity"`` [itmkit, §9]; see :mod:`itmkit.data.spatial_adjacency`.
        amr_fusion: ``"none"`` (released: AMR never read) or ``"gated"`` [itmkit, §3.5].
        word_dropout / self_attention_dropout: 0.4 in the reference (word embeddings; the context
            attention and TextSA).
    """

    module: Literal["SGR", "SAF"] = "SGR"
    img_dim: PositiveInt = 2048
    embed_size: PositiveInt = 1024
    sim_dim: PositiveInt = 256
    num_regions: PositiveInt = 36
    sgr_step: NonNegativeInt = 3
    rcr_steps: PositiveInt = REGULATOR_STEPS
    neighbourhood_slots: PositiveInt = NEIGHBOURHOOD_SLOTS
    initial_temperature: PositiveFloat = INITIAL_TEMPERATURE
    adjacency: Literal["released", "all_sectors", "identity"] = "released"
    amr_fusion: Literal["none", "gated"] = "none"
    bi_gru: bool = True
    num_layers: PositiveInt = 1
    word_dropout: Fraction = 0.4
    self_attention_dropout: Fraction = 0.4
    no_imgnorm: bool = False
    no_txtnorm: bool = False


class CEFG(MatchingModel):
    """CEFG-SGR or CEFG-SAF (cefg.md §3): ``image`` (``fc`` + l2), ``text`` (bi-GRU or HF),
    ``sim`` (:class:`~itmkit.models.cefg_modules.ContextSimilarityEncoder`), and ``amr_fusion``
    (:class:`~itmkit.models.cefg_modules.AMRGatedFusion`, only with ``amr_fusion='gated'``)."""

    pairwise = True
    method_name = "cefg"

    def __init__(self, cfg: CEFGConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        if cfg.adjacency not in ADJACENCY_RULES:
            raise ValueError(f"CEFGConfig.adjacency: expected one of {list(ADJACENCY_RULES)}, found {cfg.adjacency!r}")
        if cfg.amr_fusion not in ("none", "gated"):
            raise ValueError(f"CEFGConfig.amr_fusion: expected 'none' or 'gated', found {cfg.amr_fusion!r}")
        if cfg.amr_fusion == "gated" and text_cfg.kind != "bigru":
            raise ValueError(
                f"CEFGConfig.amr_fusion='gated' maps the AMR tokens with the caption vocabulary (cefg.md §3.5): "
                f"expected text.kind 'bigru', found {text_cfg.kind!r}"
            )
        self.cfg = cfg
        self.image = PrecompRegionEncoder(cfg.img_dim, cfg.embed_size, mlp_residual=False, l2_regions=not cfg.no_imgnorm)
        options: dict[str, Any] = {"l2_words": not cfg.no_txtnorm}
        if text_cfg.kind == "bigru":
            options.update(bidirectional=cfg.bi_gru, word_dropout=cfg.word_dropout, num_layers=cfg.num_layers)
        self.text = build_text_encoder(text_cfg, cfg.embed_size, vocab_size, **options)
        self.sim = ContextSimilarityEncoder(
            cfg.embed_size, cfg.sim_dim, cfg.module, cfg.num_regions, cfg.sgr_step, cfg.self_attention_dropout,
            cfg.rcr_steps, cfg.neighbourhood_slots, cfg.initial_temperature,
        )
        self.amr_fusion = AMRGatedFusion(cfg.embed_size) if cfg.amr_fusion == "gated" else None

    # --- data: the adjacency columns and the AMR text --------------------------------------------
    @property
    def _columns_name(self) -> str:
        return f"cefg-adjacency-{self.cfg.adjacency}"

    def prepare_data(self, split: PrecompSplit, pipeline: Any) -> tuple[PrecompSplit, Any]:
        """Append every region's adjacency row to its features (read or built per
        :func:`~itmkit.data.spatial_adjacency.split_adjacency`) and, with ``amr_fusion='gated'``,
        wrap the pipeline so each caption carries its AMR (:class:`AMRTextPipeline`)."""
        columns = split.images
        if not (isinstance(columns, RegionColumns) and columns.name == self._columns_name):
            split = split.with_region_columns(split_adjacency(split, self.cfg.adjacency), self._columns_name)
        if self.cfg.amr_fusion == "gated":
            pipeline = AMRTextPipeline.for_split(pipeline, split)
        return split, pipeline

    # --- encoding ---------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, R, img_dim + R]`` (features, then each region's adjacency row),
        ``lengths [B]`` (all ``R``) -> enhanced regions ``[B, 2R, d]`` with extras ``global
        [B, d]``, ``region_attention [B, R]``, ``neighbours [B, R, P]`` (long),
        ``neighbour_weights [B, R, P]`` (§3.3 a-d)."""
        R, img_dim = self.cfg.num_regions, self.cfg.img_dim
        if images.dim() != 3 or images.shape[1] != R or images.shape[2] != img_dim + R:
            raise ValueError(
                f"CEFG images: expected [B, {R}, {img_dim} + {R}] (num_regions regions, img_dim features then the "
                f"region's adjacency row; CEFG.prepare_data appends it, as the trainer and encode_split do), found "
                f"shape {tuple(images.shape)}"
            )
        if bool((lengths != R).any()):
            raise ValueError(
                f"CEFG image lengths: expected every image to have all {R} regions (the GRU and the BatchNorm run over "
                f"the fixed region order; train with data.region_drop = 0), found {sorted(set(lengths.tolist()))}"
            )
        adjacency = images[..., img_dim:]
        diagonal = adjacency.diagonal(dim1=1, dim2=2)
        if not bool(((adjacency == 0) | (adjacency == 1)).all() and (diagonal == 1).all()):
            raise ValueError("CEFG images: adjacency columns: expected 0/1 matrices with a diagonal of ones, found other values")
        regions = self.image(images[..., :img_dim], lengths)
        details: dict[str, Tensor] = {}
        enhanced, image_global = self.sim.enhance_regions(regions, adjacency, details)
        extras = {"global": image_global, "region_attention": details["region_attention"],
                  "neighbours": details["neighbours"], "neighbour_weights": details["neighbour_weights"]}  # fmt: skip
        return Encoded(enhanced, torch.full_like(lengths, 2 * R), extras)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]``, ``lengths [B]`` -> words ``[B, L, d]`` with ``extras["global"] [B, d]``
        (TextSA). With ``amr_fusion='gated'`` the tokens hold ``[AMR | caption]`` and the words
        are the gated fusion of the caption with its AMR (extra ``amr_gate [B, L]``, the mean gate)."""
        if self.amr_fusion is None:
            words = self.text(tokens, lengths)
            encoded = Encoded(words, lengths.to(words.device))
            return Encoded(words, encoded.lengths, {"global": self.sim.global_caption(words, encoded.mask)})
        amr_tokens, amr_lengths, tokens, lengths = split_amr_tokens(tokens, lengths)
        amr = Encoded(self.text(amr_tokens, amr_lengths), amr_lengths)
        words = Encoded(self.text(tokens, lengths), lengths)
        fused, gates, _ = self.amr_fusion(words.feats, words.mask, amr.feats, amr.mask)
        extras = {"global": self.sim.global_caption(fused, words.mask), "amr_gate": gates.mean(-1) * words.mask}
        return Encoded(fused, lengths, extras)

    # --- scoring ----------------------------------------------------------------------------------
    def score_block(self, images: Encoded, captions: Encoded, details: dict | None = None) -> Tensor:
        """``[n_img, n_cap]`` sigmoid scores (§3.3 e-h) for every pair of the two blocks, in one
        vectorised pass; ``details`` receives the intermediates (see
        :meth:`ContextSimilarityEncoder.similarity_nodes` and SGRAF's ``reason``)."""
        dtype = self.sim.sim_eval_w.weight.dtype
        if images.feats.dtype != dtype:  # reduced-precision blocks (CUDA option) meet fp32 weights
            images, captions = images.to(dtype=dtype), captions.to(dtype=dtype)
        return self.sim.score_block(
            images.feats, images.extras["global"], captions.feats, captions.extras["global"], captions.mask, None, details
        )

    def pair_workspace_bytes(self, images: Encoded, captions: Encoded) -> int:
        """Bytes per (image, caption) pair :meth:`score_block` holds at its peak (estimate).

        Without grad, within a regulator round: the modulation, the modulated query, the attended
        vectors and the regulator's ``d``-wide output (``4 [L, d]``), ~4 ``[2R, L]`` attention
        temporaries, the ``[L, 2s]`` hidden layer and ``σ``, then SGRAF's graph tensors. With grad
        autograd keeps ~4 ``[L, d]``, ~6 ``[2R, L]`` and ~4 ``[L, s]`` tensors per round. Checked
        once against the process's peak memory at f30k sizes (d 1024, s 256, 36 regions, L 20,
        24 x 24 pairs): the estimate is 1.3-1.6x the measured peak (SGR without grad 0.31-0.39
        MiB/pair measured; with grad, forward and backward, 1.1-1.5 MiB/pair)."""
        R2 = images.feats.shape[1]
        L = captions.feats.shape[1]
        d = captions.feats.shape[-1]
        s = self.cfg.sim_dim
        rounds = self.cfg.rcr_steps + 1
        graph = self.cfg.sgr_step if self.cfg.module == "SGR" else 1
        elem = captions.feats.element_size()
        if torch.is_grad_enabled():
            count = rounds * (4 * L * d + 6 * R2 * L + 4 * L * s) + (2 * graph + 2) * (L + 1) * s + 2 * graph * (L + 1) ** 2 + 3 * d
        else:
            count = 4 * L * d + 4 * R2 * L + 4 * L * s + 3 * (L + 1) * s + 2 * (L + 1) ** 2 + 2 * d
        return elem * count

    @torch.no_grad()
    def explain(self, image: Encoded, caption: Encoded) -> Explanation:
        """One encoded image and caption -> :class:`Explanation` (eval-mode numbers).

        ``n_regions`` is the image's ``R`` regions (the model attends over ``2R`` enhanced ones).
        Parts (unpadded numpy):

        - ``word_region_weights [n_words, R]``: the final attention (temperature ``λ_steps``),
          each region's two enhanced slots (original, context-modulated) added;
          ``enhanced_word_region_weights [n_words, 2R]`` the attention itself;
        - ``region_scores [R]``: the global image attention ``softmax(ω)``;
        - ``adjacency [R, R]`` (1 where region ``r`` gathers ``j``, self included),
          ``neighbours [R, P]`` (the gather slots), ``neighbour_weights [R, P]``;
        - ``regulator_temperature [steps + 1, n_words]`` (``λ_0 .. λ_steps``),
          ``regulator_modulation [steps, n_words, d]`` (the query modulation ``M`` of each round),
          ``regulator_word_region_weights [steps, n_words, 2R]`` (each round's attention);
        - ``nodes [n_words + 1, s]``; SGR ``sgr_edges [sgr_step, n_words + 1, n_words + 1]``; SAF
          ``filtration_weights [n_words + 1]`` and ``word_scores [n_words]`` (the words' SAF weights);
        - ``amr_gate [n_words]`` with ``amr_fusion='gated'`` (mean gate: 1 = word kept, 0 = AMR context).
        """
        if len(image) != 1 or len(caption) != 1:
            raise ValueError(f"explain: expected one image and one caption, found {len(image)} and {len(caption)}")
        was_training = self.training
        self.eval()
        try:
            details: dict[str, Tensor] = {}
            score = float(self.score_block(image, caption, details)[0, 0])
        finally:
            self.train(was_training)
        R, L = self.cfg.num_regions, int(caption.lengths[0])

        def pair(t: Tensor):
            return t.detach().float().cpu().numpy()

        attention = details["attention"][0, 0, :, :L].T  # [L, 2R]
        neighbours = image.extras["neighbours"][0]
        adjacency = torch.zeros(R, R).scatter_(1, neighbours.cpu(), 1.0)
        parts: dict[str, Any] = {
            "word_region_weights": pair(attention[:, :R] + attention[:, R:]),
            "enhanced_word_region_weights": pair(attention),
            "region_scores": pair(image.extras["region_attention"][0]),
            "adjacency": adjacency.numpy(),
            "neighbours": neighbours.cpu().numpy(),
            "neighbour_weights": pair(image.extras["neighbour_weights"][0]),
            "regulator_temperature": pair(details["temperatures"][:, 0, 0, :L]),
            "regulator_modulation": pair(details["modulations"][:, 0, 0, :L]),
            "regulator_word_region_weights": pair(details["step_attention"][:, 0, 0, :, :L].transpose(1, 2)),
            "nodes": pair(details["nodes"][0, 0, : L + 1]),
        }
        if self.cfg.module == "SGR":
            parts["sgr_edges"] = pair(torch.stack([details[f"sgr_edges{i}"][0, 0, : L + 1, : L + 1]
                                                   for i in range(self.cfg.sgr_step)]))  # fmt: skip
        else:
            parts["filtration_weights"] = pair(details["filtration_weights"][0, 0, : L + 1])
            parts["word_scores"] = parts["filtration_weights"][1:]
        if "amr_gate" in caption.extras:
            parts["amr_gate"] = pair(caption.extras["amr_gate"][0, :L])
        return Explanation(self.method_name, score, R, L, parts)


def build(run_cfg: RunConfig, vocab_size: int | None) -> CEFG:
    """``MethodSpec.build``: a CEFG-SGR or CEFG-SAF model from a run config."""
    cfg = run_cfg.model
    if not isinstance(cfg, CEFGConfig):
        raise TypeError(f"cefg build: run_cfg.model: expected CEFGConfig, found {type(cfg).__name__}")
    if run_cfg.data.region_drop > 0:
        raise ValueError(
            f"cefg build: data.region_drop: expected 0 (the context module needs every image's full, ordered region "
            f"set and its adjacency, cefg.md §3.3), found {run_cfg.data.region_drop}"
        )
    return CEFG(cfg, run_cfg.text, vocab_size)


# --- presets -------------------------------------------------------------------------------------
def _reference_train() -> TrainConfig:
    """cefg.md §5 (``opts.py`` defaults; the README just says ``python train.py``): Adam lr 2e-4,
    x0.1 at epoch 30 of 50, batch 32, clip 2, margin 0.2, **sum over all violating negatives**
    (``--max_violation`` is ``store_true`` here, off by default, §8.10), fp32, no warm-up."""
    return TrainConfig(
        epochs=50, batch_size=32, lr=2e-4, lr_decay_epochs=(30,), lr_decay_factor=0.1, optimizer="adam",
        weight_decay=0.0, backbone_lr_scale=0.1, grad_clip=2.0, margin=0.2, max_violation=False,
        sum_warmup_epochs=0, amp=False, eval_batch_size=100,
    )


def paper_preset(
    dataset: Literal["f30k", "coco"], module: Literal["SGR", "SAF"], text: Literal["bigru", "bert"] = "bigru"
) -> RunConfig:
    """The released recipe on real BUTD precomp data (set ``data.data_dir``; the adjacency file
    or boxes + image sizes must be there, see docs/cefg.md). Same recipe for both datasets (§5).

    ``text="bert"`` [itmkit design, §3.6; no code released]: a local Hugging Face encoder
    (``text.hf_path``; None = the offline MiniLM, set a ``bert-base-uncased`` folder for the
    paper) -> ``Linear(hidden, d)`` -> per-token l2, trained at 0.1 x lr (2e-5)."""
    text_cfg = TextConfig(kind="bigru", word_dim=300) if text == "bigru" else TextConfig(kind="hf", hf_path=None)
    return RunConfig(
        method="cefg",
        model=CEFGConfig(module=module),
        text=text_cfg,
        data=DataConfig(data_dir=None, region_drop=0.0, caption_augment=False, dev_max_captions=5000),
        train=_reference_train(),
    )


def course_preset(module: Literal["SGR", "SAF"] = "SGR", embedded: Literal["tiny", "course"] = "course") -> RunConfig:
    """CPU-sized CEFG (cefg.md §9) on an embedded set, adjacency built on the fly from its boxes.

    The sizes of SGRAF's course preset (:func:`itmkit.methods.sgraf.course_preset`: d = 64, s = 16,
    word dim 32, 12 regions, batch 32, Adam lr 2e-3, no dropout) with CEFG's modules; 5 epochs,
    decay at epoch 4. Departure from the released recipe, measured on the ``course`` set (test
    rsum, docs/cefg.md): the released sum over all violating negatives learns slowly at this size
    (397.6 after 5 epochs), so, as for SGRAF's course preset, the sum is a warm-up (3 epochs)
    before hardest negatives (SGR 529.0 in 90 s of training on 2 CPU threads, 541.8 with seed 1;
    SAF 548.4); a 2-epoch warm-up collapsed at the switch (155.2, every score alike) in one of two
    runs.
    """
    from itmkit.methods import sgraf

    run = sgraf.course_preset(module, embedded)
    epochs = 5 if embedded == "course" else 2
    sizes = {f.name: getattr(run.model, f.name) for f in dataclasses.fields(run.model) if hasattr(CEFGConfig, f.name)}
    run.method, run.model = "cefg", CEFGConfig(**sizes)
    run.train = dataclasses.replace(
        run.train, epochs=epochs, lr_decay_epochs=(max(1, epochs - 1),),
        sum_warmup_epochs=max(1, (3 * epochs) // 5),  # course: 3 of 5 epochs; smoke: 1 of 2
    )
    return run


PRESETS = {
    "smoke": lambda: course_preset("SGR", "tiny"),
    "course": lambda: course_preset("SGR", "course"),
    "paper": lambda: paper_preset("f30k", "SGR"),
    **{
        f"paper-{dataset}-{text + '-' if text == 'bert' else ''}{module.lower()}": (
            lambda dataset=dataset, module=module, text=text: paper_preset(dataset, module, text)
        )
        for dataset in ("f30k", "coco")
        for text in ("bigru", "bert")
        for module in ("SGR", "SAF")
    },
}


# --- checkpoint import (§7): what the reference train.py writes -----------------------------------
#: The reference's inline global attention -> the VisualSA layers itmkit reuses for it.
_CONTEXT_ATTENTION_KEYS = [
    ("emb_local_li.", "context_attention.embedding_local.0."),
    ("emb_local_bn.", "context_attention.embedding_local.1."),
    ("emb_global_li.", "context_attention.embedding_global.0."),
    ("emb_global_bn.", "context_attention.embedding_global.1."),
    ("emb_common.", "context_attention.embedding_common.0."),
]


def reference_state_to_itmkit(parts: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``[img_enc, txt_enc, sim_enc]`` as ``train.py`` saves them -> one :class:`CEFG` state dict:
    SGRAF's mapping (``image.fc``, ``text.rnn`` + a zero ``<mask>`` row, ``sim.*``) with the
    inline global attention renamed (``emb_local_li`` -> ``context_attention.embedding_local.0``, ...)."""
    state = sgraf_state_to_itmkit(parts)
    sim = {k[len("sim.") :]: v for k, v in state.items() if k.startswith("sim.")}
    state = {k: v for k, v in state.items() if not k.startswith("sim.")}
    state.update({f"sim.{k}": v for k, v in rename_keys(sim, _CONTEXT_ATTENTION_KEYS).items()})
    return state


def config_from_reference(parts: list[Mapping[str, Tensor]], opt: Any = None) -> CEFGConfig:
    """Model config of a ``train.py`` checkpoint: sizes from the tensors, switches from ``opt``."""
    if len(parts) != 3:
        raise ValueError(f"CEFG checkpoint 'model': expected [img_enc, txt_enc, sim_enc], found {len(parts)} state dicts")
    img, txt, sim = (strip_prefix(dict(p)) for p in parts)
    for name, part, key in (("img_enc", img, "fc.weight"), ("txt_enc", txt, "embed.weight"),
                            ("sim_enc", sim, "emb_local_bn.weight"), ("sim_enc", sim, "rcr_modules.0.rcr_smooth_w.0.weight")):
        if key not in part:
            raise KeyError(f"CEFG checkpoint {name}: expected key {key!r}, found keys {sorted(part)[:8]}...")
    return CEFGConfig(
        **reference_config_fields(img, txt, sim, opt, "CEFG"),
        num_regions=int(sim["emb_local_bn.weight"].shape[0]),
        rcr_steps=len({k.split(".")[1] for k in sim if k.startswith("rcr_modules.")}),
    )


#: ``opts.py`` names of the training settings a checkpoint's ``opt`` records (§5).
_RECIPE = {
    "epochs": ("num_epochs", int), "batch_size": ("batch_size", int), "lr": ("learning_rate", float),
    "grad_clip": ("grad_clip", float), "margin": ("margin", float), "max_violation": ("max_violation", bool),
}  # fmt: skip


def convert_checkpoint(source: str | Path | Mapping[str, Any]) -> tuple[RunConfig, dict[str, Tensor]]:
    """Import what the reference ``train.py`` saves (``checkpoint_{epoch}.pth.tar`` /
    ``model_best.pth.tar``: ``{'epoch', 'model': [img_enc, txt_enc, sim_enc], 'best_rsum',
    'opt', 'Eiters'}``, cefg.md §7; no checkpoint was released).

    Returns ``(run_config, state_dict)``; ``build(run_config, vocab_size=V + 1)`` then loads the
    state strictly. The run config is the paper preset of ``opt.data_name`` and the module with
    the checkpoint's sizes and ``opt``'s training settings (epochs, lr, batch, margin,
    ``max_violation``, ``lr_update``); ``text.vocab_path`` points to SCAN's vocabulary of that
    dataset when :func:`itmkit.paths.scan_text_dir` has it.
    """
    return convert_family_checkpoint(
        source, "CEFG", config_from_reference, paper_preset, reference_state_to_itmkit, CEFG, recipe=_RECIPE
    )


METHOD = MethodSpec(
    name="cefg",
    config_cls=CEFGConfig,
    build=build,
    presets=PRESETS,
    spec="cefg.md §3-§5",
    description="CEFG (MMM-design/CEFG, 2025): SGRAF + spatial context from the detection boxes + RCAR's "
    "correspondence regulator; SGR or SAF, 'CEFG' = their ensemble",
    convert_checkpoint=convert_checkpoint,
    variants={"SGR": {"model.module": "SGR"}, "SAF": {"model.module": "SAF"}},
)
