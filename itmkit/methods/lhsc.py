"""LHSC: Learning Hierarchical Semantic Correspondences, Zeng et al. ICMR 2022.

Spec: ``../shared/methods/lhsc.md``. The paper text could not be found; everything follows the
released code (``lDarryll/LHSC``), which is **SGRAF-SAF with two deeper unimodal encoders** (§2):

- image: SCAN's ``fc`` -> four residual region-graph blocks (``IM_GCN``, learned un-normalised
  affinity ``Q Kᵀ / N``) -> l2 norm (§3.1, :class:`~itmkit.models.lhsc_modules.RegionGraphImageEncoder`);
- text: word embedding -> dropout 0.4 -> four residual word self-attention blocks (``TextAttn``)
  -> bi-GRU -> l2 norm (§3.2, :class:`~itmkit.models.lhsc_modules.WordSelfAttentionStack`);
- similarity: SGRAF's SAF head unchanged (§3.3), so :class:`LHSC` is an :class:`~itmkit.methods.sgraf.SGRAF`
  with other encoders: encoding, the vectorised ``score_block`` and the workspace estimate are
  SGRAF's.

Reference quirks kept (documented in ``docs/lhsc.md``): the word self-attention reads padded
positions and divides by the padded length (``word_padding="reference"``; ``"masked"`` is our
design choice, a flag), so captions must be encoded in the reference's batches for imported
checkpoints (§3.2, §8.2); the affinities are not softmax-normalised (§8.3); the region blocks
start as the identity (BatchNorm gamma 0, §8.4).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from itmkit.checkpoints import (
    add_missing_batch_counters,
    apply_reference_recipe,
    check_converted,
    open_reference_checkpoint,
    opt_value,
    reference_dataset,
    rename_keys,
    strip_prefix,
)
from itmkit.config import RunConfig, TextConfig
from itmkit.config_checks import Fraction, NonNegativeInt
from itmkit.encoded import Encoded
from itmkit.methods import sgraf
from itmkit.methods.registry import MethodSpec
from itmkit.models.base import WORD_REGION_WEIGHTS, WORD_SCORES, Explanation
from itmkit.models.lhsc_modules import RegionGraphImageEncoder, WordPadding, WordSelfAttentionStack
from itmkit.paths import scan_text_dir


@dataclass
class LHSCConfig(sgraf.SGRAFConfig):
    """LHSC model settings (lhsc.md §3.5; defaults = the reference ``opts.py``).

    Every SGRAF field keeps its meaning (``num_regions`` sizes VisualSA's BatchNorm, 36 for BUTD);
    the head is always SAF (the reference removed SGR). New fields:

    - ``region_graph_blocks`` / ``word_attention_blocks``: 4 / 4, hard-coded in the reference;
      0 gives back SGRAF-SAF's encoders (an ablation, §9);
    - ``word_attention_dropout``: the reference's ``drop_out`` (0.0) inside the word blocks;
    - ``word_padding``: ``"reference"`` (padded positions are keys, divide by the padded length;
      needed for checkpoints) or ``"masked"`` (our design choice: valid words only), §3.2.
    """

    module: Literal["SAF"] = "SAF"
    region_graph_blocks: NonNegativeInt = 4
    word_attention_blocks: NonNegativeInt = 4
    word_attention_dropout: Fraction = 0.0
    word_padding: WordPadding = "reference"


class LHSC(sgraf.SGRAF):
    """LHSC (lhsc.md §3): ``image`` (fc + region graph blocks), ``text`` (bi-GRU with word
    self-attention blocks before the GRU), ``sim`` (SGRAF's SAF similarity encoder).

    State-dict names: ``image.fc.*``, ``image.graph.blocks.{k}.*`` (:class:`RegionGraphBlock`),
    ``text.embed.weight``, ``text.word_layers.blocks.{k}.*`` (:class:`WordSelfAttentionBlock`),
    ``text.rnn.*``, ``sim.*`` (SGRAF's; the reference's ``cal_sim_base_atten`` is ``sim.SAF_module``).

    Encoded extras beside SGRAF's ``global``: images ``region_graph [B, R, n_blocks, R]`` (row
    ``i``, block ``k``, column ``j``: how much region ``i`` listens to region ``j``; zero for
    padded regions), captions ``tokens [B, L, 1]`` (the word ids, for :meth:`explain`).
    """

    method_name = "lhsc"

    def __init__(self, cfg: LHSCConfig, text_cfg: TextConfig, vocab_size: int | None) -> None:
        if cfg.module != "SAF":
            raise ValueError(f"LHSC model.module: expected 'SAF' (LHSC has no SGR head, lhsc.md §2), found {cfg.module!r}")
        if text_cfg.kind != "bigru":
            raise ValueError(
                f"LHSC text.kind: expected 'bigru' (the word self-attention blocks run on word "
                f"embeddings, lhsc.md §3.2), found {text_cfg.kind!r}"
            )
        super().__init__(cfg, text_cfg, vocab_size)

    def _image_encoder(self, cfg: LHSCConfig) -> nn.Module:
        return RegionGraphImageEncoder(cfg.img_dim, cfg.embed_size, cfg.region_graph_blocks, l2_regions=not cfg.no_imgnorm)

    def _text_encoder(self, cfg: LHSCConfig, text_cfg: TextConfig, vocab_size: int | None, **options: Any) -> nn.Module:
        stack = WordSelfAttentionStack(text_cfg.word_dim, cfg.word_attention_blocks, cfg.word_attention_dropout, cfg.word_padding)
        return super()._text_encoder(cfg, text_cfg, vocab_size, word_layers=stack, **options)

    @property
    def batch_dependent_captions(self) -> bool:
        """True when a caption's encoding depends on the batch it is padded with (the reference's
        word self-attention, §3.2): the evaluator then encodes captions in file order, in batches
        of ``eval_batch_size`` (100 in the paper presets, as the reference's test loader)."""
        return self.cfg.word_padding == "reference" and self.cfg.word_attention_blocks > 0

    # --- encoding ------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, K, img_dim]``, ``lengths [B]`` -> regions ``[B, R, d]`` (``R = num_regions``)
        with ``extras["global"] [B, d]`` and ``extras["region_graph"] [B, R, n_blocks, R]``."""
        self._check_region_count(images)
        regions, graphs = self.image.encode(images, lengths)
        encoded = self.images_from_regions(regions, lengths)
        if graphs:
            stacked = torch.stack(graphs, 2).detach()  # [B, K, n_blocks, K]
            pad = self.cfg.num_regions - stacked.shape[1]
            stacked = nn.functional.pad(stacked, (0, pad, 0, 0, 0, pad))
            encoded.extras["region_graph"] = stacked
        return encoded

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]``, ``lengths [B]`` -> words ``[B, L', d]`` with ``extras["global"] [B, d]``
        and ``extras["tokens"] [B, L', 1]``, ``L' = max(lengths)``.

        Columns beyond the longest caption are dropped first: the reference pads every batch to
        its longest caption, and with ``word_padding="reference"`` the padded length changes the
        encoding (§3.2), so extra all-pad columns must not count."""
        if lengths.numel():
            tokens = tokens[:, : int(lengths.max())]
        encoded = super().encode_captions(tokens, lengths)
        encoded.extras["tokens"] = tokens.to(encoded.feats.device)[..., None]
        return encoded

    # --- pictures ------------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, image: Encoded, caption: Encoded) -> Explanation:
        """One encoded image and caption (``len == 1`` each, eval mode) -> :class:`Explanation`.

        Parts (unpadded numpy arrays; ``n = n_words`` incl. ``<start>``/``<end>``, ``r = n_regions``):

        - ``word_region_weights [n, r]``: SAF's text-to-image attention (each row sums to 1);
        - ``filtration_weights [n + 1]``: SAF's gates after the L1 norm (node 0 = the global
          alignment, nodes 1.. the words; sum 1); ``word_scores [n]`` = its word nodes;
        - ``region_graph/layer{k} [r, r]`` (``k = 1..n_blocks``): block ``k``'s learned affinity
          ``Q Kᵀ / N`` (row = the region that listens); un-normalised, entries may be negative;
        - ``word_attention/layer{k} [n, n]``: word block ``k``'s affinity ``C`` (row = the word
          being updated). Recomputed from the caption's own valid tokens, i.e. the caption
          encoded alone: with ``word_padding="reference"`` a caption encoded inside a longer
          batch also attended to that batch's pad positions (§3.2).
        """
        if len(image) != 1 or len(caption) != 1:
            raise ValueError(f"LHSC.explain: expected one image and one caption, found {len(image)} and {len(caption)}")
        if self.training:
            raise ValueError("LHSC.explain: expected eval mode (dropout and BatchNorm statistics change the numbers); call model.eval()")
        needed = [(image, "region_graph")] if self.cfg.region_graph_blocks else []
        for encoded, key in [*needed, (caption, "tokens")]:
            if key not in encoded.extras:
                raise KeyError(f"LHSC.explain: the encoded input lacks extras[{key!r}]; encode it with LHSC.encode_images / encode_captions")
        n_regions, n_words = int(image.lengths[0]), int(caption.lengths[0])
        score = float(self.similarity(image, caption).reshape(-1)[0])
        details: dict[str, Tensor] = {}
        self.score_block(image.trim(), caption.trim(), details)
        filtration = details["filtration_weights"][0, 0, : n_words + 1]
        parts: dict[str, Any] = {
            WORD_REGION_WEIGHTS: details["attention"][0, 0, :n_regions, :n_words].t(),
            "filtration_weights": filtration,
            WORD_SCORES: filtration[1:],
        }
        if "region_graph" in image.extras:
            graphs = image.extras["region_graph"][0, :n_regions, :, :n_regions]
            for k in range(graphs.shape[1]):
                parts[f"region_graph/layer{k + 1}"] = graphs[:, k]
        tokens = caption.extras["tokens"][:, :n_words, 0].to(self.text.embed.weight.device)
        lengths = torch.tensor([n_words], device=tokens.device)
        _, attentions = self.text.word_layers.attend(self.text.embed(tokens), lengths)
        for k, attention in enumerate(attentions):
            parts[f"word_attention/layer{k + 1}"] = attention[0]
        parts = {k: v.detach().double().cpu().numpy() for k, v in parts.items()}
        return Explanation(self.method_name, score, n_regions, n_words, parts)


def build(run_cfg: RunConfig, vocab_size: int | None) -> LHSC:
    """``MethodSpec.build``: an LHSC model from a run config."""
    cfg = run_cfg.model
    if not isinstance(cfg, LHSCConfig):
        raise TypeError(f"lhsc build: run_cfg.model: expected LHSCConfig, found {type(cfg).__name__}")
    return LHSC(cfg, run_cfg.text, vocab_size)


# --- presets -------------------------------------------------------------------------------------
def paper_preset(dataset: Literal["f30k", "coco"]) -> RunConfig:
    """The README recipe (§5) on real BUTD precomp data (set ``data.data_dir``): SGRAF's training
    (Adam 2e-4, batch 128, clip 2, margin 0.2, hardest negatives from the first step, no
    augmentation) for 50 epochs with the lr x0.1 at epoch 20, for both datasets; bi-GRU text, word
    dim 300, d = 1024, s = 256, 36 regions; evaluation batches of 100 captions (§4)."""
    return RunConfig(
        method="lhsc",
        model=LHSCConfig(),
        text=TextConfig(kind="bigru", word_dim=300),
        data=sgraf._reference_data(),
        train=sgraf._reference_train(epochs=50, lr_update=20),
    )


def course_preset(embedded: Literal["tiny", "course"] = "course") -> RunConfig:
    """CPU-sized LHSC (§9) on an embedded set: SGRAF-SAF's course preset (d 64, s 16, word dim
    32, no dropout, sum-of-hinges warm-up for half the epochs, Adam 2e-3; see
    :func:`itmkit.methods.sgraf.course_preset` for why) with the four region graph and four word
    self-attention blocks of the reference."""
    base = sgraf.course_preset("SAF", embedded)
    return dataclasses.replace(base, method="lhsc", model=LHSCConfig(**dataclasses.asdict(base.model)))


PRESETS = {
    "smoke": lambda: course_preset("tiny"),
    "course": lambda: course_preset("course"),
    "paper": lambda: paper_preset("f30k"),
    "paper-f30k": lambda: paper_preset("f30k"),
    "paper-coco": lambda: paper_preset("coco"),
}


# --- checkpoint import (§7) ------------------------------------------------------------------------
_BLOCK_KEY = re.compile(r"^(IM_GCN_|W_att)(\d+)\.(.+)$")
# the reference's four Conv1d(d, d/4) per projection, stacked in this order into one Linear (§3.1)
_STACKED = {"theta": ("theta", "theta1", "theta2", "theta3"), "phi": ("phi", "phi1", "phi2", "phi3")}


def _split_blocks(part: Mapping[str, Tensor], prefix: str, name: str) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """``(keys outside the blocks, {block number: {key inside the block: tensor}})`` for the keys
    ``{prefix}{k}.*``; block numbers must run 1..n."""
    rest: dict[str, Tensor] = {}
    blocks: dict[int, dict[str, Tensor]] = {}
    for key, value in part.items():
        match = _BLOCK_KEY.match(key)
        if match and match.group(1) == prefix:
            blocks.setdefault(int(match.group(2)), {})[match.group(3)] = value
        else:
            rest[key] = value
    if sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise ValueError(f"LHSC checkpoint {name}: expected blocks {prefix}1..{prefix}{len(blocks)}, found {sorted(blocks)}")
    return rest, blocks


def _conv_to_linear(weight: Tensor) -> Tensor:
    # kernel-1 Conv1d weights [out, in, 1] are Linear weights [out, in]
    return weight[..., 0] if weight.dim() == 3 and weight.shape[-1] == 1 else weight


def region_graph_block_state(block: Mapping[str, Tensor], number: int) -> dict[str, Tensor]:
    """One reference ``IM_GCN_{number}`` state -> a :class:`RegionGraphBlock` state.

    ``theta``..``theta3`` (``phi``..``phi3``) ``[d/4, d, 1]`` are stacked into ``theta`` (``phi``)
    ``[d, d]``; ``g.*`` and ``W.0.*`` (convs) lose the kernel axis; ``W.1.*`` (the BatchNorm)
    becomes ``bn.*``.
    Keys that fit nowhere are kept as they are, so the strict check names them.
    """
    block = dict(block)
    state: dict[str, Tensor] = {}
    for target, sources in _STACKED.items():
        for field in ("weight", "bias"):
            keys = [f"{source}.{field}" for source in sources]
            absent = [k for k in keys if k not in block]
            if absent:
                raise ValueError(f"LHSC checkpoint img_enc: missing IM_GCN_{number}." + f", IM_GCN_{number}.".join(absent))
            state[f"{target}.{field}"] = torch.cat([_conv_to_linear(block.pop(k)) for k in keys], 0)
    renamed = rename_keys(block, [("W.0.", "W."), ("W.1.", "bn.")])
    state.update({key: _conv_to_linear(value) if key.endswith("weight") else value for key, value in renamed.items()})
    return state


def reference_state_to_itmkit(parts: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``[img_enc, txt_enc, sim_enc]`` reference state dicts -> one :class:`LHSC` state dict.

    SGRAF's converter (:func:`itmkit.methods.sgraf.reference_state_to_itmkit`) handles ``fc``,
    the embedding (+ the ``<mask>`` row), ``cap_rnn`` and ``sim_enc`` after ``cal_sim_base_atten.``
    is renamed ``SAF_module.``; ``IM_GCN_k.*`` become ``image.graph.blocks.{k-1}.*``
    (:func:`region_graph_block_state`) and ``W_att{k}.embedding_*.0.*`` become
    ``text.word_layers.blocks.{k-1}.embedding_*.*``. BatchNorms without ``num_batches_tracked``
    (PyTorch 0.4.0, §7) get a zero counter.
    """
    if len(parts) != 3:
        raise ValueError(f"LHSC checkpoint 'model': expected [img_enc, txt_enc, sim_enc], found {len(parts)} state dicts")
    # a PyTorch 0.4.0 file has no BatchNorm counters (§7): accepted, counted from 0
    img, txt, sim = (add_missing_batch_counters(strip_prefix(dict(p))) for p in parts)
    img_rest, graph_blocks = _split_blocks(img, "IM_GCN_", "img_enc")
    txt_rest, word_blocks = _split_blocks(txt, "W_att", "txt_enc")
    sim = rename_keys(sim, [("cal_sim_base_atten.", "SAF_module.")])
    state = sgraf.reference_state_to_itmkit([img_rest, txt_rest, sim])
    for number, block in graph_blocks.items():
        state.update({f"image.graph.blocks.{number - 1}.{k}": v for k, v in region_graph_block_state(block, number).items()})
    for number, block in word_blocks.items():
        renamed = rename_keys(block, [(f"{name}.0.", f"{name}.") for name in ("embedding_local", "embedding_global", "embedding_v")])
        state.update({f"text.word_layers.blocks.{number - 1}.{k}": v for k, v in renamed.items()})
    return state


def config_from_reference(parts: list[Mapping[str, Tensor]], opt: Any = None) -> LHSCConfig:
    """Model config of a reference checkpoint: SGRAF's shapes (read from the tensors), the block
    counts from the ``IM_GCN_k`` / ``W_att{k}`` keys, ``drop_out`` from ``opt`` (0.0 when absent)."""
    img, txt, sim = (strip_prefix(dict(p)) for p in parts)
    img_rest, graph_blocks = _split_blocks(img, "IM_GCN_", "img_enc")
    txt_rest, word_blocks = _split_blocks(txt, "W_att", "txt_enc")
    sim = rename_keys(sim, [("cal_sim_base_atten.", "SAF_module.")])
    if any(k.startswith("SGR_module.") for k in sim):
        raise ValueError("LHSC checkpoint sim_enc: expected the SAF head (cal_sim_base_atten.*), found SGR_module.* keys (an SGRAF-SGR checkpoint?)")
    base = sgraf.config_from_reference([img_rest, txt_rest, sim], opt)
    return LHSCConfig(
        **dataclasses.asdict(base),
        region_graph_blocks=len(graph_blocks),
        word_attention_blocks=len(word_blocks),
        word_attention_dropout=float(opt_value(opt, "drop_out", 0.0)),
        word_padding="reference",
    )


#: ``TrainConfig`` field -> (reference ``opt`` name, cast), for the recipe stored in a checkpoint
_RECIPE = {
    "epochs": ("num_epochs", int), "lr": ("learning_rate", float), "batch_size": ("batch_size", int),
    "margin": ("margin", float), "grad_clip": ("grad_clip", float), "max_violation": ("max_violation", bool),
}  # fmt: skip


def convert_checkpoint(source: str | Path | Mapping[str, Any]) -> tuple[RunConfig, dict[str, Tensor]]:
    """Import a released LHSC checkpoint (``model_best.pth.tar``, lhsc.md §7).

    Args:
        source: the file (a Python-2 pickle from PyTorch 0.4.1 loads too), or the already loaded
            dict (``{"model": [img_enc, txt_enc, sim_enc], "opt": ..., "epoch": ...}``).

    Returns:
        ``(run_config, state_dict)``; ``build(run_config, vocab_size=V + 1)`` then loads the state
        dict strictly (the reference's image encoder silently drops unexpected keys; this import
        names them instead). The run config is the dataset's paper preset with the checkpoint's
        shapes and the training options stored in ``opt``; ``text.vocab_path`` is the real SCAN
        vocabulary when :func:`itmkit.paths.scan_text_dir` has it (LHSC ships none, §1).
        Captions must be encoded as the reference does (batches of 100 in file order): the
        evaluator does so for this model (:attr:`LHSC.batch_dependent_captions`).
    """
    name, checkpoint = open_reference_checkpoint(source)
    parts = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(parts, (list, tuple)):
        raise ValueError(f"{name}: field 'model': expected a list [img_enc, txt_enc, sim_enc], found {type(parts).__name__}")
    parts = list(parts)
    opt = checkpoint.get("opt")
    model_cfg = config_from_reference(parts, opt)
    dataset = reference_dataset(opt)
    run_cfg = paper_preset(dataset)
    run_cfg.model = model_cfg
    run_cfg.preset = f"paper-{dataset}"
    apply_reference_recipe(run_cfg.train, opt, _RECIPE)
    embed = strip_prefix(dict(parts[1]))["embed.weight"]
    run_cfg.text = dataclasses.replace(run_cfg.text, word_dim=int(embed.shape[1]))
    vocab = scan_text_dir() / "vocab" / f"{dataset}_precomp_vocab.json"
    if vocab.is_file():
        run_cfg.text.vocab_path = str(vocab)
    state = reference_state_to_itmkit(parts)
    check_converted(LHSC(model_cfg, run_cfg.text, int(embed.shape[0]) + 1), state, name, "LHSC")
    return run_cfg, state


METHOD = MethodSpec(
    name="lhsc",
    config_cls=LHSCConfig,
    build=build,
    presets=PRESETS,
    spec="lhsc.md §3-§5",
    description="LHSC (Zeng et al., ICMR 2022): SGRAF-SAF with four region-graph blocks on the regions "
    "and four word self-attention blocks before the GRU",
    convert_checkpoint=convert_checkpoint,
)
