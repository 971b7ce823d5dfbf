"""SGRAF: Similarity Graph Reasoning (SGR) and Attention Filtration (SAF), Diao et al. AAAI 2021.

Spec: ``../shared/methods/sgraf.md``. One model is either SGR or SAF (``SGRAFConfig.module``);
"SGRAF" in the paper's tables is the **ensemble** of an SGR and an SAF model, the average of
their similarity matrices (§4): train both, then
``itmkit.evaluate.ensemble.evaluate_ensemble([sims_sgr, sims_saf])``.

- encoders: SCAN's basic image encoder (``fc`` + per-region l2 norm, §3.1) and a bi-GRU with
  dropout 0.4 on the word embeddings and per-word l2 norm (§3.2);
- image-only and caption-only parts (VisualSA / TextSA global vectors, §3.3 a-b) run once per item
  at encode time and travel in ``Encoded.extras["global"]``;
- :meth:`SGRAF.score_block` runs the pairwise part (§3.3 c-f) for a whole block at once
  (:mod:`itmkit.models.sgraf_modules`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from itmkit.checkpoints import check_converted, open_reference_checkpoint, opt_value, reference_dataset, strip_prefix
from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig
from itmkit.config_checks import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from itmkit.data.embedded import PRESETS as EMBEDDED_PRESETS
from itmkit.data.embedded import embedded_feature_dim
from itmkit.encoded import Encoded
from itmkit.methods.registry import MethodSpec
from itmkit.models.base import MatchingModel
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.sgraf_modules import ATTENTION_SMOOTH, SimilarityEncoder
from itmkit.models.text_encoders import build_text_encoder
from itmkit.paths import scan_text_dir


@dataclass
class SGRAFConfig:
    """SGRAF model settings (sgraf.md §3.6; defaults = the reference ``opts.py``).

    ``num_regions`` is the region count the VisualSA ``BatchNorm1d`` is built for (§8.2): 36 for
    BUTD features and imported checkpoints; the embedded course sets use fewer.
    Booleans are explicit (the reference's ``--bi_gru`` / ``--max_violation`` are inverted
    ``store_false`` flags, §8.1).
    """

    module: Literal["SGR", "SAF"] = "SGR"
    img_dim: PositiveInt = 2048
    embed_size: PositiveInt = 1024
    sim_dim: PositiveInt = 256
    num_regions: PositiveInt = 36
    sgr_step: NonNegativeInt = 3
    bi_gru: bool = True
    num_layers: PositiveInt = 1
    word_dropout: Fraction = 0.4  # on the word embeddings (§3.2)
    self_attention_dropout: Fraction = 0.4  # VisualSA / TextSA embedding layers (§3.4)
    attention_smooth: PositiveFloat = ATTENTION_SMOOTH  # λ = 9, hard-coded in the reference (§8.4)
    no_imgnorm: bool = False
    no_txtnorm: bool = False


class SGRAF(MatchingModel):
    """SGR or SAF model (sgraf.md §3): ``image`` encoder, ``text`` encoder, ``sim`` similarity encoder.

    Submodules: ``image`` (:class:`PrecompRegionEncoder`, ``fc`` only), ``text``
    (:class:`~itmkit.models.text_encoders.BiGRUTextEncoder` or a Hugging Face encoder),
    ``sim`` (:class:`~itmkit.models.sgraf_modules.SimilarityEncoder`, reference key names).
    """

    pairwise = True

    def __init__(self, cfg: SGRAFConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = PrecompRegionEncoder(
            cfg.img_dim, cfg.embed_size, mlp_residual=False, l2_regions=not cfg.no_imgnorm
        )
        options: dict[str, Any] = {"l2_words": not cfg.no_txtnorm}
        if text_cfg.kind == "bigru":
            options.update(bidirectional=cfg.bi_gru, word_dropout=cfg.word_dropout, num_layers=cfg.num_layers)
        self.text = build_text_encoder(text_cfg, cfg.embed_size, vocab_size, **options)
        self.sim = SimilarityEncoder(
            cfg.embed_size, cfg.sim_dim, cfg.module, cfg.num_regions, cfg.sgr_step,
            cfg.self_attention_dropout, cfg.attention_smooth,
        )

    # --- encoding ------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, K, img_dim]``, ``lengths [B]`` -> regions ``[B, R, d]`` (``R = num_regions``;
        fewer regions are zero-padded up to it) with ``extras["global"] [B, d]`` (VisualSA)."""
        n_regions = self.cfg.num_regions
        if images.shape[1] > n_regions:
            raise ValueError(
                f"SGRAF images: expected at most num_regions={n_regions} regions per image (VisualSA's "
                f"BatchNorm1d is built for that many, sgraf.md §8.2), found {images.shape[1]}; "
                f"set model.num_regions to the data's region count"
            )
        regions = self.image(images, lengths)
        if regions.shape[1] < n_regions:
            regions = torch.cat([regions, regions.new_zeros(regions.shape[0], n_regions - regions.shape[1], regions.shape[2])], 1)
        encoded = Encoded(regions, lengths.to(regions.device))
        full = bool((encoded.lengths == n_regions).all())
        image_global = self.sim.global_image(regions, None if full else encoded.mask)
        return Encoded(regions, encoded.lengths, {"global": image_global})

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]``, ``lengths [B]`` -> words ``[B, L, d]`` with ``extras["global"] [B, d]`` (TextSA)."""
        words = self.text(tokens, lengths)
        encoded = Encoded(words, lengths.to(words.device))
        return Encoded(words, encoded.lengths, {"global": self.sim.global_caption(words, encoded.mask)})

    # --- scoring -------------------------------------------------------------------------------
    @staticmethod
    def _region_mask(images: Encoded) -> Tensor | None:
        # the reference has no region mask (all regions count); only padded sets need one
        if images.lengths is None or bool((images.lengths == images.feats.shape[1]).all()):
            return None
        return images.mask

    def score_block(self, images: Encoded, captions: Encoded, details: dict | None = None) -> Tensor:
        """``[n_img, n_cap]`` sigmoid scores of every pair of the two blocks (§3.3 c-f), in one
        vectorised pass; ``details`` (a dict) receives the intermediates (see
        :meth:`SimilarityEncoder.score_block`)."""
        dtype = self.sim.sim_eval_w.weight.dtype
        if images.feats.dtype != dtype:
            # reduced-precision blocks (the engine's CUDA option) meet fp32 weights: the similarity
            # layers and the sigmoid scores run in the weights' precision
            images, captions = images.to(dtype=dtype), captions.to(dtype=dtype)
        return self.sim.score_block(
            images.feats, images.extras["global"], captions.feats, captions.extras["global"],
            captions.mask, self._region_mask(images), details,
        )

    def explain(self, images: Encoded, captions: Encoded) -> dict[str, Tensor]:
        """Scores and intermediates of a small block, for pictures: ``scores [n, c]``,
        ``attention [n, c, R, L]``, ``attended [n, c, L, d]``, ``nodes [n, c, L+1, s]``,
        SAF ``filtration_weights [n, c, L+1]``
        or SGR ``sgr_step{i}``/``sgr_edges{i}``, ``vector [n, c, s]``."""
        details: dict[str, Tensor] = {}
        with torch.no_grad():
            details["scores"] = self.score_block(images, captions, details)
        return details

    def pair_workspace_bytes(self, images: Encoded, captions: Encoded) -> int:
        """Bytes per (image, caption) pair that :meth:`score_block` holds at its peak.

        Without grad: one ``[L, d]`` attended tensor (normalised, differenced and squared in
        place), ~4 ``[R, L]`` attention temporaries, ~3 ``[L+1, s]`` node tensors, 2 ``[L+1, L+1]``
        edge tensors and 2 ``[d]`` global differences. With grad autograd keeps ~3 ``[L, d]``,
        ~8 ``[R, L]``, ``2 * steps + 2`` ``[L+1, s]`` and ``2 * steps`` edge tensors. Checked
        against the profiler's peak at f30k sizes (d 1024, s 256, 36 regions, L 20, 48 x 48
        pairs): the estimate is 1.2-1.5x the measured peak (SGR no grad 129 KiB/pair measured).
        """
        R = images.feats.shape[1]
        L = captions.feats.shape[1]
        d = captions.feats.shape[-1]
        s = self.cfg.sim_dim
        steps = self.cfg.sgr_step if self.cfg.module == "SGR" else 1
        elem = captions.feats.element_size()
        if torch.is_grad_enabled():
            count = 8 * R * L + 3 * L * d + (2 * steps + 2) * (L + 1) * s + 2 * steps * (L + 1) ** 2 + 3 * d
        else:
            count = 4 * R * L + L * d + 3 * (L + 1) * s + 2 * (L + 1) ** 2 + 2 * d
        return elem * count


def build(run_cfg: RunConfig, vocab_size: int | None) -> SGRAF:
    """``MethodSpec.build``: an SGR or SAF model from a run config."""
    cfg = run_cfg.model
    if not isinstance(cfg, SGRAFConfig):
        raise TypeError(f"sgraf build: run_cfg.model: expected SGRAFConfig, found {type(cfg).__name__}")
    return SGRAF(cfg, run_cfg.text, vocab_size)


# --- presets -------------------------------------------------------------------------------------
def _reference_train(epochs: int, lr_update: int) -> TrainConfig:
    """sgraf.md §5: Adam (no weight decay) lr 2e-4, x0.1 at ``lr_update``, batch 128, clip 2,
    margin 0.2, hardest negatives from the first step (no sum-mode warm-up), fp32."""
    return TrainConfig(
        epochs=epochs, batch_size=128, lr=2e-4, lr_decay_epochs=(lr_update,), lr_decay_factor=0.1,
        optimizer="adam", weight_decay=0.0, grad_clip=2.0, margin=0.2, max_violation=True,
        sum_warmup_epochs=0, amp=False, eval_batch_size=100,
    )


def _reference_data() -> DataConfig:
    """No augmentation and no region dropping (§5); ``data_dir`` is the user's precomp folder."""
    return DataConfig(data_dir=None, region_drop=0.0, caption_augment=False, dev_max_captions=5000)


# README recipes (§5): (epochs, lr_update) per (dataset, module)
_RECIPES: dict[tuple[str, str], tuple[int, int]] = {
    ("f30k", "SGR"): (40, 30),
    ("f30k", "SAF"): (30, 20),
    ("coco", "SGR"): (20, 10),
    ("coco", "SAF"): (20, 10),
}


def paper_preset(dataset: Literal["f30k", "coco"], module: Literal["SGR", "SAF"]) -> RunConfig:
    """The README recipe for ``dataset`` and ``module`` on real BUTD precomp data (set
    ``data.data_dir``); bi-GRU text, 36 regions, d = 1024, s = 256."""
    epochs, lr_update = _RECIPES[(dataset, module)]
    return RunConfig(
        method="sgraf",
        model=SGRAFConfig(module=module),
        text=TextConfig(kind="bigru", word_dim=300),
        data=_reference_data(),
        train=_reference_train(epochs, lr_update),
    )


def embedded_shape(embedded: str) -> tuple[int, int]:
    """``(n_regions, feature_dim)`` of an embedded set preset, from the data module's own settings
    (VisualSA's BatchNorm needs the exact region count)."""
    preset = EMBEDDED_PRESETS[embedded]
    return preset.n_regions, embedded_feature_dim(embedded)


def course_preset(module: Literal["SGR", "SAF"] = "SGR", embedded: Literal["tiny", "course"] = "course") -> RunConfig:
    """CPU-sized SGRAF (sgraf.md §9) on an embedded set: d = 64, s = 16, word dim 32, batch 32,
    Adam lr 2e-3 (§9: the synthetic signal is weak at 2e-4), decay at ~2/3 of the epochs.

    Two departures from the paper recipe, both because the small model does not learn without
    them (measured on the embedded sets and on a toy task, see docs/sgraf.md):
    - no dropout: at d = 64 a 0.4 dropout on the word embeddings and the self-attention layers
      leaves SAF at chance;
    - sum-of-hinges warm-up for the first half of the epochs: with sigmoid scores, hardest
      negatives shrink every score to one value (loss stuck at ``2 * batch * margin``) unless the
      model already ranks well when they start. Measured on the ``course`` set (test rsum, seed
      0 / 1): SGR with lr 1e-3 and a 2-epoch warm-up collapsed at the switch (185.0 / 251.4); with
      lr 2e-3 and 3 warm-up epochs it reached 552.0 / 553.6, and SAF 553.0 (543.4 before).
    """
    n_regions, feature_dim = embedded_shape(embedded)
    epochs = 6 if embedded == "course" else 2
    return RunConfig(
        method="sgraf",
        model=SGRAFConfig(
            module=module, img_dim=feature_dim, embed_size=64, sim_dim=16, num_regions=n_regions,
            word_dropout=0.0, self_attention_dropout=0.0,
        ),
        text=TextConfig(kind="bigru", word_dim=32),
        data=DataConfig(data_dir=None, embedded_preset=embedded, region_drop=0.0, caption_augment=False),
        train=dataclasses.replace(
            _reference_train(epochs, max(1, (2 * epochs) // 3)), batch_size=32, lr=2e-3, eval_batch_size=128,
            sum_warmup_epochs=max(1, epochs // 2),  # course: 3 of 6 epochs; smoke: 1 of 2
        ),
    )


PRESETS = {
    "smoke": lambda: course_preset("SGR", "tiny"),
    "course": lambda: course_preset("SGR", "course"),
    "paper": lambda: paper_preset("f30k", "SGR"),
    "paper-f30k-sgr": lambda: paper_preset("f30k", "SGR"),
    "paper-f30k-saf": lambda: paper_preset("f30k", "SAF"),
    "paper-coco-sgr": lambda: paper_preset("coco", "SGR"),
    "paper-coco-saf": lambda: paper_preset("coco", "SAF"),
}


# --- checkpoint import (§7) ------------------------------------------------------------------------
def _reference_text_key(key: str) -> str:
    # the reference names the GRU ``cap_rnn``; itmkit's BiGRUTextEncoder calls it ``rnn``
    return "rnn." + key[len("cap_rnn.") :] if key.startswith("cap_rnn.") else key


def reference_state_to_itmkit(parts: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``[img_enc, txt_enc, sim_enc]`` reference state dicts -> one :class:`SGRAF` state dict.

    - ``img_enc.fc.*`` -> ``image.fc.*``; ``txt_enc.cap_rnn.*`` -> ``text.rnn.*``;
      ``sim_enc.*`` -> ``sim.*`` unchanged (same names);
    - ``txt_enc.embed.weight [V, 300]`` gains one zero row: itmkit's word-id pipeline appends
      ``<mask>`` (id V) to every vocabulary; SGRAF never masks, so the row is never read.
    """
    if len(parts) != 3:
        raise ValueError(f"SGRAF checkpoint 'model': expected [img_enc, txt_enc, sim_enc], found {len(parts)} state dicts")
    img, txt, sim = (strip_prefix(dict(p)) for p in parts)
    state: dict[str, Tensor] = {f"image.{k}": v for k, v in img.items()}
    for key, value in txt.items():
        if key == "embed.weight":
            value = torch.cat([value, value.new_zeros(1, value.shape[1])], 0)
        state[f"text.{_reference_text_key(key)}"] = value
    state.update({f"sim.{k}": v for k, v in sim.items()})
    return state


def config_from_reference(parts: list[Mapping[str, Tensor]], opt: Any = None) -> SGRAFConfig:
    """Model config of a reference checkpoint: shapes from the state dicts, switches from ``opt``.

    The module (SGR / SAF) is read from the keys (``SGR_module.*`` / ``SAF_module.*``) and must
    agree with ``opt.module_name`` when that is present."""
    img, txt, sim = (strip_prefix(dict(p)) for p in parts)
    for name, part, key in (("img_enc", img, "fc.weight"), ("txt_enc", txt, "embed.weight"),
                            ("sim_enc", sim, "sim_tranloc_w.weight")):
        if key not in part:
            raise KeyError(f"SGRAF checkpoint {name}: expected key {key!r}, found keys {sorted(part)[:8]}...")
    sgr = sorted({int(k.split(".")[1]) for k in sim if k.startswith("SGR_module.")})
    module = "SGR" if sgr else "SAF" if any(k.startswith("SAF_module.") for k in sim) else None
    if module is None:
        raise KeyError("SGRAF checkpoint sim_enc: expected SGR_module.* or SAF_module.* keys, found neither")
    declared = opt_value(opt, "module_name")
    if declared is not None and declared != module:
        raise ValueError(f"SGRAF checkpoint opt.module_name: expected {module!r} (from the keys), found {declared!r}")
    embed_size, img_dim = img["fc.weight"].shape
    return SGRAFConfig(
        module=module,
        img_dim=int(img_dim),
        embed_size=int(embed_size),
        sim_dim=int(sim["sim_tranloc_w.weight"].shape[0]),
        num_regions=int(sim["v_global_w.embedding_local.1.weight"].shape[0]),
        sgr_step=len(sgr) if sgr else int(opt_value(opt, "sgr_step", 3)),
        bi_gru=any(k.endswith("_reverse") for k in txt),
        num_layers=int(opt_value(opt, "num_layers", 1)),
        no_imgnorm=bool(opt_value(opt, "no_imgnorm", False)),
        no_txtnorm=bool(opt_value(opt, "no_txtnorm", False)),
    )


def convert_checkpoint(source: str | Path | Mapping[str, Any]) -> tuple[RunConfig, dict[str, Tensor]]:
    """Import a released SGRAF checkpoint (``model_best.pth.tar``, sgraf.md §7).

    Args:
        source: the file, or the already loaded dict (``{"model": [img, txt, sim], "opt": ...,
            "epoch": ...}``).

    Returns:
        ``(run_config, state_dict)``; ``build(run_config, vocab_size=V + 1)`` then loads the state
        dict strictly. The run config is the matching paper preset (dataset from ``opt.data_name``)
        with the shapes of the checkpoint; ``text.vocab_path`` points to the real SCAN vocabulary
        of that dataset when :func:`itmkit.paths.scan_text_dir` has it (ids must match the
        embedding rows). ``opt``'s cluster paths are ignored.
    """
    name, checkpoint = open_reference_checkpoint(source)
    parts = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(parts, (list, tuple)):
        raise ValueError(f"{name}: field 'model': expected a list [img_enc, txt_enc, sim_enc], found {type(parts).__name__}")
    opt = checkpoint.get("opt")
    model_cfg = config_from_reference(list(parts), opt)
    dataset = reference_dataset(opt)
    run_cfg = paper_preset(dataset, model_cfg.module)
    run_cfg.model = model_cfg
    run_cfg.preset = f"paper-{dataset}-{model_cfg.module.lower()}"
    txt = strip_prefix(dict(parts[1]))
    run_cfg.text = dataclasses.replace(run_cfg.text, word_dim=int(txt["embed.weight"].shape[1]))
    vocab = scan_text_dir() / "vocab" / f"{dataset}_precomp_vocab.json"
    if vocab.is_file():
        run_cfg.text.vocab_path = str(vocab)
    state = reference_state_to_itmkit(list(parts))
    check_converted(SGRAF(model_cfg, run_cfg.text, int(txt["embed.weight"].shape[0]) + 1), state, name, "SGRAF")
    return run_cfg, state


METHOD = MethodSpec(
    name="sgraf",
    config_cls=SGRAFConfig,
    build=build,
    presets=PRESETS,
    spec="sgraf.md §3-§5",
    description="SGRAF (Diao et al., AAAI 2021): similarity vectors + graph reasoning (SGR) or "
    "attention filtration (SAF); 'SGRAF' = SGR + SAF ensemble",
    convert_checkpoint=convert_checkpoint,
    variants={"SGR": {"model.module": "SGR"}, "SAF": {"model.module": "SAF"}},
)
