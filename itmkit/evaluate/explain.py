"""Explain one (image, caption) pair of a split from raw data: encode both, call ``model.explain``.

Notebooks, figures and the CLI start from what they hold (a trained model, its text pipeline, a
:class:`~itmkit.data.precomp.PrecompSplit`, an image index and a caption index or any text) and
get the method's :class:`~itmkit.models.base.Explanation` (named, unpadded intermediates; each
method documents its parts in its ``explain``). The words the parts line up with are
``pipeline.tokens(text)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from itmkit.data.precomp import PrecompSplit
from itmkit.encoded import Encoded
from itmkit.evaluate.evaluator import encode_split_images, encode_texts
from itmkit.models.base import Explanation, MatchingModel

#: Label of the caption's global node in graph-based explanations (SGRAF, LHSC, CEFG: node 0).
GLOBAL_NODE = "<global>"


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


def word_parts_of_matching_pairs(
    model: MatchingModel,
    images: Encoded,
    captions: Encoded,
    image_of_caption: Sequence[int] | np.ndarray,
    tokens: Sequence[Sequence[str]],
    key: str,
    *,
    leading_nodes: Sequence[str] = (),
    **options: Any,
) -> pd.DataFrame:
    """One explanation part per word, over every caption explained with its own image.

    Args:
        model: a trained model whose ``explain`` returns ``key`` as one value per node.
        images: the encoded images of a split ``[n_img, R, d]``; captions: its encoded captions
            ``[n_cap, L, d]`` (as :func:`~itmkit.evaluate.evaluator.encode_split` gives them).
        image_of_caption: ``[n_cap]`` the image each caption describes.
        tokens: the words of each caption (``pipeline.tokens(text)``), which the part lines up with.
        key: the explanation part, e.g. SAF's ``"filtration_weights"`` (``[n_words + 1]``).
        leading_nodes: labels of nodes the part carries before the words (SAF: ``(GLOBAL_NODE,)``).
        options: passed to ``model.explain``.

    Returns:
        Rows ``caption, position, word, value``; ``position`` counts the leading nodes too. A part
        whose length is not ``len(leading_nodes) + len(words)`` raises ``ValueError`` naming the
        caption, so a misaligned tokeniser cannot silently shift words onto other words' values.
    """
    image_of_caption = np.asarray(image_of_caption)
    if len(image_of_caption) != len(captions) or len(tokens) != len(captions):
        raise ValueError(
            f"word_parts_of_matching_pairs: expected one image index and one token list per caption "
            f"({len(captions)} captions), found {len(image_of_caption)} and {len(tokens)}"
        )
    rows = []
    device = images.feats.device
    with torch.no_grad():
        for c, words in enumerate(tokens):
            image = images.select(torch.tensor([int(image_of_caption[c])], device=device))
            caption = captions.select(torch.tensor([c], device=captions.feats.device))
            values = np.asarray(model.explain(image, caption, **options)[key], dtype=float).reshape(-1)
            labels = [*leading_nodes, *words]
            if len(values) != len(labels):
                raise ValueError(
                    f"caption {c}: explanation part {key!r} has {len(values)} values, expected "
                    f"{len(labels)} ({len(leading_nodes)} leading nodes + {len(words)} words)"
                )
            rows += [(c, position, word, value) for position, (word, value) in enumerate(zip(labels, values))]
    return pd.DataFrame(rows, columns=["caption", "position", "word", "value"])


def mean_by_word(parts: pd.DataFrame, min_count: int = 1) -> pd.DataFrame:
    """Mean ``value`` and ``count`` per ``word`` of :func:`word_parts_of_matching_pairs`' rows,
    words seen fewer than ``min_count`` times left out, sorted by the mean (lowest first)."""
    table = parts.groupby("word")["value"].agg(["mean", "count"])
    return table[table["count"] >= min_count].sort_values(["mean", "count"], kind="stable")

