"""VSE∞: region/word encoders pooled by GPO into one unit vector per item (baselines.md §B).

An *embedding* method: images and captions are encoded independently into ``[n, d]`` unit
vectors and the similarity is one matrix product (§B.4). Training uses the hinge triplet loss
(:func:`itmkit.losses.hinge_triplet_loss`, §B.5) with one sum-mode warm-up epoch.

Also here: the recipe presets (§B.6, §G) and the importer for the official ``model_best.pth``
checkpoints (§D).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from itmkit.checkpoints import (
    LoadReport,
    StateDict,
    apply_reference_recipe,
    checkpoint_label,
    load_strict,
    open_reference_checkpoint,
    opt_value,
    reference_dataset,
    reference_max_violation,
    rename_keys,
    strip_prefix,
)
from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig
from itmkit.config_checks import PositiveInt
from itmkit.data.embedded import embedded_feature_dim
from itmkit.encoded import Encoded
from itmkit.methods.registry import MethodSpec
from itmkit.models.base import MatchingModel
from itmkit.models.functional import check_lengths, l2norm, length_mask, masked_max, masked_mean
from itmkit.models.gpo import GPO
from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.text_encoders import build_text_encoder
from itmkit.paths import scan_text_dir


@dataclass
class VSEInftyConfig:
    """Model settings of VSE∞ (baselines.md §B; reference flag names in brackets).

    Attributes:
        embed_size: joint space size ``d`` [``embed_size``], 1024 in the paper.
        img_dim: region feature size ``D`` of the data [``img_dim``]: 2048 for BUTD precomp,
            1280 for the embedded sets.
        pooling: ``"gpo"`` (the method), or ``"mean"`` / ``"max"`` (the ablation baselines).
        no_imgnorm / no_txtnorm: skip the l2 norm of the pooled image / caption vector.
        mlp_residual: add the 2-layer MLP to ``fc`` (``precomp_enc_type='basic'``).
        gpo_d_pe / gpo_d_hidden: GPO's positional-encoding and GRU sizes (32 / 32).
    """

    embed_size: PositiveInt = 1024
    img_dim: PositiveInt = 2048
    pooling: Literal["gpo", "mean", "max"] = "gpo"
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    mlp_residual: bool = True
    gpo_d_pe: PositiveInt = 32
    gpo_d_hidden: PositiveInt = 32


@dataclass
class PooledSet:
    """One modality's encoding, kept whole for notebooks: what GPO saw and what it did.

    Attributes:
        features: ``[B, K, d]`` region / token features (zero beyond ``lengths``).
        lengths: ``[B]`` valid positions.
        weights: ``[B, K_max]`` pooling weight of each *sorted* position (sum 1 over valid ones).
        pooled: ``[B, d]`` pooled vector before normalisation.
        embedding: ``[B, d]`` the final embedding (l2-normalised unless disabled).
    """

    features: Tensor
    lengths: Tensor
    weights: Tensor
    pooled: Tensor
    embedding: Tensor


class VSEInfty(MatchingModel):
    """VSE∞ (``pairwise = False``): ``PrecompRegionEncoder`` + GPO for images, BiGRU or a
    Hugging Face transformer + GPO for captions (§B.2-B.3).

    Submodules (state-dict prefixes): ``image`` (``fc``, ``mlp.layers.{0,1}``, ``mlp.bns.{0,1}``),
    ``image_pool`` (GPO), ``text`` (``embed``, ``rnn`` or ``backbone``, ``linear``), ``text_pool``.
    """

    pairwise = False
    method_name = "vse_infty"
    similarity_prefixes = ("image_pool.", "text_pool.")  # GPO: sets -> the vectors the dot product compares

    def __init__(self, config: VSEInftyConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        super().__init__()
        if config.pooling not in ("gpo", "mean", "max"):
            raise ValueError(f"model.pooling: expected 'gpo', 'mean' or 'max', found {config.pooling!r}")
        self.config = config
        self.image = PrecompRegionEncoder(config.img_dim, config.embed_size, mlp_residual=config.mlp_residual)
        self.text = build_text_encoder(text_cfg, config.embed_size, vocab_size)
        gpo = config.pooling == "gpo"
        self.image_pool = GPO(config.gpo_d_pe, config.gpo_d_hidden) if gpo else None
        self.text_pool = GPO(config.gpo_d_pe, config.gpo_d_hidden) if gpo else None

    def _pool(self, pool: GPO | None, features: Tensor, lengths: Tensor, normalise: bool) -> PooledSet:
        lengths = lengths.to(features.device).long()
        if pool is not None:
            pooled, weights = pool(features, lengths)
        else:
            check_lengths(lengths, features.shape[0], features.shape[1])
            k_max = int(lengths.max())
            valid = length_mask(lengths, k_max).to(features.dtype)
            if self.config.pooling == "mean":
                pooled, weights = masked_mean(features, lengths), valid / lengths[:, None]
            else:  # max pooling = all weight on the largest (first sorted) value
                pooled, weights = masked_max(features, lengths), torch.zeros_like(valid)
                weights[:, 0] = 1.0
        embedding = l2norm(pooled, dim=-1) if normalise else pooled
        return PooledSet(features, lengths, weights, pooled, embedding)

    def image_pooling(self, images: Tensor, lengths: Tensor) -> PooledSet:
        """``images [B, K, img_dim]``, ``lengths [B]`` -> regions, GPO weights and embeddings."""
        regions = self.image(images, lengths)
        return self._pool(self.image_pool, regions, lengths, not self.config.no_imgnorm)

    def caption_pooling(self, tokens: Tensor, lengths: Tensor) -> PooledSet:
        """``tokens [B, L]``, ``lengths [B]`` -> token features, GPO weights and embeddings."""
        words = self.text(tokens, lengths)
        return self._pool(self.text_pool, words, lengths, not self.config.no_txtnorm)

    def image_regions(self, images: Tensor, lengths: Tensor) -> Encoded:
        """Region features before pooling: ``Encoded([B, K, d], lengths)`` (zero beyond lengths)."""
        return Encoded(self.image(images, lengths), lengths.long())

    def caption_words(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """Token features before pooling: ``Encoded([B, L, d], lengths)`` (zero beyond lengths)."""
        return Encoded(self.text(tokens, lengths), lengths.long())

    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``[B, K, img_dim]`` -> ``Encoded(feats [B, d])`` (unit vectors unless ``no_imgnorm``)."""
        return Encoded(self.image_pooling(images, lengths).embedding)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``[B, L]`` ids -> ``Encoded(feats [B, d])`` (unit vectors unless ``no_txtnorm``)."""
        return Encoded(self.caption_pooling(tokens, lengths).embedding)

    def images_from_regions(self, regions: Tensor, lengths: Tensor) -> Encoded:
        """Region embeddings ``[B, K, d]`` -> GPO-pooled image vectors ``Encoded([B, d])`` (§B.1)."""
        return Encoded(self._pool(self.image_pool, regions, lengths, not self.config.no_imgnorm).embedding)

    def captions_from_words(self, words: Tensor, lengths: Tensor) -> Encoded:
        """Word embeddings ``[B, L, d]`` -> GPO-pooled caption vectors ``Encoded([B, d])`` (§B.1)."""
        return Encoded(self._pool(self.text_pool, words, lengths, not self.config.no_txtnorm).embedding)


def build(run_cfg: RunConfig, vocab_size: int | None) -> VSEInfty:
    """``MethodSpec.build``: the model of ``run_cfg`` (parameters drawn from torch's current RNG)."""
    config = run_cfg.model
    if isinstance(config, dict):
        config = VSEInftyConfig(**config)
    return VSEInfty(config, run_cfg.text, vocab_size)


# ----------------------------------------------------------------------------- presets


def _shipped_vocab(dataset: str) -> str | None:
    """The real SCAN vocabulary of ``dataset`` when present (the reference trains with it)."""
    path = scan_text_dir() / "vocab" / f"{dataset}_precomp_vocab.json"
    return str(path) if path.is_file() else None


def paper_preset(dataset: Literal["f30k", "coco"], text: Literal["bigru", "bert"]) -> RunConfig:
    """The paper's recipe (§B.6): 25 epochs, batch 128, lr 5e-4 (x0.1 at epoch 15), clip 2,
    margin 0.2, 1 sum-mode warm-up epoch, then hardest negatives; region drop 0.2 and caption
    augmentation. BERT: AdamW wd 1e-4, BERT at lr x 0.1. BiGRU: AdamW default wd 0.01.

    ``data.data_dir`` is a placeholder (``data/{f30k,coco}_precomp``): point it at the real
    precomp folder. BERT presets use ``text.hf_path=None`` (offline MiniLM); set it to a local
    ``bert-base-uncased`` folder to match the paper.
    """
    if dataset not in ("f30k", "coco") or text not in ("bigru", "bert"):
        raise KeyError(f"paper preset: dataset must be f30k|coco and text bigru|bert, found {dataset!r}, {text!r}")
    if text == "bigru":
        text_cfg = TextConfig(kind="bigru", vocab_path=_shipped_vocab(dataset), word_dim=300)
        weight_decay = 0.01  # torch's AdamW default, which the bigru branch leaves in place
    else:
        text_cfg = TextConfig(kind="hf", hf_path=None)
        weight_decay = 1e-4
    return RunConfig(
        method="vse_infty",
        model=VSEInftyConfig(embed_size=1024, img_dim=2048),
        text=text_cfg,
        data=DataConfig(
            data_dir=f"data/{dataset}_precomp",
            test_split="testall" if dataset == "coco" else "test",
            dev_max_captions=5000,
            region_drop=0.2,
            caption_augment=True,
        ),
        train=TrainConfig(
            epochs=25,
            batch_size=128,
            lr=5e-4,
            lr_decay_epochs=(15,),
            lr_decay_factor=0.1,
            optimizer="adamw",
            weight_decay=weight_decay,
            backbone_lr_scale=0.1,
            grad_clip=2.0,
            margin=0.2,
            max_violation=False,  # train_region.sh does not pass --max_violation: the warm-up decides
            sum_warmup_epochs=1,
        ),
    )


def course_preset() -> RunConfig:
    """§G: the embedded ``course`` set (~600 train images x 5 captions, EfficientNet region
    features) on a 2-core CPU: d = 128, BiGRU word_dim 64, batch 64, 10 epochs.

    Two sum-mode epochs and lr 1e-3 (not the paper's 1 and 5e-4): on this small set with its
    near-duplicate captions, hardest negatives from epoch 1 stall the loss at ``2 * B * margin``
    (measured, seed 0, 10 epochs: test rsum 486 with the paper's setting, 525 with this one).
    """
    return RunConfig(
        method="vse_infty",
        model=VSEInftyConfig(embed_size=128, img_dim=embedded_feature_dim("course")),
        text=TextConfig(kind="bigru", word_dim=64),
        data=DataConfig(embedded_preset="course", region_drop=0.2, caption_augment=True),
        train=TrainConfig(
            epochs=10,
            batch_size=64,
            lr=1e-3,
            lr_decay_epochs=(7,),
            optimizer="adamw",
            weight_decay=0.01,
            grad_clip=2.0,
            sum_warmup_epochs=2,
            log_every_steps=10,
        ),
    )


def smoke_preset() -> RunConfig:
    """Every code path on the embedded ``tiny`` set in seconds; numbers are not judged."""
    return RunConfig(
        method="vse_infty",
        model=VSEInftyConfig(embed_size=32, img_dim=embedded_feature_dim("tiny")),
        text=TextConfig(kind="bigru", word_dim=16),
        data=DataConfig(embedded_preset="tiny"),
        train=TrainConfig(
            epochs=2,
            batch_size=32,
            lr=5e-4,
            lr_decay_epochs=(1,),
            weight_decay=0.01,
            sum_warmup_epochs=1,
            log_every_steps=5,
        ),
    )


PRESETS = {
    "smoke": smoke_preset,
    "course": course_preset,
    "paper": functools.partial(paper_preset, "f30k", "bigru"),
    "paper-f30k-bigru": functools.partial(paper_preset, "f30k", "bigru"),
    "paper-coco-bigru": functools.partial(paper_preset, "coco", "bigru"),
    "paper-f30k-bert": functools.partial(paper_preset, "f30k", "bert"),
    "paper-coco-bert": functools.partial(paper_preset, "coco", "bert"),
}


# ----------------------------------------------------------------------------- checkpoint import

_IMAGE_RULES = [("fc.", "image.fc."), ("mlp.", "image.mlp."), ("gpool.", "image_pool.")]
_BIGRU_RULES = [("embed.", "text.embed."), ("rnn.", "text.rnn."), ("gpool.", "text_pool.")]
_BERT_RULES = [("bert.", "text.backbone."), ("linear.", "text.linear."), ("gpool.", "text_pool.")]
_POSITION_IDS = "text.backbone.embeddings.position_ids"


@functools.lru_cache(maxsize=1)
def _bert_saves_position_ids() -> bool:
    """Whether the installed transformers keeps ``embeddings.position_ids`` in a BERT state dict
    (older versions did, newer ones make it a non-persistent buffer; §D)."""
    from transformers import BertConfig, BertModel

    tiny = BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                      intermediate_size=4, max_position_embeddings=4)
    return "embeddings.position_ids" in BertModel(tiny).state_dict()


def _checkpoint_parts(source: Any, name: str) -> tuple[StateDict, StateDict, Any]:
    if not isinstance(source, dict):
        raise ValueError(f"{name}: expected a checkpoint dict, found {type(source).__name__}")
    parts = source.get("model")
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, dict) for p in parts):
        found = type(parts).__name__ if not isinstance(parts, (list, tuple)) else f"a {len(parts)}-item list"
        raise ValueError(f"{name}: field 'model': expected [img_enc_state, txt_enc_state] (two dicts), found {found}")
    return strip_prefix(parts[0]), strip_prefix(parts[1]), source.get("opt")


def convert_checkpoint(source: str | Path | dict[str, Any], hf_path: str | None = None) -> tuple[RunConfig, StateDict]:
    """An official VSE∞ checkpoint (``model_best.pth`` path or its loaded dict, §D) -> our
    ``RunConfig`` and a state dict that loads strictly into ``build(run_cfg, vocab_size)``.

    Strips ``module.``, renames ``fc/mlp/gpool`` -> ``image.*/image_pool.*`` and
    ``embed/rnn`` or ``bert/linear`` + ``gpool`` -> ``text.*/text_pool.*``; adds or drops
    ``embeddings.position_ids`` to suit the installed transformers. Sizes (``embed_size``,
    ``img_dim``, ``word_dim``) come from the tensor shapes, the recipe from ``opt``. For BERT
    checkpoints ``hf_path`` must name a local folder of the same architecture
    (``bert-base-uncased``); ``vocab_size`` for a BiGRU is ``state["text.embed.weight"].shape[0]``.
    Keys no rule knows are kept (prefixed ``image.`` / ``text.``) so a strict load names them.
    """
    name, checkpoint = open_reference_checkpoint(source)
    image_state, text_state, opt = _checkpoint_parts(checkpoint, name)

    if "fc.weight" not in image_state:
        raise ValueError(f"{name}: field 'model[0]': expected image-encoder key 'fc.weight', found keys "
                         f"{sorted(image_state)[:8]}")
    if "embed.weight" in text_state:
        kind, rules = "bigru", _BIGRU_RULES
    elif any(key.startswith("bert.") for key in text_state):
        kind, rules = "bert", _BERT_RULES
    else:
        raise ValueError(f"{name}: field 'model[1]': expected a BiGRU ('embed.weight') or BERT ('bert.*') "
                         f"text encoder, found keys {sorted(text_state)[:8]}")
    state = rename_keys(image_state, _IMAGE_RULES + [("", "image.")])
    state.update(rename_keys(text_state, rules + [("", "text.")]))

    if kind == "bert":
        has_ids = _POSITION_IDS in state
        if _bert_saves_position_ids() and not has_ids:
            positions = state["text.backbone.embeddings.position_embeddings.weight"].shape[0]
            state[_POSITION_IDS] = torch.arange(positions)[None]
        elif not _bert_saves_position_ids() and has_ids:
            del state[_POSITION_IDS]  # a buffer fixed to arange(n); newer transformers do not save it

    dataset = reference_dataset(opt)
    preset = f"paper-{dataset}-{kind}"
    run_cfg = PRESETS[preset]()
    run_cfg.preset = preset
    fc_weight = state["image.fc.weight"]
    run_cfg.model = VSEInftyConfig(
        embed_size=fc_weight.shape[0],
        img_dim=fc_weight.shape[1],
        pooling="gpo",
        no_imgnorm=bool(opt_value(opt, "no_imgnorm", False)),
        no_txtnorm=bool(opt_value(opt, "no_txtnorm", False)),
        mlp_residual="image.mlp.layers.0.weight" in state,
    )
    if kind == "bigru":
        run_cfg.text.word_dim = state["text.embed.weight"].shape[1]
    else:
        run_cfg.text.hf_path = hf_path
    train = run_cfg.train
    recipe = {
        "lr": ("learning_rate", float),
        "epochs": ("num_epochs", int),
        "batch_size": ("batch_size", int),
        "margin": ("margin", float),
        "grad_clip": ("grad_clip", float),
        "sum_warmup_epochs": ("vse_mean_warmup_epochs", int),
    }
    apply_reference_recipe(train, opt, recipe)
    # the saved flag is the reference's own switch once the warm-up is over (§B.5)
    train.max_violation = reference_max_violation(checkpoint, opt)
    return run_cfg, state


def load_reference_checkpoint(
    source: str | Path | dict[str, Any], hf_path: str | None = None
) -> tuple[VSEInfty, RunConfig, LoadReport]:
    """Convert, build and strictly load an official checkpoint; the model is returned in eval mode.

    Raises :class:`itmkit.checkpoints.CheckpointMismatchError` naming every missing,
    unexpected or misshaped key.
    """
    run_cfg, state = convert_checkpoint(source, hf_path=hf_path)
    vocab_size = state["text.embed.weight"].shape[0] if run_cfg.text.kind == "bigru" else None
    model = build(run_cfg, vocab_size)
    report = load_strict(model, state, source=checkpoint_label(source))
    return model.eval(), run_cfg, report


METHOD = MethodSpec(
    name="vse_infty",
    config_cls=VSEInftyConfig,
    build=build,
    presets=PRESETS,
    spec="baselines.md §B",
    description="VSE∞: region/word features pooled by GPO into one embedding per item (Chen et al., CVPR 2021)",
    convert_checkpoint=convert_checkpoint,
    variants={"mean": {"model.pooling": "mean"}, "max": {"model.pooling": "max"}},
)

__all__ = [
    "METHOD",
    "PooledSet",
    "VSEInfty",
    "VSEInftyConfig",
    "build",
    "convert_checkpoint",
    "load_reference_checkpoint",
    "paper_preset",
]
