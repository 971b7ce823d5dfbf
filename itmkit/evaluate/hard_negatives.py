"""Fine-grained diagnostics on the embedded set's hard-negative pairs (Winoground-style scores).

About half of the embedded set's pictures come in pairs that differ by one swap between two
objects: their colours (attribute binding), their places (relation) or their sizes
(``scenes.json``: ``partner``, ``swap``). One caption of each picture, its *focus caption*, states
the two swapped objects in full, so each pair gives two pictures ``I0, I1`` and two captions
``C0, C1`` where ``Ci`` describes ``Ii`` and not the other. With ``s(I, C)`` a model's score:

- **text score**: each picture prefers its own caption, ``s(I0,C0) > s(I0,C1)`` and
  ``s(I1,C1) > s(I1,C0)`` (chance 1/4 under random scores);
- **image score**: each caption prefers its own picture, ``s(I0,C0) > s(I1,C0)`` and
  ``s(I1,C1) > s(I0,C1)`` (chance 1/4);
- **group score**: both at once (chance 1/6).

Comparisons are strict: a tie counts as a failure, so a model that cannot tell the pictures apart
(equal scores) never scores. Recall@K hides all this: a model can retrieve well by recognising
*which* objects are in a picture without binding colours to shapes.

:func:`bag_of_words_similarity` is the check that the pairs measure what they claim: it scores a
caption against the words of a picture's own five captions, so it knows every word that fits the
picture but not which goes with which; on colour swaps (same sentences, colour words exchanged)
it ties by construction and scores 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from itmkit.data.embedded.captions import focus_caption_slot
from itmkit.data.errors import DataFormatError
from itmkit.evaluate.metrics import as_score_array

SWAP_KINDS = ("colour", "relation", "size")
SWAP_MEANING = {"colour": "attribute binding", "relation": "spatial relation", "size": "size binding"}
CHANCE = {"text": 25.0, "image": 25.0, "group": 100.0 / 6.0}
PAIR_COLUMNS = ["image_a", "image_b", "caption_a", "caption_b", "kind", "image_id_a", "image_id_b"]


def swap_pairs(root: str | Path, split: str = "test", captions_per_image: int = 5) -> pd.DataFrame:
    """The hard-negative pairs of an embedded split, one row per pair.

    Columns: ``image_a``, ``image_b`` (row indices of the split's ``[n_img, ...]`` arrays, ``a < b``),
    ``caption_a``, ``caption_b`` (column indices of its ``[n_img, n_cap]`` similarity matrix: each
    picture's focus caption), ``kind`` (``colour`` / ``relation`` / ``size``), and the image ids.

    Raises:
        DataFormatError: ``scenes.json`` or ``{split}_ids.txt`` missing or inconsistent (a precomp
            folder that is not an embedded set has no scenes).
    """
    root = Path(root)
    scenes_path, ids_path = root / "scenes.json", root / f"{split}_ids.txt"
    if not scenes_path.is_file():
        raise DataFormatError(scenes_path, "file", "the embedded set's scenes.json (hard-negative pairs)", "no such file")
    if not ids_path.is_file():
        raise DataFormatError(ids_path, "file", f"the {split} split's image ids", "no such file")
    ids = [int(line) for line in ids_path.read_text(encoding="utf-8").split()]
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    scenes = json.loads(scenes_path.read_text(encoding="utf-8"))["images"]
    by_id = {int(s["image_id"]): s for s in scenes if s.get("split") == split}
    rows = []
    for image_id, scene in sorted(by_id.items()):
        partner = scene.get("partner")
        if partner is None or image_id > partner:
            continue
        if partner not in by_id or image_id not in row_of or partner not in row_of:
            raise DataFormatError(scenes_path, f"images[{image_id}].partner", f"an image of the {split} split", partner)
        kind = scene["swap"]["kind"]
        if kind not in SWAP_KINDS:
            raise DataFormatError(scenes_path, f"images[{image_id}].swap.kind", f"one of {SWAP_KINDS}", kind)
        a, b = row_of[image_id], row_of[partner]
        slot_a = focus_caption_slot(np.random.default_rng(scene["caption_seed"]), captions_per_image)
        slot_b = focus_caption_slot(np.random.default_rng(by_id[partner]["caption_seed"]), captions_per_image)
        rows.append((a, b, a * captions_per_image + slot_a, b * captions_per_image + slot_b, kind, image_id, partner))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def swap_scores(sims, pairs: pd.DataFrame, source: str = "similarity matrix") -> pd.DataFrame:
    """Per pair: the four scores and whether the text, image and group tests pass.

    Args:
        sims: ``[n_img, n_cap]`` scores (array, memmap or tensor) of the split ``pairs`` came from.
        pairs: :func:`swap_pairs` output.
        source: named in the error when the scores of a pair are not finite.
    """
    S = as_score_array(sims)
    a, b = pairs["image_a"].to_numpy(), pairs["image_b"].to_numpy()
    ca, cb = pairs["caption_a"].to_numpy(), pairs["caption_b"].to_numpy()
    if len(pairs) and (max(a.max(), b.max()) >= S.shape[0] or max(ca.max(), cb.max()) >= S.shape[1]):
        raise ValueError(f"{source}: shape {S.shape} is too small for the pairs (largest image "
                         f"{max(a.max(), b.max())}, caption {max(ca.max(), cb.max())}); is it the same split?")  # fmt: skip
    own_a, own_b = S[a, ca], S[b, cb]
    a_with_cb, b_with_ca = S[a, cb], S[b, ca]
    four = np.stack([own_a, own_b, a_with_cb, b_with_ca])
    if not np.isfinite(four).all():
        bad = int(np.flatnonzero(~np.isfinite(four).all(axis=0))[0])
        raise ValueError(f"{source}: non-finite score for the pair of images {a[bad]} and {b[bad]}")
    text = (own_a > a_with_cb) & (own_b > b_with_ca)
    image = (own_a > b_with_ca) & (own_b > a_with_cb)
    out = pairs.copy()
    out["s_a_ca"], out["s_b_cb"], out["s_a_cb"], out["s_b_ca"] = own_a, own_b, a_with_cb, b_with_ca
    out["text"], out["image"], out["group"] = text, image, text & image
    return out


def swap_table(sims, pairs: pd.DataFrame, source: str = "similarity matrix") -> pd.DataFrame:
    """Text, image and group scores (%) per swap kind and over all pairs, with counts and chance.

    One row per kind present (``colour``, ``relation``, ``size``) plus ``all``; columns ``kind``,
    ``tests`` (what the kind measures), ``pairs``, ``text``, ``image``, ``group``,
    ``chance_text``, ``chance_image``, ``chance_group``.
    """
    scored = swap_scores(sims, pairs, source)
    rows = []
    groups = [(k, scored[scored["kind"] == k]) for k in SWAP_KINDS] + [("all", scored)]
    for kind, part in groups:
        if kind != "all" and part.empty:
            continue
        row = {"kind": kind, "tests": SWAP_MEANING.get(kind, "all swaps"), "pairs": len(part)}
        for test in ("text", "image", "group"):
            row[test] = 100.0 * float(part[test].mean()) if len(part) else float("nan")
        row.update({f"chance_{t}": c for t, c in CHANCE.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def bag_of_words_similarity(
    captions: Sequence[str],
    captions_per_image: int = 5,
    tokenize: Callable[[str], list[str]] | None = None,
    ignore: Sequence[str] = (),
) -> np.ndarray:
    """``[n_img, n_cap]`` cosine between each caption's word counts and each picture's words.

    A picture's words are the summed counts of its own ``captions_per_image`` captions (caption
    ``c`` belongs to picture ``c // captions_per_image``). This oracle knows every word that fits
    a picture but nothing of their order, so it must fail on colour swaps (ties). ``ignore``
    drops words (e.g. the colour names, for a model blind to colour).
    """
    if tokenize is None:
        from itmkit.data.tokenize import word_tokenize as tokenize
    skipped = {w.lower() for w in ignore}
    tokens = [[t for t in tokenize(c) if t.isalpha() and t not in skipped] for c in captions]
    vocab = {w: i for i, w in enumerate(sorted({t for ts in tokens for t in ts}))}
    counts = np.zeros((len(captions), max(len(vocab), 1)), dtype=np.float64)
    for row, ts in enumerate(tokens):
        for t in ts:
            counts[row, vocab[t]] += 1.0
    if len(captions) % captions_per_image:
        raise ValueError(f"bag_of_words_similarity: {len(captions)} captions is not a multiple of {captions_per_image}")
    pictures = counts.reshape(-1, captions_per_image, counts.shape[1]).sum(axis=1)

    def unit(x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)

    return (unit(pictures) @ unit(counts).T).astype(np.float64)
