"""One trained run opened on one split, ready to answer the explorer's questions.

:class:`ExplorerSession` loads a run (:func:`itmkit.runs.load_run`), opens a split and encodes its
images and captions once (:func:`itmkit.evaluate.evaluator.encode_split`, as the evaluation does),
then answers, without re-encoding the split:

- :meth:`~ExplorerSession.images_for_text`: a typed caption -> its ``k`` best images with scores,
  and the words the run's vocabulary does not know (they are reported, never silently dropped);
- :meth:`~ExplorerSession.captions_for_image`: an image -> its ``k`` best captions, true ones marked;
- :meth:`~ExplorerSession.alignment`: the word -> region weights of one (image, text) pair for
  methods whose ``explain`` has them (SCAN, SGRAF, CHAN, ESL, LHSC, CEFG), ``None`` otherwise.

Rankings are :class:`~itmkit.evaluate.retrieval.TopK` (the metrics' rank rule, ties included), so
what the explorer shows is what the recalls count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itmkit.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit
from itmkit.data.region_features import load_rgb_image
from itmkit.evaluate.evaluator import encode_split, encode_texts, similarity_matrix
from itmkit.evaluate.explain import explain_pair
from itmkit.evaluate.retrieval import TopK, captions_for_images, top_k
from itmkit.explorer.catalog import picture_path
from itmkit.models.base import REGION_WORD_WEIGHTS, WORD_REGION_WEIGHTS, Explanation
from itmkit.runs import load_run


def unknown_words(pipeline: Any, text: str) -> list[str]:
    """The tokens of ``text`` the pipeline cannot represent: words outside a word-id vocabulary
    (they become ``<unk>``), or the tokenizer's unknown token for Hugging Face pipelines."""
    tokens = pipeline.tokens(text)
    vocab = getattr(pipeline, "vocab", None)
    if vocab is not None:
        return [t for t in tokens if t not in vocab]
    unk = getattr(getattr(pipeline, "tokenizer", None), "unk_token", None)
    return [t for t in tokens if unk is not None and t == unk]


@dataclass
class TextQuery:
    """The answer to a typed caption.

    Attributes:
        text: the caption as typed; tokens: what the run's pipeline made of it.
        unknown: tokens the run's vocabulary does not know (scored as ``<unk>``).
        found: the ``k`` best images (``found.indices[0]``, ``found.scores[0]``; no true match).
    """

    text: str
    tokens: list[str]
    unknown: list[str]
    found: TopK


class ExplorerSession:
    """A trained run on one split (see the module doc).

    Args:
        run: a run folder or checkpoint the trainer wrote.
        split: the split to explore (``"test"``).
        data_dir: the precomp folder; default: the run's own data (``resolve_data_dir``).
        device: where to score (``"cpu"`` by default: the explorer is interactive, not batch).
    """

    def __init__(self, run: str | Path, split: str = "test", data_dir: str | Path | None = None,
                 device: str = "cpu", progress: bool = False) -> None:  # fmt: skip
        from itmkit.train.trainer import resolve_data_dir

        self.run = Path(run)
        self.model, self.config, self.pipeline = load_run(run, device=device)
        self.model.eval()
        self.data_dir = Path(data_dir) if data_dir is not None else resolve_data_dir(self.config)
        self.split = PrecompSplit.open(self.data_dir, split)
        self.images, self.captions = encode_split(self.model, self.split, self.pipeline, progress=progress)
        self.sims = np.asarray(similarity_matrix(self.model, self.images, self.captions, progress=progress))

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def label(self) -> str:
        return f"{self.run.name} ({self.method}, {self.config.preset})"

    @property
    def has_alignment(self) -> bool:
        """Whether :meth:`alignment` can draw word -> region weights (pairwise methods)."""
        return bool(self.model.pairwise)

    def images_for_text(self, text: str, k: int = 5) -> TextQuery:
        """The ``k`` best images of the split for ``text`` (any caption, typed)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("explorer caption: expected some text, found an empty caption")
        captions = encode_texts(self.model, self.pipeline, [text])
        scores = np.asarray(similarity_matrix(self.model, self.images, captions, progress=False))[:, 0]
        return TextQuery(text, self.pipeline.tokens(text), unknown_words(self.pipeline, text), top_k(scores, k))

    def captions_for_image(self, image: int, k: int = 5) -> TopK:
        """The ``k`` best captions of image ``image``, its own captions marked (``is_match``)."""
        return captions_for_images(self.sims, [int(image)], k, captions_per_image=CAPTIONS_PER_IMAGE)

    def alignment(self, image: int, text: str) -> Explanation | None:
        """``explain`` of image ``image`` against ``text`` when the method has word-region
        weights, else ``None`` (embedding methods score one vector per side)."""
        if not self.has_alignment:
            return None
        explanation = explain_pair(self.model, self.pipeline, self.split, int(image), text)
        if WORD_REGION_WEIGHTS not in explanation and REGION_WORD_WEIGHTS not in explanation:
            return None
        return explanation

    def picture(self, image: int) -> np.ndarray:
        """The RGB picture ``[H, W, 3]`` of image ``image`` (the split must have pictures)."""
        path = picture_path(self.split, int(image))
        if path is None:
            raise FileNotFoundError(
                f"{self.split.root} split {self.split.split!r}: image {image}: expected a picture in "
                f"{self.split.root / 'images'} (named by its image id), found none"
            )
        return load_rgb_image(path)

    def boxes(self, image: int) -> np.ndarray | None:
        """The region boxes ``[R, 4]`` of image ``image`` (``None`` when the split has none)."""
        if self.split.boxes is None:
            return None
        return np.asarray(self.split.boxes[int(image) * self.split.image_step])  # rows may repeat each image
