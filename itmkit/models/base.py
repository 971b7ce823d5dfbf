"""The interface every method's model implements, so one trainer and one evaluator serve all.

A model encodes images and captions separately (each once per evaluation) and scores them:

- *embedding* methods (VSE∞): ``encode_*`` return pooled unit vectors ``[n, d]``;
  ``similarity`` is one matrix product (baselines.md §B.4).
- *pairwise* methods (SCAN, SGRAF, CHAN, ESL, ...): ``encode_*`` return sets
  (``[n_img, n_regions, d]``, ``[n_cap, n_words, d]`` with lengths) and ``score_block`` scores
  every (image, caption) combination of two blocks; :func:`itmkit.similarity.engine.pairwise_similarity`
  tiles the full matrix into memory-bounded blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from itmkit.encoded import Encoded

if TYPE_CHECKING:
    from itmkit.data.precomp import PrecompSplit

# The standard names of Explanation.parts, so that one figure serves every method that has the
# quantity. Methods add their own keys beside these (documented in their ``explain``).
WORD_REGION_WEIGHTS = "word_region_weights"  # [n_words, n_regions]: each word's weights over regions (rows sum to 1)
REGION_WORD_WEIGHTS = "region_word_weights"  # [n_regions, n_words]: each region's weights over words
WORD_SCORES = "word_scores"  # [n_words]: per-word relevance / similarity to the image
REGION_SCORES = "region_scores"  # [n_regions]: per-region relevance / similarity to the caption


@dataclass
class Explanation:
    """What a model computed for one (image, caption) pair, for figures and teaching.

    Attributes:
        method: the registry name of the method (``"scan"``, ``"sgraf"``, ...).
        score: the pair's similarity; equals ``model.similarity(image, caption)[0, 0]``.
        n_regions: valid regions of the image (padding removed).
        n_words: valid tokens of the caption (padding removed; ``<start>``/``<end>`` kept when the
            text pipeline adds them, so ``parts`` line up with ``pipeline.tokens(caption)``).
        parts: named intermediates, unpadded numpy arrays (or floats). Standard keys:
            ``word_region_weights [n_words, n_regions]``, ``region_word_weights [n_regions, n_words]``,
            ``word_scores [n_words]``, ``region_scores [n_regions]``; each method documents the
            others it adds (graph edges, levels, gates, ...).
    """

    method: str
    score: float
    n_regions: int
    n_words: int
    parts: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        try:
            return self.parts[key]
        except KeyError:
            raise KeyError(f"{self.method} explanation has no {key!r}; it has {sorted(self.parts)}") from None

    def __contains__(self, key: str) -> bool:
        return key in self.parts


def check_one_pair(image: Encoded, caption: Encoded) -> tuple[int, int]:
    """``(n_regions, n_words)`` of the one image and one caption an ``explain`` receives; anything
    but ``len == 1`` on each side raises. Pooled ``[1, d]`` encodings count as 1 region / 1 word."""
    if len(image) != 1 or len(caption) != 1:
        raise ValueError(f"explain: expected one image and one caption, found {len(image)} and {len(caption)}")
    n_regions = int(image.lengths[0]) if image.lengths is not None else 1
    n_words = int(caption.lengths[0]) if caption.lengths is not None else 1
    return n_regions, n_words


def as_numpy(tensor: Tensor) -> np.ndarray:
    """A detached CPU numpy copy of ``tensor`` (its dtype kept), for :attr:`Explanation.parts`."""
    return tensor.detach().cpu().numpy()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no dropout, BatchNorm on running statistics) and give it back
    in the mode it had: explanations show evaluation numbers and leave the model as found."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class MatchingModel(nn.Module):
    """Base class: image encoder + text encoder + similarity.

    Subclasses set ``pairwise`` and implement ``encode_images``, ``encode_captions`` and (pairwise
    methods) ``score_block``. ``similarity`` is what the trainer and evaluator call.
    """

    pairwise: bool = False
    method_name: str = ""  # the registry name, carried by every Explanation (each method sets it)
    # state-dict prefixes of the similarity part: the parameters between the encoders' outputs and
    # the score (SGRAF "sim."); empty when the similarity has none (SCAN, CHAN)
    similarity_prefixes: tuple[str, ...] = ()

    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, K, D]`` float (zero-padded), ``lengths [B]`` long -> :class:`Encoded`."""
        raise NotImplementedError

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]`` long ids (0-padded), ``lengths [B]`` long -> :class:`Encoded`."""
        raise NotImplementedError

    def images_from_regions(self, regions: Tensor, lengths: Tensor) -> Encoded:
        """The similarity's per-image part: region embeddings as the image encoder outputs them
        (``[n, K, d]``, zero beyond ``lengths [n]``) -> the :class:`Encoded` :meth:`similarity`
        reads. ``encode_images`` is the image encoder followed by this; scoring features you hold
        (:func:`itmkit.similarity.scoring.score_sets`) starts here. Default: the sets as they are."""
        return Encoded(regions, lengths.to(regions.device))

    def captions_from_words(self, words: Tensor, lengths: Tensor) -> Encoded:
        """The similarity's per-caption part: word embeddings as the text encoder outputs them
        (``[n, L, d]``, ``lengths [n]``) -> the :class:`Encoded` :meth:`similarity` reads."""
        return Encoded(words, lengths.to(words.device))

    def prepare_data(self, split: "PrecompSplit", pipeline: Any) -> tuple["PrecompSplit", Any]:
        """The split and text pipeline as this model's encoders read them; unchanged by default.

        The trainer and :func:`itmkit.evaluate.evaluator.encode_split` pass every split through
        here before reading it, so a method that needs more than region features and caption
        ids gets them through the same loaders (CEFG appends each region's spatial adjacency
        row to its features, cefg.md §3.4). Must be idempotent (a prepared split passes again).
        """
        return split, pipeline

    def score_block(self, images: Encoded, captions: Encoded) -> Tensor:
        """Pairwise methods: ``[n_img_block, n_cap_block]`` scores for every combination.

        Must be vectorised over both blocks (no Python loop per caption or image) and must not
        depend on padding: extra padded words or regions leave every score unchanged.
        """
        raise NotImplementedError(f"{type(self).__name__} is not a pairwise method")

    def pair_workspace_bytes(self, images: Encoded, captions: Encoded) -> int:
        """Working memory (bytes) that ``score_block`` needs per (image, caption) pair.

        The engine divides its memory budget by this to size blocks. The default assumes a
        handful of ``[K, L]`` and ``[L, d]``-sized temporaries per pair; methods override it.
        """
        k = images.feats.shape[1] if images.feats.dim() == 3 else 1
        words = captions.feats.shape[1] if captions.feats.dim() == 3 else 1
        d = captions.feats.shape[-1]
        elem = captions.feats.element_size()
        return elem * (8 * k * words + 2 * words * d + 2 * k * d)

    def similarity(self, images: Encoded, captions: Encoded, **engine_options: Any) -> Tensor:
        """``[n_img, n_cap]`` similarity matrix (row = image, column = caption)."""
        if not self.pairwise:
            return images.feats @ captions.feats.t()
        from itmkit.similarity.engine import pairwise_similarity

        return pairwise_similarity(self, images, captions, **engine_options)

    def param_groups(self, lr: float, backbone_lr_scale: float = 0.1) -> list[dict[str, Any]]:
        """Optimiser parameter groups. Parameters under a ``text.backbone`` module (a pretrained
        transformer) train at ``lr * backbone_lr_scale``, as VSE∞ does for BERT (§B.6)."""
        backbone, rest = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (backbone if ".backbone." in f".{name}" else rest).append(param)
        groups = [{"params": rest, "lr": lr, "name": "main"}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * backbone_lr_scale, "name": "backbone"})
        return groups

    @torch.no_grad()
    def explain(self, image: Encoded, caption: Encoded) -> Explanation:
        """One encoded image and one encoded caption (``len == 1`` each) -> :class:`Explanation`.

        The base version gives the score only; methods override it to add their intermediates
        (unpadded, on the CPU, as numpy; :func:`check_one_pair`, :func:`as_numpy`). Must not change
        the model's state: evaluation numbers, computed under :func:`eval_mode`.
        """
        n_regions, n_words = check_one_pair(image, caption)
        with eval_mode(self):
            score = float(self.similarity(image, caption).reshape(-1)[0])
        return Explanation(self.method_name, score, n_regions, n_words, {})


    @torch.no_grad()
    def describe(self) -> dict[str, int]:
        """Parameter counts, for run summaries."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"parameters": total, "trainable": trainable}
