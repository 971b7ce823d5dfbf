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

from typing import Any

import torch
from torch import Tensor, nn

from itmkit.encoded import Encoded


class MatchingModel(nn.Module):
    """Base class: image encoder + text encoder + similarity.

    Subclasses set ``pairwise`` and implement ``encode_images``, ``encode_captions`` and (pairwise
    methods) ``score_block``. ``similarity`` is what the trainer and evaluator call.
    """

    pairwise: bool = False

    def encode_images(self, images: Tensor, lengths: Tensor) -> Encoded:
        """``images [B, K, D]`` float (zero-padded), ``lengths [B]`` long -> :class:`Encoded`."""
        raise NotImplementedError

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """``tokens [B, L]`` long ids (0-padded), ``lengths [B]`` long -> :class:`Encoded`."""
        raise NotImplementedError

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
    def describe(self) -> dict[str, int]:
        """Parameter counts, for run summaries."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"parameters": total, "trainable": trainable}
