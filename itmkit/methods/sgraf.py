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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from itmkit.checkpoints import (
    apply_reference_recipe,
    check_converted,
    open_reference_checkpoint,
    opt_value,
    reference_dataset,
    strip_prefix,
)
from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig
from itmkit.config_checks import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from itmkit.data.embedded import PRESETS as EMBEDDED_PRESETS
from itmkit.data.embedded import embedded_feature_dim
from itmkit.encoded import Encoded
from itmkit.methods.registry import MethodSpec
from itmkit.models.base import WORD_REGION_WEIGHTS, Explanation, MatchingModel, as_numpy, check_one_pair, eval_mode
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
    method_name = "sgraf"
    similarity_prefixes = ("sim.",)

    def __init__(self, cfg: SGRAFConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = self._image_encoder(cfg)
        self.text = self._text_encoder(cfg, text_cfg, vocab_size)
        self.sim = SimilarityEncoder(
            cfg.embed_size, cfg.sim_dim, cfg.module, cfg.num_regions, cfg.sgr_step,
            cfg.self_attention_dropout, cfg.attention_smooth,
        )

    # --- parts (subclasses with other encoders, e.g. LHSC, override these) ----------------------
    def _image_encoder(self, cfg: SGRAFConfig) -> nn.Module:
        """``(images [B, K, img_dim], lengths [B]) -> [B, K, d]``: SCAN's ``fc`` + l2 norm (§3.1)."""
        return PrecompRegionEncoder(cfg.img_dim, cfg.embed_size, mlp_residual=False, l2_regions=not cfg.no_imgnorm)

    def _text_encoder(self, cfg: SGRAFConfig, text_cfg: TextConfig, vocab_size: int | None, **options: Any) -> nn.Module:
        """``(tokens [B, L], lengths [B]) -> [B, L, d]``: the bi-GRU of §3.2 (or a Hugging Face
        encoder); ``options`` go to the bi-GRU's constructor."""
        options["l2_words"] = not cfg.no_txtnorm
        if text_cfg.kind == "bigru":
            options.update(bidirectional=cfg.bi_gru, word_dropout=cfg.word_dropout, num_layers=cfg.num_layers)
        return build_text_encoder(text_cfg, cfg.embed_size, vocab_size, **options)

    # --- encoding ------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, K, img_dim]``, ``lengths [B]`` -> regions ``[B, R, d]`` (``R = num_regions``;
        fewer regions are zero-padded up to it) with ``extras["global"] [B, d]`` (VisualSA)."""
        self._check_region_count(images)
        return self.images_from_regions(self.image(images, lengths), lengths)

    def _check_region_count(self, images: Tensor) -> None:
        n_regions = self.cfg.num_regions
        if images.shape[1] > n_regions:
            raise ValueError(
                f"SGRAF images: expected at most num_regions={n_regions} regions per image (VisualSA's "
                f"BatchNorm1d is built for that many, sgraf.md §8.2), found {images.shape[1]}; "
                f"set model.num_regions to the data's region count"
            )

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]``, ``lengths [B]`` -> words ``[B, L, d]`` with ``extras["global"] [B, d]`` (TextSA)."""
        return self.captions_from_words(self.text(tokens, lengths), lengths)

    def images_from_regions(self, regions: Tensor, lengths: Tensor) -> Encoded:
        """Region embeddings ``[B, K, d]`` (``K <= num_regions``) -> regions zero-padded to
        ``num_regions`` with ``extras["global"] [B, d]`` (VisualSA, §3.3 a)."""
        n_regions = self.cfg.num_regions
        if regions.shape[1] > n_regions:
            raise ValueError(
                f"SGRAF regions: expected at most num_regions={n_regions} per image (VisualSA's BatchNorm1d "
                f"is built for that many, sgraf.md §8.2), found {regions.shape[1]}"
            )
        if regions.shape[1] < n_regions:
            regions = torch.cat([regions, regions.new_zeros(regions.shape[0], n_regions - regions.shape[1], regions.shape[2])], 1)
        encoded = Encoded(regions, lengths.to(regions.device))
        full = bool((encoded.lengths == n_regions).all())
        image_global = self.sim.global_image(regions, None if full else encoded.mask)
        return Encoded(regions, encoded.lengths, {"global": image_global})

    def captions_from_words(self, words: Tensor, lengths: Tensor) -> Encoded:
        """Word embeddings ``[B, L, d]`` -> the same with ``extras["global"] [B, d]`` (TextSA, §3.3 b)."""
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
        vectorised pass; ``details`` (a dict) receives the padded intermediates (see
        :meth:`SimilarityEncoder.score_block`; :meth:`explain` gives one pair's, unpadded)."""
        dtype = self.sim.sim_eval_w.weight.dtype
        if images.feats.dtype != dtype:
            # reduced-precision blocks (the engine's CUDA option) meet fp32 weights: the similarity
            # layers and the sigmoid scores run in the weights' precision
            images, captions = images.to(dtype=dtype), captions.to(dtype=dtype)
        return self.sim.score_block(
            images.feats, images.extras["global"], captions.feats, captions.extras["global"],
            captions.mask, self._region_mask(images), details,
        )

    @torch.no_grad()
    def explain(self, image: Encoded, caption: Encoded) -> Explanation:
        """How SGR / SAF scores one image against one caption (``len == 1`` each), unpadded.

        Node 0 of the similarity graph is the global alignment, node ``t`` (1-based) word ``t - 1``
        of the caption (``<start>``/``<end>`` included). Parts:

        - ``word_region_weights [n_words, n_regions]``: each word's attention over the regions
          (§3.3 c, λ = 9; rows sum to 1);
        - ``similarity_vectors [n_words + 1, s]``: the graph nodes, unit vectors (§3.3 d);
        - SGR: ``graph_edges [steps, n_words + 1, n_words + 1]``: the edge matrix of every reasoning
          step (row = receiving node, column = sending node; rows sum to 1; §3.3 e1);
        - SAF: ``filtration_weights [n_words + 1]``: each node's share of the filtered sum (sum 1; §3.3 e2);
        - ``similarity_vector [s]``: what ``sim_eval_w`` reads (SGR: node 0 after the last step;
          SAF: the filtered sum), whose sigmoid-activated projection is the score (§3.3 f).
        """
        n_regions, n_words = check_one_pair(image, caption)
        details: dict[str, Tensor] = {}
        with eval_mode(self):
            self.score_block(image.slice(0, 1), caption.slice(0, 1), details)
            score = float(self.similarity(image, caption)[0, 0])
        nodes = n_words + 1
        parts = {
            WORD_REGION_WEIGHTS: as_numpy(details["attention"][0, 0, :n_regions, :n_words].t()),
            "similarity_vectors": as_numpy(details["nodes"][0, 0, :nodes]),
            "similarity_vector": as_numpy(details["vector"][0, 0]),
        }
        if self.cfg.module == "SGR":
            edges = [details[f"sgr_edges{i}"][0, 0, :nodes, :nodes] for i in range(len(self.sim.SGR_module))]
            parts["graph_edges"] = as_numpy(torch.stack(edges))
        else:
            parts["filtration_weights"] = as_numpy(details["filtration_weights"][0, 0, :nodes])
        return Explanation(self.method_name, score, n_regions, n_words, parts)

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
            max_violation=False,  # else hardest negatives from the first step, whatever the warm-up
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


def config_from_reference(
    parts: list[Mapping[str, Tensor]], opt: Any = None, similarity_only: bool = False
) -> SGRAFConfig:
    """Model config of a reference checkpoint: shapes from the state dicts, switches from ``opt``.

    The module (SGR / SAF) is read from the keys (``SGR_module.*`` / ``SAF_module.*``) and must
    agree with ``opt.module_name`` when that is present. ``similarity_only``: ``img_enc`` and
    ``txt_enc`` may be empty; ``embed_size`` then comes from ``sim_enc`` and ``img_dim`` /
    ``bi_gru`` keep their defaults (the encoders are not loaded)."""
    img, txt, sim = (strip_prefix(dict(p)) for p in parts)
    required = (("img_enc", img, "fc.weight"), ("txt_enc", txt, "embed.weight"), ("sim_enc", sim, "sim_tranloc_w.weight"))
    for name, part, key in required[2:] if similarity_only else required:
        if key not in part:
            raise KeyError(f"SGRAF checkpoint {name}: expected key {key!r}, found keys {sorted(part)[:8]}...")
    num_regions = int(sim["v_global_w.embedding_local.1.weight"].shape[0])
    return SGRAFConfig(**reference_config_fields(img, txt, sim, opt, "SGRAF"), num_regions=num_regions)


def reference_config_fields(
    img: Mapping[str, Tensor], txt: Mapping[str, Tensor], sim: Mapping[str, Tensor], opt: Any, method: str
) -> dict[str, Any]:
    """The config fields every SGRAF-family checkpoint determines the same way: ``module`` from the
    ``SGR_module.*`` / ``SAF_module.*`` keys (checked against ``opt.module_name`` when present),
    sizes from the tensors, the switches from ``opt``. ``method`` names the checkpoint in errors."""
    sgr = sorted({int(k.split(".")[1]) for k in sim if k.startswith("SGR_module.")})
    module = "SGR" if sgr else "SAF" if any(k.startswith("SAF_module.") for k in sim) else None
    if module is None:
        raise KeyError(f"{method} checkpoint sim_enc: expected SGR_module.* or SAF_module.* keys, found neither")
    declared = opt_value(opt, "module_name")
    if declared is not None and declared != module:
        raise ValueError(f"{method} checkpoint opt.module_name: expected {module!r} (from the keys), found {declared!r}")
    if "fc.weight" in img:
        embed_size, img_dim = img["fc.weight"].shape
    else:  # similarity only: sim_tranloc_w is Linear(embed_size, sim_dim)
        embed_size, img_dim = sim["sim_tranloc_w.weight"].shape[1], SGRAFConfig.img_dim
    return {
        "module": module,
        "img_dim": int(img_dim),
        "embed_size": int(embed_size),
        "sim_dim": int(sim["sim_tranloc_w.weight"].shape[0]),
        "sgr_step": len(sgr) if sgr else int(opt_value(opt, "sgr_step", 3)),
        "bi_gru": any(k.endswith("_reverse") for k in txt) if txt else SGRAFConfig.bi_gru,
        "num_layers": int(opt_value(opt, "num_layers", 1)),
        "no_imgnorm": bool(opt_value(opt, "no_imgnorm", False)),
        "no_txtnorm": bool(opt_value(opt, "no_txtnorm", False)),
    }


def read_reference_parts(source: str | Path | Mapping[str, Any]) -> tuple[str, list[Mapping[str, Tensor]], Any]:
    """``(label, [img_enc, txt_enc, sim_enc], opt)`` of a checkpoint as the SGRAF-family ``train.py``
    saves it (``{'model': [...], 'opt': ..., 'epoch': ...}``; a path or the loaded dict)."""
    name, checkpoint = open_reference_checkpoint(source)
    parts = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(parts, (list, tuple)):
        raise ValueError(f"{name}: field 'model': expected a list [img_enc, txt_enc, sim_enc], found {type(parts).__name__}")
    return name, list(parts), checkpoint.get("opt")


def use_reference_text(run_cfg: RunConfig, parts: list[Mapping[str, Tensor]], dataset: str) -> int:
    """Set ``run_cfg.text`` for a reference bi-GRU (word dim from ``txt_enc.embed.weight``, SCAN's
    vocabulary of ``dataset`` when :func:`itmkit.paths.scan_text_dir` has it: ids must match the
    embedding rows); returns the model's id count (the reference vocabulary + itmkit's ``<mask>``)."""
    embed = strip_prefix(dict(parts[1]))["embed.weight"]
    run_cfg.text = dataclasses.replace(run_cfg.text, word_dim=int(embed.shape[1]))
    vocab = scan_text_dir() / "vocab" / f"{dataset}_precomp_vocab.json"
    if vocab.is_file():
        run_cfg.text.vocab_path = str(vocab)
    return int(embed.shape[0]) + 1


def convert_checkpoint(
    source: str | Path | Mapping[str, Any], *, similarity_only: bool = False
) -> tuple[RunConfig, dict[str, Tensor]]:
    """Import a released SGRAF checkpoint (``model_best.pth.tar``, sgraf.md §7).

    Args:
        source: the file, or the already loaded dict (``{"model": [img, txt, sim], "opt": ...,
            "epoch": ...}``).
        similarity_only: convert ``sim_enc`` alone (``img_enc`` / ``txt_enc`` may be empty or
            anything): the state holds the ``sim.*`` keys only, for
            :func:`itmkit.checkpoints.load_similarity_part` and
            :func:`itmkit.similarity.scoring.score_sets` on features you hold.

    Returns:
        ``(run_config, state_dict)``; ``build(run_config, vocab_size=V + 1)`` then loads the state
        dict strictly. The run config is the matching paper preset (dataset from ``opt.data_name``)
        with the shapes of the checkpoint; ``text.vocab_path`` points to the real SCAN vocabulary
        of that dataset when :func:`itmkit.paths.scan_text_dir` has it (ids must match the
        embedding rows). ``opt``'s cluster paths are ignored.
    """
    if similarity_only:
        name, parts, opt = read_reference_parts(source)
        if len(parts) != 3:
            raise ValueError(f"SGRAF checkpoint 'model': expected [img_enc, txt_enc, sim_enc], found {len(parts)} state dicts")
        model_cfg = config_from_reference(parts, opt, similarity_only=True)
        dataset = reference_dataset(opt)
        run_cfg = paper_preset(dataset, model_cfg.module)
        run_cfg.model = model_cfg
        run_cfg.preset = f"paper-{dataset}-{model_cfg.module.lower()}"
        state = {f"sim.{k}": v for k, v in strip_prefix(dict(parts[2])).items()}
        check_converted(SGRAF(model_cfg, run_cfg.text, 2).sim, strip_prefix(state, "sim."), name, "SGRAF similarity")
        return run_cfg, state
    return convert_family_checkpoint(source, "SGRAF", config_from_reference, paper_preset, reference_state_to_itmkit, SGRAF)


def convert_family_checkpoint(
    source: str | Path | Mapping[str, Any], method: str, config_from_parts: Callable[..., Any],
    preset: Callable[[str, str], RunConfig], state_from_parts: Callable[..., dict[str, Tensor]],
    model_cls: Callable[..., MatchingModel], recipe: Mapping[str, tuple[str, Any]] | None = None,
) -> tuple[RunConfig, dict[str, Tensor]]:
    """The import every SGRAF-family ``train.py`` checkpoint shares (``{'model': [img_enc, txt_enc,
    sim_enc], 'opt', ...}``): ``config_from_parts(parts, opt)`` -> the model config,
    ``preset(dataset, module)`` -> the run config (dataset from ``opt.data_name``), ``recipe``
    (optional) copies ``opt``'s training settings (:func:`itmkit.checkpoints.apply_reference_recipe`),
    the bi-GRU text settings from the embedding, ``state_from_parts(parts)`` -> the state dict,
    checked against a fresh ``model_cls(config, text, vocab_size)``."""
    name, parts, opt = read_reference_parts(source)
    model_cfg = config_from_parts(parts, opt)
    dataset = reference_dataset(opt)
    run_cfg = preset(dataset, model_cfg.module)
    run_cfg.model = model_cfg
    run_cfg.preset = f"paper-{dataset}-{model_cfg.module.lower()}"
    if recipe is not None:
        apply_reference_recipe(run_cfg.train, opt, recipe)
    vocab_size = use_reference_text(run_cfg, parts, dataset)
    state = state_from_parts(parts)
    check_converted(model_cls(model_cfg, run_cfg.text, vocab_size), state, name, method)
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
