"""CHAN: Cross-modal Hard Aligning Network (Pan, Wu, Zhang, CVPR 2023). Spec: ``chan.md``.

Every word is matched to its single most similar region (*hard assignment coding*) and the
per-word scores are pooled with a log-sum-exp; the similarity has no parameters
(:mod:`itmkit.models.coding`). The model is an image encoder (``fc`` + optional pre-LN
self-attention over the regions) and a per-token text encoder (BiGRU with the extra ``<mask>``
id, or a BERT-like transformer + Linear), both l2-normalised per region / word (§3.1–§3.2),
trained with the VSE++ hinge (margin 0.05, hardest negatives after one sum-mode epoch, §5).

Public: :class:`CHANConfig`, :class:`CHAN`, :class:`CHANImageEncoder`,
:class:`CHANBiGRUTextEncoder`, :class:`RegionSelfAttention`, :func:`convert_checkpoint`,
:func:`load_reference_checkpoint`, ``METHOD`` (presets ``smoke``, ``course``, ``paper``,
``paper-{f30k,coco}-{bigru,bert}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig
from itmkit.config_checks import OneOf, PositiveFloat, PositiveInt
from itmkit.data.embedded import embedded_feature_dim
from itmkit.encoded import Encoded
from itmkit.methods.registry import MethodSpec
from itmkit.models import coding
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
from itmkit.models.functional import l2norm, zero_padding
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.text_encoders import BiGRUTextEncoder, HFTextEncoder


CodingName = Annotated[str, OneOf(tuple(coding.CODINGS))]
PoolingName = Annotated[str, OneOf(tuple(coding.POOLINGS))]


@dataclass
class CHANConfig:
    """CHAN's model options (chan.md §3; reference option names in brackets).

    Attributes:
        embed_size: joint space size ``d`` [``embed_size``].
        img_dim: region feature size ``D`` of the precomp data [``img_dim``].
        image_encoder: ``"basic"`` (fc only; BERT models) or ``"selfattention"`` (fc + pre-LN
            residual multi-head self-attention; BiGRU models) [``precomp_enc_type``].
        attention_heads: heads of the region self-attention (8 in the reference).
        attention_padding_mask: the reference passes **no** key-padding mask, so padded regions
            (``fc.bias`` after the fc) are attended to in training (§8.4); ``False`` reproduces it
            (checkpoints were trained that way), ``True`` masks them (padding-invariant encoder).
        coding: ``"vha"`` (CHAN), ``"tha"``, ``"vsa"``, ``"t2i"`` [``coding_type``], see
            :data:`itmkit.models.coding.CODINGS`.
        pooling: ``"lse"`` (paper, BiGRU scripts), ``"mean"`` (current BERT scripts), ``"max"``,
            ``"sum"``, ``"softmax"`` [``pooling_type``].
        belta: LSE / softmax pooling temperature (code scale, §8.1) [``belta``].
        alpha: VSA coding temperature [``alpha``].
        smooth: softmax scale of the t2i coding (SCAN's lambda = 9).
        no_imgnorm / no_txtnorm: skip the per-region / per-word l2 norm.
    """

    embed_size: PositiveInt = 1024
    img_dim: PositiveInt = 2048
    image_encoder: Literal["basic", "selfattention"] = "selfattention"
    attention_heads: PositiveInt = 8
    attention_padding_mask: bool = False
    coding: CodingName = "vha"
    pooling: PoolingName = "lse"
    belta: PositiveFloat = 0.1
    alpha: PositiveFloat = 0.1
    smooth: PositiveFloat = 9.0
    no_imgnorm: bool = False
    no_txtnorm: bool = False

    def __post_init__(self) -> None:
        if self.image_encoder not in ("basic", "selfattention"):
            raise ValueError(
                f"CHANConfig.image_encoder: expected 'basic' or 'selfattention', found {self.image_encoder!r} "
                "(the reference's 'transformer' attends across the batch, §8.11, and is not offered)"
            )
        if self.coding not in coding.CODINGS:
            raise ValueError(f"CHANConfig.coding: expected one of {sorted(coding.CODINGS)}, found {self.coding!r}")
        if self.pooling not in coding.POOLINGS:
            raise ValueError(f"CHANConfig.pooling: expected one of {sorted(coding.POOLINGS)}, found {self.pooling!r}")
        if self.image_encoder == "selfattention" and self.embed_size % self.attention_heads:
            raise ValueError(
                f"CHANConfig.attention_heads: embed_size {self.embed_size} must be divisible by the "
                f"number of heads, found {self.attention_heads}"
            )


class RegionSelfAttention(nn.Module):
    """``x + MHA(LN(x))`` over the regions of each image (§3.1 ``selfattention``): pre-LN,
    residual, ``nn.MultiheadAttention(d, heads, batch_first=True)``, no FFN, no dropout.
    Attribute names ``ln`` / ``attn`` are the reference's (``feedforward.ln.*``, ``feedforward.attn.*``)."""

    def __init__(self, d: int, heads: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """``x [B, K, d]``; ``padding [B, K]`` bool (True = padded region, not attended) or None."""
        h = self.ln(x)
        return x + self.attn(h, h, h, need_weights=False, key_padding_mask=padding)[0]


class CHANImageEncoder(PrecompRegionEncoder):
    """``images [B, K, D] -> [B, K, d]`` unit-norm region features (§3.1, ``EncoderImagePrecomp``).

    ``fc`` (Xavier bound ``sqrt(6/(D+d))``, bias 0, from :class:`PrecompRegionEncoder`), then
    ``feedforward`` (identity for ``basic``, :class:`RegionSelfAttention` for ``selfattention``),
    then the per-region l2 norm. State-dict keys equal the reference's ``img_enc`` keys.
    The output is zero beyond ``lengths`` (the similarity masks padding anyway).
    """

    def __init__(self, cfg: CHANConfig) -> None:
        super().__init__(cfg.img_dim, cfg.embed_size, mlp_residual=False, l2_regions=False, zero_padding=False)
        self.normalise = not cfg.no_imgnorm
        self.padding_mask = cfg.attention_padding_mask
        if cfg.image_encoder == "selfattention":
            self.feedforward: nn.Module = RegionSelfAttention(cfg.embed_size, cfg.attention_heads)
        else:
            self.feedforward = nn.Identity()

    def forward(self, images: Tensor, lengths: Tensor) -> Tensor:
        # reference collate zero-pads, so a padded region enters the attention as fc(0) = fc.bias
        features = super().forward(zero_padding(images, lengths), lengths)
        if isinstance(self.feedforward, RegionSelfAttention):
            steps = torch.arange(images.shape[1], device=images.device)
            padding = steps[None, :] >= lengths.to(images.device)[:, None]
            # quirk kept for checkpoint parity: the reference attends to padded regions (no mask)
            features = self.feedforward(features, padding if self.padding_mask else None)
        if self.normalise:
            features = l2norm(features, dim=-1)
        return zero_padding(features, lengths)


class CHANBiGRUTextEncoder(BiGRUTextEncoder):
    """CHAN's ``EncoderTextBigru`` (§3.2): Xavier-initialised embedding (``<mask>`` row included),
    bidirectional GRU with the two directions averaged, per-token l2 norm -> ``[B, L, d]``.
    Keys ``embed.*``, ``rnn.*``, ``fc.*`` equal the reference's ``txt_enc`` keys."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, normalise: bool = True) -> None:
        super().__init__(
            vocab_size, word_dim, embed_size, bidirectional=True, l2_words=normalise, embed_init="xavier"
        )
        # reference quirk: `fc` is created but never used in forward; kept so checkpoints load strictly
        self.fc = nn.Linear(embed_size, embed_size)


class CHAN(MatchingModel):
    """CHAN as a pairwise :class:`MatchingModel`: sets in, ``coding`` + ``pooling`` scores out.

    ``encode_images``: ``[B, K, D] -> Encoded([B, K, d], lengths)``; ``encode_captions``:
    ``[B, L] -> Encoded([B, L, d], lengths)``; ``score_block``: ``[n_img, n_cap]`` via
    :func:`itmkit.models.coding.coded_similarity` (one GEMM per block, masked reductions).
    """

    pairwise = True
    method_name = "chan"

    def __init__(self, cfg: CHANConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = CHANImageEncoder(cfg)
        if text_cfg.kind == "bigru":
            if vocab_size is None:
                raise ValueError("CHAN: text.kind='bigru' needs vocab_size (the pipeline's id count incl. <mask>)")
            self.text: nn.Module = CHANBiGRUTextEncoder(
                vocab_size, text_cfg.word_dim, cfg.embed_size, normalise=not cfg.no_txtnorm
            )
        elif text_cfg.kind == "hf":
            # BERT-like: all tokens incl. [CLS]/[SEP] -> Linear(hidden -> d) -> l2 norm, no pooling (§3.2)
            self.text = HFTextEncoder(text_cfg.hf_path, cfg.embed_size, l2_words=not cfg.no_txtnorm)
        else:
            raise ValueError(f"CHAN: text.kind: expected 'bigru' or 'hf', found {text_cfg.kind!r}")

    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, K, D]`` (zero-padded), ``lengths [B]`` -> regions ``[B, K, d]``."""
        return Encoded(self.image(images, lengths), lengths)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]`` ids, ``lengths [B]`` (incl. start/end or CLS/SEP) -> words ``[B, L, d]``."""
        return Encoded(self.text(tokens, lengths), lengths)

    def score_block(self, images: Encoded, captions: Encoded) -> Tensor:
        """``[n_img, n_cap]`` CHAN scores of every image against every caption (§3.3)."""
        cfg = self.cfg
        return coding.coded_similarity(
            images.feats,
            images.mask,
            captions.feats,
            captions.mask,
            cfg.coding,
            cfg.pooling,
            belta=cfg.belta,
            alpha=cfg.alpha,
            smooth=cfg.smooth,
        )

    def pair_workspace_bytes(self, images: Encoded, captions: Encoded) -> int:
        k, length, d = images.feats.shape[1], captions.feats.shape[1], captions.feats.shape[-1]
        return coding.coding_workspace_bytes(k, length, d, self.cfg.coding, captions.feats.element_size())

    @torch.no_grad()
    def explain(self, image: Encoded, caption: Encoded, *, coding_name: str | None = None) -> Explanation:
        """How CHAN codes and pools one image against one caption (``len == 1`` each), unpadded (§3.3).

        ``word_region_cosines [n_words, n_regions]`` always; then, by coding:

        - ``vha`` (hard assignment, CHAN): ``word_region_weights [n_words, n_regions]``, one-hot at
          the region each word is assigned to; ``assigned_regions [n_words]`` (int); ``word_scores
          [n_words]``, that region's cosine (the codes LSE pools into the score);
        - ``tha``: ``region_word_weights [n_regions, n_words]`` one-hot at each region's best word,
          ``assigned_words [n_regions]``, ``region_scores [n_regions]``;
        - ``vsa``: ``region_word_weights``, each region's softmax (temperature ``alpha``) over the
          words; ``region_scores``;
        - ``t2i`` (SCAN's soft assignment): ``word_region_weights``, each word's attention over the
          regions (``smooth``); ``word_scores``.

        ``coding_name`` explains the features under another coding than the model's (soft next to
        hard on the same pair); the score is then that coding's, pooled as the model pools.
        """
        n_regions, n_words = check_one_pair(image, caption)
        cfg = self.cfg
        name = cfg.coding if coding_name is None else coding_name
        if name not in coding.CODINGS:
            raise ValueError(f"CHAN.explain coding_name: expected one of {sorted(coding.CODINGS)}, found {name!r}")
        regions, words = image.feats[:1, :n_regions], caption.feats[:1, :n_words]
        sets = (regions, torch.ones(1, n_regions, dtype=torch.bool, device=regions.device),
                words, torch.ones(1, n_words, dtype=torch.bool, device=words.device))
        with eval_mode(self):
            cosines = coding.region_word_cosines(*sets)[0, 0]  # [n_regions, n_words]
            coded = coding.code(*sets, name, alpha=cfg.alpha, smooth=cfg.smooth)
            parts: dict[str, Any] = {"word_region_cosines": as_numpy(cosines.t())}
            if name == "vha":
                assigned = coding.hard_assignment_regions(*sets)[0, 0]
                parts[WORD_REGION_WEIGHTS] = as_numpy(nn.functional.one_hot(assigned, n_regions).to(cosines.dtype))
                parts["assigned_regions"] = as_numpy(assigned)
            elif name == "tha":
                assigned = cosines.argmax(dim=1)
                parts[REGION_WORD_WEIGHTS] = as_numpy(nn.functional.one_hot(assigned, n_words).to(cosines.dtype))
                parts["assigned_words"] = as_numpy(assigned)
            elif name == "vsa":
                parts[REGION_WORD_WEIGHTS] = as_numpy(torch.softmax(cosines / cfg.alpha, dim=1))
            else:
                parts[WORD_REGION_WEIGHTS] = as_numpy(coding.t2i_attention_weights(*sets, smooth=cfg.smooth)[0, 0].t())
            parts[WORD_SCORES if name in ("vha", "t2i") else REGION_SCORES] = as_numpy(coded.values[0, 0])
            if coding_name is None:
                score = float(self.similarity(image, caption)[0, 0])
            else:
                score = float(coding.pool(coded, cfg.pooling, belta=cfg.belta)[0, 0])
        return Explanation(self.method_name, score, n_regions, n_words, parts)


def build(run_cfg: RunConfig, vocab_size: int | None) -> CHAN:
    """Registry hook: a :class:`CHAN` from a :class:`RunConfig` (``model`` is a :class:`CHANConfig`)."""
    if not isinstance(run_cfg.model, CHANConfig):
        raise TypeError(f"chan.build: run_cfg.model must be a CHANConfig, found {type(run_cfg.model).__name__}")
    return CHAN(run_cfg.model, run_cfg.text, vocab_size)


# ------------------------------------------------------------------------------ presets (§5, §9)
def _paper(dataset: Literal["f30k", "coco"], text: Literal["bigru", "bert"]) -> RunConfig:
    """The final (Sept 2023) ``scripts/train.sh`` recipe (§5): margin 0.05, AdamW lr 5e-4, x0.1 at
    epoch 15 of 25, clip 2, sum-mode hinge for epoch 0, region/token drop, seed 2022."""
    bigru = text == "bigru"
    model = CHANConfig(
        embed_size=1024,
        img_dim=2048,
        image_encoder="selfattention" if bigru else "basic",
        coding="vha",
        # BERT: the current script uses MeanPooling (the March-2023 one LSE); a released checkpoint's
        # opt.pooling_type decides, see convert_checkpoint
        pooling="lse" if bigru else "mean",
        belta=0.1,
        alpha=0.1,
    )
    text_cfg = (
        # the reference initialises from GloVe 840B (not available offline): Xavier init here
        TextConfig(kind="bigru", word_dim=300)
        if bigru
        # hf_path None = the offline MiniLM; point it at a local bert-base-uncased for the paper
        else TextConfig(kind="hf", hf_path=None)
    )
    train = TrainConfig(
        epochs=25,
        batch_size=384 if bigru else 128,
        lr=5e-4,
        lr_decay_epochs=(15,),
        lr_decay_factor=0.1,
        optimizer="adamw",
        weight_decay=0.01 if bigru else 1e-4,  # BiGRU: AdamW's library default (§8.8)
        backbone_lr_scale=0.1,
        grad_clip=2.0,
        margin=0.05,
        max_violation=False,  # the scripts do not pass it: hardest negatives from epoch 1 (warm-up)
        sum_warmup_epochs=1,
        seed=2022,
    )
    return RunConfig(
        method="chan",
        model=model,
        text=text_cfg,
        data=DataConfig(data_dir=None, dev_max_captions=5000, region_drop=0.2, caption_augment=True),
        train=train,
    )


def _course() -> RunConfig:
    """§9 sized for the embedded ``course`` set: d 64, self-attention (8 heads), BiGRU word_dim 32,
    VHA + LSE(0.1), margin 0.05, AdamW wd 0.01, region/token drop, clip 2.

    Deviations from §9 (measured on the course set, 4-epoch probes): batch 32 and lr 1e-3 instead
    of 64 and 5e-4, and two sum-of-hinges warm-up epochs instead of one. With §9's numbers the
    hardest-negative phase collapses the image side (every image scores alike; dev rsum ~50 after
    4 epochs, chance ~32); with these, dev rsum 146 / 380 / 456 / 498 / 535 after epochs 1-5 and
    test rsum 532.6 (i2t R@1 85.0, t2i R@1 64.0).
    """
    return RunConfig(
        method="chan",
        model=CHANConfig(
            embed_size=64, img_dim=embedded_feature_dim("course"), image_encoder="selfattention", attention_heads=8
        ),
        text=TextConfig(kind="bigru", word_dim=32),
        data=DataConfig(embedded_preset="course", region_drop=0.2, caption_augment=True),
        train=TrainConfig(
            epochs=5,
            batch_size=32,
            lr=1e-3,
            lr_decay_epochs=(4,),
            weight_decay=0.01,
            grad_clip=2.0,
            margin=0.05,
            sum_warmup_epochs=2,
            eval_batch_size=128,
            seed=0,
        ),
    )


def _smoke() -> RunConfig:
    """Every code path on the embedded ``tiny`` set in seconds; numbers are not judged."""
    cfg = _course()
    cfg.model = CHANConfig(
        embed_size=32, img_dim=embedded_feature_dim("tiny"), image_encoder="selfattention", attention_heads=4
    )
    cfg.text = TextConfig(kind="bigru", word_dim=16)
    cfg.data = DataConfig(embedded_preset="tiny", region_drop=0.2, caption_augment=True)
    cfg.train.epochs = 2
    cfg.train.sum_warmup_epochs = 1
    cfg.train.lr_decay_epochs = (1,)
    return cfg


PRESETS = {
    "smoke": _smoke,
    "course": _course,
    "paper": lambda: _paper("f30k", "bigru"),
    "paper-f30k-bigru": lambda: _paper("f30k", "bigru"),
    "paper-coco-bigru": lambda: _paper("coco", "bigru"),
    "paper-f30k-bert": lambda: _paper("f30k", "bert"),
    "paper-coco-bert": lambda: _paper("coco", "bert"),
}

# named similarity variants (dotted overrides of a preset), for notebooks and ablations
VARIANTS = {
    "hard-lse": {"model.coding": "vha", "model.pooling": "lse"},
    "hard-mean": {"model.coding": "vha", "model.pooling": "mean"},
    "soft-t2i-mean": {"model.coding": "t2i", "model.pooling": "mean"},
    "textual-hard-lse": {"model.coding": "tha", "model.pooling": "lse"},
    "visual-soft-lse": {"model.coding": "vsa", "model.pooling": "lse"},
}


# ------------------------------------------------------------------------- checkpoints (§7)
class CheckpointFormatError(ValueError):
    """A reference CHAN checkpoint that does not have the layout of chan.md §7."""

    def __init__(self, source: str, field: str, expected: str, found: str) -> None:
        self.source, self.field, self.expected, self.found = source, field, expected, found
        super().__init__(f"{source}: field {field!r}: expected {expected}, found {found}")




def convert_checkpoint(
    source: str | Path | Mapping[str, Any],
    *,
    vocab_path: str | Path | None = None,
    hf_path: str | Path | None = None,
) -> tuple[RunConfig, dict[str, Tensor]]:
    """A released CHAN ``model_best.pth`` (§7) -> ``(RunConfig, state_dict for CHAN)``.

    ``source``: the file path (opened with ``weights_only=False``: trusted files only) or the
    already loaded dict ``{'model': [img_enc, txt_enc, sim_enc, criterion], 'opt': Namespace}``.
    ``vocab_path``: the SCAN vocabulary json of the BiGRU models (its size + 1 ``<mask>`` must
    equal the embedding rows); ``hf_path``: local folder of the BERT the BERT models used.

    Similarity options come from ``opt`` (``coding_type``, ``pooling_type``, ``belta``,
    ``alpha``, ``precomp_enc_type``; never assumed, §8.5), sizes from the tensors. Key mapping:
    ``img_enc.X -> image.X``; BiGRU ``txt_enc.X -> text.X``; BERT ``bert.X -> text.backbone.X``,
    ``linear.X -> text.linear.X`` (``position_ids`` dropped: newer transformers do not store it).
    Load the result with :func:`load_reference_checkpoint` (strict, keys reported by name).
    """
    from itmkit.checkpoints import BERT_POSITION_IDS, open_reference_checkpoint, opt_value

    name, checkpoint = open_reference_checkpoint(source)
    parts = checkpoint.get("model")
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not all(isinstance(p, Mapping) for p in parts):
        raise CheckpointFormatError(
            name, "model", "a list of state dicts [img_enc, txt_enc, sim_enc, criterion]", type(parts).__name__
            if not isinstance(parts, (list, tuple)) else f"a list of {len(parts)} entries"
        )
    for index, label in ((2, "sim_enc"), (3, "criterion")):
        if len(parts) > index and len(parts[index]) > 0:
            raise CheckpointFormatError(
                name, f"model[{index}] ({label})", "an empty state dict (CHAN's similarity has no parameters)",
                f"keys {sorted(parts[index])[:5]}"
            )
    img_state, txt_state = dict(parts[0]), dict(parts[1])
    opt = checkpoint.get("opt")
    if opt is None:
        raise CheckpointFormatError(name, "opt", "the training options (argparse.Namespace)", "nothing")

    if "fc.weight" not in img_state:
        raise CheckpointFormatError(name, "model[0] (img_enc)", "key 'fc.weight'", f"keys {sorted(img_state)[:6]}")
    embed_size, img_dim = (int(s) for s in img_state["fc.weight"].shape)
    has_attention = any(k.startswith("feedforward.") for k in img_state)
    enc_type = opt_value(opt, "precomp_enc_type", "selfattention" if has_attention else "basic")
    if enc_type not in ("basic", "selfattention") or (enc_type == "selfattention") != has_attention:
        raise CheckpointFormatError(
            name, "opt.precomp_enc_type", "'basic' (no feedforward.* keys) or 'selfattention' (feedforward.* keys)",
            f"{enc_type!r} with{'' if has_attention else 'out'} feedforward.* keys"
        )

    coding_type = opt_value(opt, "coding_type")
    pooling_type = opt_value(opt, "pooling_type")
    if coding_type not in coding.REFERENCE_CODING_NAMES:
        raise CheckpointFormatError(name, "opt.coding_type", f"one of {sorted(coding.REFERENCE_CODING_NAMES)}", repr(coding_type))
    if pooling_type not in coding.REFERENCE_POOLING_NAMES:
        raise CheckpointFormatError(name, "opt.pooling_type", f"one of {sorted(coding.REFERENCE_POOLING_NAMES)}", repr(pooling_type))
    alpha = opt_value(opt, "alpha")
    model = CHANConfig(
        embed_size=embed_size,
        img_dim=img_dim,
        image_encoder=enc_type,
        coding=coding.REFERENCE_CODING_NAMES[coding_type],
        pooling=coding.REFERENCE_POOLING_NAMES[pooling_type],
        belta=float(opt_value(opt, "belta", 0.1)),
        alpha=float(alpha) if alpha is not None else 0.1,
        no_imgnorm=bool(opt_value(opt, "no_imgnorm", False)),
        no_txtnorm=bool(opt_value(opt, "no_txtnorm", False)),
    )

    text_type = opt_value(opt, "text_enc_type", "bigru" if "embed.weight" in txt_state else "bert")
    state = {f"image.{k}": v for k, v in img_state.items()}
    if text_type == "bigru":
        if "embed.weight" not in txt_state:
            raise CheckpointFormatError(name, "model[1] (txt_enc)", "BiGRU key 'embed.weight'", f"keys {sorted(txt_state)[:6]}")
        rows, word_dim = (int(s) for s in txt_state["embed.weight"].shape)
        if vocab_path is not None:
            from itmkit.data.vocab import Vocabulary

            expected_rows = len(Vocabulary.from_json(vocab_path)) + 1  # + the <mask> id (§8.7)
            if expected_rows != rows:
                raise CheckpointFormatError(
                    f"{name} with vocabulary {vocab_path}", "txt_enc embed.weight rows",
                    f"{expected_rows} (vocabulary size + 1 for <mask>)", str(rows)
                )
        text_cfg = TextConfig(kind="bigru", word_dim=word_dim, vocab_path=None if vocab_path is None else str(vocab_path))
        state.update({f"text.{k}": v for k, v in txt_state.items()})
    elif text_type == "bert":
        text_cfg = TextConfig(kind="hf", hf_path=None if hf_path is None else str(hf_path))
        for key, value in txt_state.items():
            if key.startswith("bert."):
                state["text.backbone." + key[len("bert.") :]] = value
            else:
                state["text." + key] = value
        state.pop(BERT_POSITION_IDS, None)
    else:
        raise CheckpointFormatError(name, "opt.text_enc_type", "'bigru' or 'bert'", repr(text_type))

    train = TrainConfig(
        epochs=int(opt_value(opt, "num_epochs", 25)),
        batch_size=int(opt_value(opt, "batch_size", 128)),
        lr=float(opt_value(opt, "learning_rate", 5e-4)),
        lr_decay_epochs=(int(opt_value(opt, "lr_update", 15)),),
        weight_decay=0.01 if text_type == "bigru" else 1e-4,
        grad_clip=float(opt_value(opt, "grad_clip", 2.0)),
        margin=float(opt_value(opt, "margin", 0.05)),
        sum_warmup_epochs=int(opt_value(opt, "vse_mean_warmup_epochs", 1)),
        seed=int(opt_value(opt, "seed", 2022) or 2022),
    )
    run_cfg = RunConfig(method="chan", model=model, text=text_cfg, train=train, preset="converted")
    return run_cfg, state


def load_reference_checkpoint(
    source: str | Path | Mapping[str, Any],
    *,
    vocab_path: str | Path | None = None,
    hf_path: str | Path | None = None,
) -> tuple[CHAN, RunConfig]:
    """Convert (:func:`convert_checkpoint`), build the model and load it **strictly**: any
    missing, unexpected or misshaped key raises :class:`itmkit.checkpoints.CheckpointMismatchError`
    naming it. Returns the model in eval mode and its :class:`RunConfig`."""
    from itmkit.checkpoints import checkpoint_label, load_converted

    run_cfg, state = convert_checkpoint(source, vocab_path=vocab_path, hf_path=hf_path)
    vocab_rows = int(state["text.embed.weight"].shape[0]) if run_cfg.text.kind == "bigru" and "text.embed.weight" in state else None
    model = build(run_cfg, vocab_rows)
    load_converted(model, state, source=checkpoint_label(source))
    return model.eval(), run_cfg


METHOD = MethodSpec(
    name="chan",
    config_cls=CHANConfig,
    build=build,
    presets=PRESETS,
    spec="chan.md",
    description="CHAN (CVPR 2023): hard assignment of each word to its best region + LSE pooling; parameter-free similarity",
    convert_checkpoint=convert_checkpoint,
    variants=VARIANTS,
)
