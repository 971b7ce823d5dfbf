"""SCAN: Stacked Cross Attention for image-text matching (Lee et al., ECCV 2018).

Spec: ``../shared/methods/scan.md``. A *pairwise* method: images are encoded into region sets
``[n_img, R, d]``, captions into word sets ``[n_cap, L, d]``, and every (image, caption) pair is
scored by cross attention (:mod:`itmkit.models.cross_attention`):

- ``cross_attn="t2i"``: every word attends over the regions, pooled over the words (§3.4);
- ``cross_attn="i2t"``: every region attends over the words, pooled over the regions (§3.5).

The paper's best rows are the **ensemble** "t-i AVG + i-t LSE": two separately trained models
whose similarity matrices are averaged (§5.4). Train the ``*-t2i-avg`` and ``*-i2t-lse``
presets, then :func:`itmkit.evaluate.ensemble.evaluate_ensemble` on their two matrices
(:data:`ENSEMBLE_PRESETS` names the pairs).

Also here: presets (§5.3, §9) and the importer for ``train.py``-format checkpoints (§7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from itmkit.checkpoints import check_converted, open_reference_checkpoint, opt_value, reference_dataset, strip_prefix
from itmkit.data.embedded import embedded_feature_dim
from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig
from itmkit.config_checks import OneOf, PositiveFloat, PositiveInt
from itmkit.encoded import Encoded
from itmkit.methods.registry import MethodSpec
from itmkit.models import cross_attention as xattn
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
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.text_encoders import build_text_encoder
from itmkit.paths import scan_text_dir


RawFeatureNorm = Annotated[str, OneOf(xattn.RAW_FEATURE_NORMS, tuple(xattn.RAW_FEATURE_NORM_ALIASES.items()))]


@dataclass
class SCANConfig:
    """SCAN model settings (scan.md §3.6; names = the reference ``train.py`` flags).

    Attributes:
        img_dim: region feature size of the data (2048 for BUTD precomp).
        embed_size: joint space size ``d`` (1024 in the paper).
        cross_attn: ``"t2i"`` (words attend to regions) or ``"i2t"`` (regions attend to words).
        raw_feature_norm: one of :data:`itmkit.models.cross_attention.RAW_FEATURE_NORMS`
            (``clipped_l2norm`` in every recipe; "clipped" = LeakyReLU(0.1), §8.2).
        agg_func: ``"LogSumExp"``, ``"Mean"`` (the paper's AVG), ``"Max"`` or ``"Sum"``.
        lambda_softmax: λ1, inverse temperature of the attention softmax (t2i 9, i2t 4).
        lambda_lse: λ2 of the LogSumExp pooling (t2i 6; i2t 5 on f30k, 20 on COCO).
        precomp_enc_type: ``"basic"`` (Linear with the Xavier-style init) or ``"weight_norm"``.
        bi_gru: bidirectional GRU, directions averaged (every README recipe passes ``--bi_gru``).
        num_layers: GRU layers.
        no_imgnorm / no_txtnorm: skip the per-region / per-word l2 norm.
    """

    img_dim: PositiveInt = 2048
    embed_size: PositiveInt = 1024
    cross_attn: Literal["t2i", "i2t"] = "t2i"
    raw_feature_norm: RawFeatureNorm = "clipped_l2norm"
    agg_func: Literal["LogSumExp", "Mean", "Max", "Sum"] = "LogSumExp"
    lambda_softmax: PositiveFloat = 9.0
    lambda_lse: PositiveFloat = 6.0
    precomp_enc_type: Literal["basic", "weight_norm"] = "basic"
    bi_gru: bool = True
    num_layers: PositiveInt = 1
    no_imgnorm: bool = False
    no_txtnorm: bool = False

    def __post_init__(self) -> None:
        xattn.check_direction(self.cross_attn)
        self.raw_feature_norm = xattn.check_raw_feature_norm(self.raw_feature_norm)
        xattn.check_aggregation(self.agg_func)
        if self.precomp_enc_type not in ("basic", "weight_norm"):
            raise ValueError(f"precomp_enc_type: expected 'basic' or 'weight_norm', found {self.precomp_enc_type!r}")


class WeightNormLinear(nn.Module):
    """``Linear`` with one weight-norm gain for the whole matrix (``weight_norm(..., dim=None)``,
    scan.md §3.1): ``W = g · v / ||v||_F``. Parameter names ``weight_g`` (0-dim), ``weight_v``,
    ``bias`` match the reference state dict; init = PyTorch's default ``Linear`` init (the
    reference skips its custom init for this encoder, §8.11)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        base = nn.Linear(in_features, out_features)
        self.weight_v = nn.Parameter(base.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(base.weight.detach()))
        self.bias = nn.Parameter(base.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v))
        return nn.functional.linear(x, weight, self.bias)


class SCAN(MatchingModel):
    """SCAN (scan.md §3): ``image`` (:class:`PrecompRegionEncoder`, ``fc`` + per-region l2 norm)
    and ``text`` (bi-GRU with per-word l2 norm, or a Hugging Face encoder); no parameters in the
    similarity. State-dict prefixes: ``image.fc.*``, ``text.embed.*``, ``text.rnn.*``
    (``text.backbone.*`` + ``text.linear.*`` for HF text)."""

    pairwise = True
    method_name = "scan"

    def __init__(self, cfg: SCANConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = PrecompRegionEncoder(cfg.img_dim, cfg.embed_size, mlp_residual=False, l2_regions=not cfg.no_imgnorm)
        if cfg.precomp_enc_type == "weight_norm":
            self.image.fc = WeightNormLinear(cfg.img_dim, cfg.embed_size)
        options: dict[str, Any] = {"l2_words": not cfg.no_txtnorm}
        if text_cfg.kind == "bigru":
            options.update(bidirectional=cfg.bi_gru, num_layers=cfg.num_layers)
        self.text = build_text_encoder(text_cfg, cfg.embed_size, vocab_size, **options)

    # --- encoding ------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, K, img_dim]`` (zero-padded), ``lengths [B]`` -> regions ``[B, K, d]``."""
        return Encoded(self.image(images, lengths), lengths.to(images.device))

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]`` (``<start>``/``<end>`` included), ``lengths [B]`` -> words ``[B, L, d]``."""
        return Encoded(self.text(tokens, lengths), lengths.to(tokens.device))

    # --- scoring -------------------------------------------------------------------------------
    @staticmethod
    def _set_mask(encoded: Encoded) -> Tensor | None:
        # full sets (all 36 BUTD regions, as in the reference) need no masking passes
        if encoded.lengths is None or bool((encoded.lengths >= encoded.feats.shape[1]).all()):
            return None
        return encoded.mask

    def score_block(self, images: Encoded, captions: Encoded) -> Tensor:
        """``[n_img, n_cap]`` SCAN scores for every pair of the two blocks (§3.4 / §3.5), vectorised
        per §4: one GEMM for all word-region dot products, then per-pair ``R × L`` work only.
        Padded words and padded regions are masked in both directions."""
        cfg = self.cfg
        fn = xattn.t2i_scores if cfg.cross_attn == "t2i" else xattn.i2t_scores
        return fn(
            images.feats,
            captions.feats,
            self._set_mask(images),
            self._set_mask(captions),
            cfg.raw_feature_norm,
            cfg.lambda_softmax,
            cfg.agg_func,
            cfg.lambda_lse,
        )

    def pair_workspace_bytes(self, images: Encoded, captions: Encoded) -> int:
        """Bytes per pair of :meth:`score_block` at its peak
        (:func:`~itmkit.models.cross_attention.relevance_workspace_bytes` for ``R`` regions and
        ``L`` words, context/query roles by direction)."""
        regions, words = images.feats.shape[1], captions.feats.shape[1]
        context, query = (regions, words) if self.cfg.cross_attn == "t2i" else (words, regions)
        return xattn.relevance_workspace_bytes(context, query, captions.feats.element_size(), torch.is_grad_enabled())

    @torch.no_grad()
    def explain(self, image: Encoded, caption: Encoded, *, lambda_softmax: float | None = None) -> Explanation:
        """How SCAN scores one image against one caption (``len == 1`` each), unpadded (§3.3–§3.5).

        Parts, by ``cfg.cross_attn``:

        - t2i: ``word_region_weights [n_words, n_regions]``, each word's attention over the regions
          (rows sum to 1); ``word_scores [n_words]``, the cosine of each word with its attended
          mix of regions (the relevances ``agg_func`` pools into the score, §3.4);
        - i2t: ``region_word_weights [n_regions, n_words]``, each region's attention over the words
          (rows sum to 1); ``region_scores [n_regions]``, the relevance of each region (§3.5).

        ``lambda_softmax`` attends with another λ1 than the model's (to show how λ1 sharpens or
        flattens the attention); the score is then the one the model gives with that λ1.
        """
        n_regions, n_words = check_one_pair(image, caption)
        cfg = self.cfg
        smooth = cfg.lambda_softmax if lambda_softmax is None else float(lambda_softmax)
        regions, words = image.feats[:1, :n_regions], caption.feats[:1, :n_words]
        with eval_mode(self):
            weights = xattn.word_region_attention(regions[0], words[0], cfg.raw_feature_norm, smooth, cfg.cross_attn)
            if cfg.cross_attn == "t2i":
                relevance = xattn.attended_relevance(regions, words, cfg.raw_feature_norm, smooth)[0, 0]
                parts = {WORD_REGION_WEIGHTS: as_numpy(weights), WORD_SCORES: as_numpy(relevance)}
            else:
                relevance = xattn.attended_relevance(words, regions, cfg.raw_feature_norm, smooth)[0, 0]
                parts = {REGION_WORD_WEIGHTS: as_numpy(weights), REGION_SCORES: as_numpy(relevance)}
            if lambda_softmax is None:
                score = float(self.similarity(image, caption)[0, 0])
            else:
                score = float(xattn.aggregate(relevance, cfg.agg_func, cfg.lambda_lse, dim=-1))
        return Explanation(self.method_name, score, n_regions, n_words, parts)


def build(run_cfg: RunConfig, vocab_size: int | None) -> SCAN:
    """``MethodSpec.build``: a SCAN model from a run config (parameters from torch's current RNG)."""
    cfg = run_cfg.model
    if isinstance(cfg, dict):
        cfg = SCANConfig(**cfg)
    if not isinstance(cfg, SCANConfig):
        raise TypeError(f"scan build: run_cfg.model: expected SCANConfig, found {type(cfg).__name__}")
    return SCAN(cfg, run_cfg.text, vocab_size)


# --- presets -------------------------------------------------------------------------------------
# (λ1, λ2) per (dataset, direction, pooling) of the README recipes (scan.md §5.3).
_LAMBDAS: dict[tuple[str, str, str], tuple[float, float]] = {
    ("f30k", "t2i", "lse"): (9.0, 6.0),
    ("f30k", "t2i", "avg"): (9.0, 6.0),  # λ2 unused by Mean; the parser default is kept
    ("f30k", "i2t", "lse"): (4.0, 5.0),
    ("f30k", "i2t", "avg"): (4.0, 6.0),
    ("coco", "t2i", "lse"): (9.0, 6.0),
    ("coco", "t2i", "avg"): (9.0, 6.0),
    ("coco", "i2t", "lse"): (4.0, 20.0),
    ("coco", "i2t", "avg"): (4.0, 6.0),
}
# (lr, epochs, lr_update) per dataset (§5.3)
_SCHEDULES: dict[str, tuple[float, int, int]] = {"f30k": (2e-4, 30, 15), "coco": (5e-4, 20, 10)}
_POOLING = {"lse": "LogSumExp", "avg": "Mean"}


def _shipped_vocab(dataset: str) -> str | None:
    """The released SCAN vocabulary of ``dataset`` when present (the recipes train with it)."""
    path = scan_text_dir() / "vocab" / f"{dataset}_precomp_vocab.json"
    return str(path) if path.is_file() else None


def _reference_train(lr: float, epochs: int, lr_update: int) -> TrainConfig:
    """§5.2: Adam (no weight decay), lr x0.1 every ``lr_update`` epochs, no warm-up (hardest
    negatives from the first step), clip 2.0, batch 128, margin 0.2, fp32."""
    return TrainConfig(
        epochs=epochs,
        batch_size=128,
        lr=lr,
        lr_decay_epochs=tuple(range(lr_update, epochs, lr_update)),
        lr_decay_factor=0.1,
        optimizer="adam",
        weight_decay=0.0,
        grad_clip=2.0,
        margin=0.2,
        max_violation=True,
        sum_warmup_epochs=0,
        amp=False,
        eval_batch_size=128,
    )


def paper_preset(
    dataset: Literal["f30k", "coco"] = "f30k",
    direction: Literal["t2i", "i2t"] = "t2i",
    pooling: Literal["lse", "avg"] = "lse",
    text: Literal["bigru", "bert"] = "bigru",
) -> RunConfig:
    """A README recipe (scan.md §5.3) on real BUTD precomp data.

    ``data.data_dir`` is a placeholder (``data/{f30k,coco}_precomp``): point it at the real folder.
    No region dropping and no caption augmentation (SCAN has neither, §5.2). ``text="bert"`` swaps
    the bi-GRU for a Hugging Face encoder (``hf_path=None``: the offline MiniLM; any local
    ``bert-base-uncased`` folder works) — not in the paper; the BERT part trains at lr x 0.1.
    """
    if (dataset, direction, pooling) not in _LAMBDAS or text not in ("bigru", "bert"):
        raise KeyError(
            f"scan paper preset: expected dataset f30k|coco, direction t2i|i2t, pooling lse|avg, text "
            f"bigru|bert, found {dataset!r}, {direction!r}, {pooling!r}, {text!r}"
        )
    lambda_softmax, lambda_lse = _LAMBDAS[(dataset, direction, pooling)]
    lr, epochs, lr_update = _SCHEDULES[dataset]
    text_cfg = (
        TextConfig(kind="bigru", vocab_path=_shipped_vocab(dataset), word_dim=300)
        if text == "bigru"
        else TextConfig(kind="hf", hf_path=None)
    )
    return RunConfig(
        method="scan",
        model=SCANConfig(
            img_dim=2048,
            embed_size=1024,
            cross_attn=direction,
            agg_func=_POOLING[pooling],
            lambda_softmax=lambda_softmax,
            lambda_lse=lambda_lse,
        ),
        text=text_cfg,
        data=DataConfig(
            data_dir=f"data/{dataset}_precomp",
            test_split="testall" if dataset == "coco" else "test",
            dev_max_captions=5000,
            region_drop=0.0,
            caption_augment=False,
        ),
        train=_reference_train(lr, epochs, lr_update),
    )


def course_preset(
    embedded: Literal["tiny", "course"] = "course",
    direction: Literal["t2i", "i2t"] = "t2i",
    pooling: Literal["lse", "avg"] = "avg",
) -> RunConfig:
    """CPU-sized SCAN on an embedded set (scan.md §9): d = 64, word_dim 32, bi-GRU, batch 32,
    Adam lr 1e-3 (the synthetic signal is weak at 2e-4, §9), decay at ~2/3 of the epochs, λ's of
    the f30k recipe for the direction.

    One deviation from the paper recipe: two sum-of-hinges warm-up epochs. With hardest
    negatives from the first step the course set collapses (every score equal, loss stuck at
    2·B·margin; measured: test rsum 139 after 12 epochs); with the warm-up dev rsum passes 500
    by epoch 4."""
    lambda_softmax, lambda_lse = _LAMBDAS[("f30k", direction, pooling)]
    epochs = 8 if embedded == "course" else 2
    train = dataclasses.replace(
        _reference_train(1e-3, epochs, max(1, (2 * epochs) // 3)),
        batch_size=32,
        eval_batch_size=128,
        log_every_steps=10,
        max_violation=False,  # else hardest negatives from the first step, whatever the warm-up
        sum_warmup_epochs=2 if embedded == "course" else 1,
    )
    return RunConfig(
        method="scan",
        model=SCANConfig(
            img_dim=embedded_feature_dim(embedded),
            embed_size=64 if embedded == "course" else 32,
            cross_attn=direction,
            agg_func=_POOLING[pooling],
            lambda_softmax=lambda_softmax,
            lambda_lse=lambda_lse,
        ),
        text=TextConfig(kind="bigru", word_dim=32 if embedded == "course" else 16),
        data=DataConfig(data_dir=None, embedded_preset=embedded, region_drop=0.0, caption_augment=False),
        train=train,
    )


PRESETS = {
    "smoke": lambda: course_preset("tiny", "t2i", "avg"),
    "smoke-i2t-lse": lambda: course_preset("tiny", "i2t", "lse"),
    "course": lambda: course_preset("course", "t2i", "avg"),
    "course-t2i-avg": lambda: course_preset("course", "t2i", "avg"),
    "course-i2t-lse": lambda: course_preset("course", "i2t", "lse"),
    "paper": lambda: paper_preset("f30k", "t2i", "lse"),
    **{
        f"paper-{dataset}-{direction}-{pooling}": (
            lambda dataset=dataset, direction=direction, pooling=pooling: paper_preset(dataset, direction, pooling)
        )
        for dataset in ("f30k", "coco")
        for direction in ("t2i", "i2t")
        for pooling in ("lse", "avg")
    },
    "paper-f30k-t2i-avg-bert": lambda: paper_preset("f30k", "t2i", "avg", "bert"),
    "paper-f30k-i2t-lse-bert": lambda: paper_preset("f30k", "i2t", "lse", "bert"),
}

# The paper's ensemble rows (§5.4): average the matrices of these two separately trained models.
ENSEMBLE_PRESETS: dict[str, tuple[str, str]] = {
    "scan-ensemble": ("paper-f30k-t2i-avg", "paper-f30k-i2t-lse"),
    "scan-ensemble-f30k": ("paper-f30k-t2i-avg", "paper-f30k-i2t-lse"),
    "scan-ensemble-coco": ("paper-coco-t2i-avg", "paper-coco-i2t-lse"),
    "scan-ensemble-course": ("course-t2i-avg", "course-i2t-lse"),
    "scan-ensemble-smoke": ("smoke", "smoke-i2t-lse"),
}


def ensemble_partner(preset: str) -> str:
    """The i2t-LSE preset that pairs with a t2i preset in the paper's ensemble (and the t2i-AVG one
    for an i2t preset): ``course`` -> ``course-i2t-lse``, ``paper-coco-t2i-avg`` ->
    ``paper-coco-i2t-lse``, ``smoke`` -> ``smoke-i2t-lse``."""
    for first, second in ENSEMBLE_PRESETS.values():
        if preset == first:
            return second
        if preset == second:
            return first
    if preset.startswith("paper"):
        dataset = "coco" if "coco" in preset else "f30k"
        return f"paper-{dataset}-i2t-lse" if "i2t" not in preset else f"paper-{dataset}-t2i-avg"
    base = "smoke" if preset.startswith("smoke") else "course"
    return f"{base}-i2t-lse" if "i2t" not in preset else f"{base}-t2i-avg" if base == "course" else base


# --- checkpoint import (§7) ----------------------------------------------------------------------
def _reference_parts(parts: list[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if len(parts) != 2:
        raise ValueError(f"SCAN checkpoint 'model': expected [img_enc, txt_enc], found {len(parts)} state dicts")
    img, txt = (strip_prefix(dict(p)) for p in parts)
    return img, txt


def reference_state_to_itmkit(parts: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``[img_enc, txt_enc]`` reference state dicts -> one :class:`SCAN` state dict.

    ``fc.*`` -> ``image.fc.*``; ``embed.*``/``rnn.*`` -> ``text.*``. ``embed.weight [V, 300]``
    gains one zero row: itmkit's word-id pipeline appends ``<mask>`` (id ``V``) to every
    vocabulary; SCAN never masks words, so that row is never read. A 0-dim ``fc.weight_g`` (torch
    2.x) and a ``[1, 1]``-shaped one (older torch) both load.
    """
    img, txt = _reference_parts(parts)
    state: dict[str, Tensor] = {}
    for key, value in img.items():
        if key == "fc.weight_g":
            value = value.reshape(())
        state[f"image.{key}"] = value
    for key, value in txt.items():
        if key == "embed.weight":
            value = torch.cat([value, value.new_zeros(1, value.shape[1])], 0)
        state[f"text.{key}"] = value
    return state


def config_from_reference(parts: list[Mapping[str, Tensor]], opt: Any = None) -> SCANConfig:
    """Model config of a reference checkpoint: shapes from the state dicts, switches from ``opt``
    (the pickled ``argparse.Namespace``; missing fields take the parser defaults of §3.6)."""
    img, txt = _reference_parts(parts)
    weight_key = "fc.weight_v" if "fc.weight_v" in img else "fc.weight"
    for name, part, key in (("img_enc", img, weight_key), ("txt_enc", txt, "embed.weight"), ("txt_enc", txt, "rnn.weight_ih_l0")):
        if key not in part:
            raise KeyError(f"SCAN checkpoint {name}: expected key {key!r}, found keys {sorted(part)[:8]}")
    embed_size, img_dim = img[weight_key].shape
    num_layers = 1 + max(int(k.split("_l")[-1].split("_")[0]) for k in txt if k.startswith("rnn.weight_ih_l"))
    return SCANConfig(
        img_dim=int(img_dim),
        embed_size=int(embed_size),
        cross_attn=str(opt_value(opt, "cross_attn", "t2i")),
        raw_feature_norm=str(opt_value(opt, "raw_feature_norm", "clipped_l2norm")),
        agg_func=str(opt_value(opt, "agg_func", "LogSumExp")),
        lambda_softmax=float(opt_value(opt, "lambda_softmax", 9.0)),
        lambda_lse=float(opt_value(opt, "lambda_lse", 6.0)),
        precomp_enc_type="weight_norm" if weight_key == "fc.weight_v" else "basic",
        bi_gru=any(k.endswith("_reverse") for k in txt),
        num_layers=num_layers,
        no_imgnorm=bool(opt_value(opt, "no_imgnorm", False)),
        no_txtnorm=bool(opt_value(opt, "no_txtnorm", False)),
    )


def convert_checkpoint(source: str | Path | Mapping[str, Any]) -> tuple[RunConfig, dict[str, Tensor]]:
    """Import a ``train.py``-format SCAN checkpoint (``model_best.pth.tar``, scan.md §7; no
    official file exists, community ones use this layout).

    Args:
        source: the file, or the loaded dict ``{"model": [img_enc, txt_enc], "opt": Namespace, ...}``.

    Returns:
        ``(run_config, state_dict)``: the matching paper preset (dataset from ``opt.data_name``,
        direction and pooling from ``opt``) with the checkpoint's shapes and switches; ``build(
        run_config, vocab_size=V + 1)`` loads the state dict strictly. ``text.vocab_path`` points
        to the released vocabulary of the dataset when :func:`itmkit.paths.scan_text_dir` has it.
    """
    name, checkpoint = open_reference_checkpoint(source)
    parts = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(parts, (list, tuple)):
        raise ValueError(f"{name}: field 'model': expected a list [img_enc, txt_enc], found {type(parts).__name__}")
    opt = checkpoint.get("opt")
    model_cfg = config_from_reference(list(parts), opt)
    dataset = reference_dataset(opt)
    pooling = "avg" if model_cfg.agg_func == "Mean" else "lse"
    run_cfg = paper_preset(dataset, model_cfg.cross_attn, pooling)
    run_cfg.model = model_cfg
    run_cfg.preset = f"paper-{dataset}-{model_cfg.cross_attn}-{pooling}"
    txt = strip_prefix(dict(parts[1]))
    vocab_rows, word_dim = (int(n) for n in txt["embed.weight"].shape)
    run_cfg.text = dataclasses.replace(run_cfg.text, word_dim=word_dim)
    state = reference_state_to_itmkit(list(parts))
    check_converted(SCAN(model_cfg, run_cfg.text, vocab_rows + 1), state, name, "SCAN")
    return run_cfg, state


METHOD = MethodSpec(
    name="scan",
    config_cls=SCANConfig,
    build=build,
    presets=PRESETS,
    spec="scan.md §3-§5",
    description="SCAN (Lee et al., ECCV 2018): stacked cross attention between words and regions "
    "(t2i or i2t); the paper's best rows average a t2i-AVG and an i2t-LSE model",
    convert_checkpoint=convert_checkpoint,
    variants={
        "t2i-avg": {"model.cross_attn": "t2i", "model.agg_func": "Mean", "model.lambda_softmax": 9.0},
        "t2i-lse": {"model.cross_attn": "t2i", "model.agg_func": "LogSumExp", "model.lambda_softmax": 9.0, "model.lambda_lse": 6.0},
        "i2t-avg": {"model.cross_attn": "i2t", "model.agg_func": "Mean", "model.lambda_softmax": 4.0},
        "i2t-lse": {"model.cross_attn": "i2t", "model.agg_func": "LogSumExp", "model.lambda_softmax": 4.0, "model.lambda_lse": 5.0},
    },
)
