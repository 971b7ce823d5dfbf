"""What the explorer shows, as plain data and static figures.

Every view of the widget app (:mod:`itmkit.explorer.app`) has a static twin here: a table
(pandas) and a matplotlib figure, so a headless run, an exported notebook or a reader without a
live kernel still sees the rankings and the alignment. The widgets call these same functions.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pandas as pd

from itmkit.evaluate.retrieval import TopK
from itmkit.explorer.session import ExplorerSession, TextQuery
from itmkit.figures.alignment import word_region_figure
from itmkit.figures.images import image_to_text_figure, text_to_image_figure


def image_ranking_table(session: ExplorerSession, query: TextQuery) -> pd.DataFrame:
    """The ``k`` best images of a typed caption: ``rank, image, image_id, score``."""
    found = query.found
    ids = session.split.image_ids
    return pd.DataFrame({
        "rank": np.arange(1, found.k + 1),
        "image": found.indices[0],
        "image_id": [int(ids[i]) if ids is not None else int(i) for i in found.indices[0]],
        "score": found.scores[0],
    })


def caption_ranking_table(session: ExplorerSession, found: TopK) -> pd.DataFrame:
    """The ``k`` best captions of one image: ``rank, caption, score, match, text``."""
    return pd.DataFrame({
        "rank": np.arange(1, found.k + 1),
        "caption": found.indices[0],
        "score": found.scores[0],
        "match": found.is_match[0],
        "text": [session.split.captions[int(c)] for c in found.indices[0]],
    })


def compare_image_rankings(sessions: Sequence[ExplorerSession], text: str, k: int = 5) -> pd.DataFrame:
    """Side by side: the ``k`` best images of ``text`` under each run (columns
    ``<label>: image`` and ``<label>: score``, one row per rank). The runs must explore the
    same split, or the image numbers would not name the same pictures."""
    if not sessions:
        raise ValueError("compare_image_rankings: expected at least one run, found none")
    first = sessions[0]
    columns: dict[str, object] = {"rank": np.arange(1, k + 1)}
    for session in sessions:
        if (session.split.root, session.split.split) != (first.split.root, first.split.split):
            raise ValueError(
                f"compare_image_rankings: run {session.label} explores {session.split.root} "
                f"{session.split.split!r}, expected the split of {first.label} ({first.split.root} {first.split.split!r})"
            )
        found = session.images_for_text(text, k).found
        columns[f"{session.label}: image"] = found.indices[0]
        columns[f"{session.label}: score"] = found.scores[0]
    return pd.DataFrame(columns)


def ranked_images_figure(session: ExplorerSession, query: TextQuery):
    """The typed caption and its ``k`` best pictures with their scores (static view)."""
    title = f"{session.label}"
    if query.unknown:
        title += f"  (unknown words: {', '.join(query.unknown)})"
    return text_to_image_figure(query.found, [query.text], session.picture, title=title)


def ranked_captions_figure(session: ExplorerSession, found: TopK):
    """One picture and its ``k`` best captions, true ones in green (static view)."""
    return image_to_text_figure(found, session.split.captions, session.picture, title=session.label)


def alignment_view(session: ExplorerSession, image: int, text: str, max_words: int = 10):
    """Where each word of ``text`` looks on image ``image`` (one panel per word, at most
    ``max_words``), or ``None`` for methods without word-region weights or splits without boxes."""
    explanation = session.alignment(image, text)
    boxes = session.boxes(image)
    if explanation is None or boxes is None:
        return None
    words = session.pipeline.tokens(text)
    shown = list(range(min(len(words), max_words)))
    return word_region_figure(session.picture(image), boxes, words, explanation, shown=shown,
                              suptitle=f"{session.label}: image {image}")  # fmt: skip


def thumbnail_png(picture: np.ndarray, size: int = 128) -> bytes:
    """PNG bytes of ``picture`` ``[H, W, 3]`` scaled to fit ``size`` pixels (for image widgets)."""
    from PIL import Image

    image = Image.fromarray(np.asarray(picture, dtype=np.uint8))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
