"""The reported evaluation settings (baselines.md §C.2) as functions of one similarity matrix.

| name | matrix | metrics |
| --- | --- | --- |
| ``test`` | the whole matrix (any size) | one row |
| ``f30k-1k`` | Flickr30K ``test``: the whole 1,000 x 5,000 matrix | one row |
| ``coco-5k`` | COCO ``testall``: the whole 5,000 x 25,000 matrix | one row |
| ``coco-5fold-1k`` | COCO ``testall``: its 5 diagonal blocks (fold ``f`` = images ``f*n/5 ..``, captions ``f*5n/5 ..``) | one row per fold + their mean |

For 5-fold, every metric (R@K, medr, meanr, rsum) is averaged over the folds; the rsum of the
means equals the mean of the rsums. Computing R@K on the whole 5K matrix is the ``coco-5k``
protocol, a different (lower) number (§F.6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from itmkit.evaluate.metrics import METRIC_NAMES, as_score_array, check_caption_count, recall_metrics


@dataclass(frozen=True)
class Protocol:
    """An evaluation setting: ``n_folds`` diagonal blocks (1 = the whole matrix).

    ``expected_images`` is the image count the setting is defined for (``None``: any). A matrix
    of another size is refused: numbers labelled ``coco-5k`` from a 16-image split would be
    compared with the papers' (use ``test``, the whole matrix of any size, instead).
    """

    name: str
    n_folds: int = 1
    expected_images: int | None = None
    description: str = ""


PROTOCOLS: dict[str, Protocol] = {
    "test": Protocol("test", 1, None, "the whole matrix"),
    "f30k-1k": Protocol("f30k-1k", 1, 1000, "Flickr30K test, 1,000 images x 5,000 captions"),
    "coco-5k": Protocol("coco-5k", 1, 5000, "COCO testall, 5,000 images x 25,000 captions at once"),
    "coco-5fold-1k": Protocol("coco-5fold-1k", 5, 5000, "COCO testall, 5 folds of 1K, metrics averaged"),
}

METRIC_COLUMNS = ["protocol", "fold", "n_images", "n_captions", *METRIC_NAMES]


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise KeyError(f"evaluation protocol {name!r}: expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def check_protocol_size(protocol: str | Protocol, n_img: int, n_cap: int | None = None,
                        captions_per_image: int = 5) -> Protocol:
    """The :class:`Protocol` named, if a ``[n_img, n_cap]`` matrix is the size it is defined for;
    else ``ValueError`` naming the protocol, the size it needs and the size found."""
    proto = get_protocol(protocol) if isinstance(protocol, str) else protocol
    if proto.expected_images is not None and n_img != proto.expected_images:
        need = f"{proto.expected_images} images x {proto.expected_images * captions_per_image} captions"
        found = f"{n_img} images" + (f" x {n_cap} captions" if n_cap is not None else "")
        raise ValueError(f"protocol {proto.name!r} ({proto.description}): expected {need}, found {found}; "
                         "use protocol 'test' to evaluate the whole matrix of any size")  # fmt: skip
    return proto


def fold_slices(n_img: int, n_folds: int, captions_per_image: int = 5) -> list[tuple[slice, slice]]:
    """``(image rows, caption columns)`` of each diagonal fold block; ``n_img`` must divide evenly."""
    if n_folds < 1 or n_img % n_folds != 0:
        raise ValueError(f"{n_folds}-fold evaluation: expected an image count divisible by {n_folds}, found {n_img}")
    size = n_img // n_folds
    return [
        (slice(f * size, (f + 1) * size), slice(f * size * captions_per_image, (f + 1) * size * captions_per_image))
        for f in range(n_folds)
    ]


def evaluate_protocol(sims, protocol: str | Protocol, captions_per_image: int = 5,
                      source: str = "similarity matrix") -> pd.DataFrame:
    """Metrics of ``sims [n_img, n_cap]`` under one protocol, as a DataFrame (``METRIC_COLUMNS``).

    Whole-matrix protocols give one row with ``fold = "all"``; ``coco-5fold-1k`` gives rows
    ``fold = "0" .. "4"`` and the summary row ``fold = "mean"``. ``source`` names the matrix in
    errors (non-finite scores).
    """
    S = as_score_array(sims)
    n_img, n_cap = S.shape
    proto = check_protocol_size(protocol, n_img, n_cap, captions_per_image)
    check_caption_count(n_img, n_cap, captions_per_image)
    rows = []
    if proto.n_folds == 1:
        rows.append({"protocol": proto.name, "fold": "all", "n_images": n_img, "n_captions": n_cap,
                     **recall_metrics(S, captions_per_image, source)})  # fmt: skip
    else:
        for f, (img_rows, cap_cols) in enumerate(fold_slices(n_img, proto.n_folds, captions_per_image)):
            block = np.asarray(S[img_rows, cap_cols])
            rows.append({"protocol": proto.name, "fold": str(f), "n_images": block.shape[0],
                         "n_captions": block.shape[1],
                         **recall_metrics(block, captions_per_image, f"{source} (fold {f})")})  # fmt: skip
        folds = pd.DataFrame(rows)
        mean = {name: float(folds[name].mean()) for name in METRIC_NAMES}
        rows.append({"protocol": proto.name, "fold": "mean", "n_images": int(folds["n_images"].iloc[0]),
                     "n_captions": int(folds["n_captions"].iloc[0]), **mean})  # fmt: skip
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def evaluate_protocols(sims, protocols, captions_per_image: int = 5, source: str = "similarity matrix") -> pd.DataFrame:
    """:func:`evaluate_protocol` for each name in ``protocols``, rows stacked."""
    if isinstance(protocols, (str, Protocol)):
        protocols = [protocols]
    S = as_score_array(sims)
    for p in protocols:  # every refused size before any metric is computed
        check_protocol_size(p, *S.shape, captions_per_image)
    frames = [evaluate_protocol(S, p, captions_per_image, source) for p in protocols]
    return pd.concat(frames, ignore_index=True)


def summary_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per protocol: the ``all`` row or the fold ``mean`` row."""
    return metrics[metrics["fold"].isin(["all", "mean"])].reset_index(drop=True)


def default_protocols(split: str, n_images: int | None = None) -> list[str]:
    """COCO ``testall`` (5,000 images) is reported both ways (§C.2); any other split, or a
    ``testall`` of another size, as the whole matrix."""
    coco = PROTOCOLS["coco-5k"].expected_images
    return ["coco-5fold-1k", "coco-5k"] if split == "testall" and n_images in (None, coco) else ["test"]
