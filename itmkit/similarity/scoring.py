"""Score encoded sets you already hold with a model's similarity part.

Two inputs are accepted on each side:

- an :class:`~itmkit.encoded.Encoded` that the model's own ``encode_images`` /
  ``encode_captions`` returned: scored as it is;
- plain tensors: region embeddings ``[n_img, K, d]`` and word embeddings ``[n_cap, L, d]`` as
  the encoders output them (e.g. projected features computed elsewhere, or by the reference
  encoders), with their lengths (``None``: every position is real). The model's per-item
  similarity work (``images_from_regions`` / ``captions_from_words``: SGRAF's global vectors,
  ESL's levels, VSE∞'s GPO pooling) runs first. An embedding method also takes pooled vectors
  ``[n, d]``.

With :func:`itmkit.checkpoints.load_similarity_part` the similarity can come alone from a
reference checkpoint: no encoders to swap for pass-through modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from itmkit.encoded import Encoded
from itmkit.models.base import MatchingModel, eval_mode


def _as_sets(model: MatchingModel, sets: Encoded | Tensor, lengths: Tensor | None, side: str) -> Encoded:
    if isinstance(sets, Encoded):
        if lengths is not None:
            raise ValueError(f"score_sets {side}_lengths: an Encoded carries its own lengths, found both")
        return sets
    if not isinstance(sets, Tensor):
        raise TypeError(f"score_sets {side}: expected an Encoded or a tensor, found {type(sets).__name__}")
    device = next(model.parameters()).device
    sets = sets.to(device=device, dtype=next(model.parameters()).dtype)
    if sets.dim() == 2:
        if model.pairwise:
            raise ValueError(
                f"score_sets {side}: expected [n, T, d] sets for the pairwise method {model.method_name!r}, "
                f"found pooled vectors {tuple(sets.shape)}"
            )
        return Encoded(sets)
    if sets.dim() != 3:
        raise ValueError(f"score_sets {side}: expected [n, T, d] sets (or [n, d] vectors), found {tuple(sets.shape)}")
    n, steps = sets.shape[:2]
    if lengths is None:
        lengths = torch.full((n,), steps, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if lengths.shape != (n,) or bool((lengths < 1).any()) or bool((lengths > steps).any()):
        raise ValueError(f"score_sets {side}_lengths: expected {n} lengths in [1, {steps}], found {lengths.tolist()}")
    sets = sets.masked_fill(~(torch.arange(steps, device=device)[None] < lengths[:, None])[..., None], 0.0)
    return model.images_from_regions(sets, lengths) if side == "images" else model.captions_from_words(sets, lengths)


@torch.no_grad()
def score_sets(
    model: MatchingModel,
    images: Encoded | Tensor,
    captions: Encoded | Tensor,
    image_lengths: Tensor | None = None,
    caption_lengths: Tensor | None = None,
    **engine_options: Any,
) -> Tensor:
    """``[n_img, n_cap]`` scores of every image against every caption, from sets you hold.

    Args:
        model: any :class:`MatchingModel`; run in eval mode, given back in the mode it had.
        images: ``Encoded`` from ``model.encode_images``, or region embeddings ``[n_img, K, d]``
            (the image encoder's output; positions beyond ``image_lengths`` are ignored).
        captions: ``Encoded`` from ``model.encode_captions``, or word embeddings ``[n_cap, L, d]``.
        image_lengths / caption_lengths: ``[n]`` real positions of tensor inputs (None: all).
        engine_options: passed to :func:`~itmkit.similarity.engine.pairwise_similarity`
            (``memory_budget``, ``device``, ``progress``, ...).
    """
    with eval_mode(model):
        image_sets = _as_sets(model, images, image_lengths, "images")
        caption_sets = _as_sets(model, captions, caption_lengths, "captions")
        return model.similarity(image_sets, caption_sets, **engine_options)
