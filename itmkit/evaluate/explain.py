"""Explain one (image, caption) pair of a split from raw data: encode both, call ``model.explain``.

Notebooks, figures and the CLI start from what they hold (a trained model, its text pipeline, a
:class:`~itmkit.data.precomp.PrecompSplit`, an image index and a caption index or any text) and
get the method's :class:`~itmkit.models.base.Explanation` (named, unpadded intermediates; each
method documents its parts in its ``explain``). The words the parts line up with are
``pipeline.tokens(text)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from itmkit.data.precomp import PrecompSplit
from itmkit.evaluate.evaluator import encode_split_images, encode_texts
from itmkit.models.base import Explanation, MatchingModel


def caption_text(split: PrecompSplit, caption: int | str) -> str:
    """The text of caption ``caption`` of ``split`` (an index), or ``caption`` itself (any text)."""
    if isinstance(caption, str):
        return caption
    if not isinstance(caption, (int, np.integer)) or not 0 <= int(caption) < split.n_captions:
        raise IndexError(
            f"{split.root} split {split.split!r}: caption {caption!r}: expected an index in "
            f"[0, {split.n_captions}) or a text"
        )
    return split.captions[int(caption)]


def explain_pair(
    model: MatchingModel, pipeline, split: PrecompSplit, image: int, caption: int | str, **options: Any
) -> Explanation:
    """``model.explain`` of image ``image`` of ``split`` against ``caption`` (an index into
    ``split.captions`` or any text), encoded as the evaluation encodes them (eval mode, no
    augmentation, every region). ``options`` go to the method's ``explain`` (e.g. SCAN's
    ``lambda_softmax``, CHAN's ``coding_name``). The model is left in the mode it was in."""
    device = next(model.parameters()).device
    images = encode_split_images(model, split, [image], device).to(device)
    captions = encode_texts(model, pipeline, [caption_text(split, caption)], device).to(device)
    with torch.no_grad():
        return model.explain(images, captions, **options)
