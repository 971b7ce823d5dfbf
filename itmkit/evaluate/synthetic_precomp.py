"""Small synthetic precomp folders with learnable structure, for tests and benchmarks.

Each image shows one (colour, shape) pair: half of its ``n_regions`` regions carry the colour's
prototype vector, the other half the shape's, plus Gaussian noise; its five captions name the
colour and the shape in five templates. A model that learns the pairing beats chance clearly,
so a few training steps move the recalls. Files follow baselines.md §A.1 exactly
(``{split}_ims.npy`` float32 ``[n_img, K, D]``, ``{split}_caps.txt`` with 5 lines per image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")
TEMPLATES = (
    "a {colour} {shape}",
    "the {shape} is {colour}",
    "a {colour} {shape} on a white table",
    "there is a {colour} {shape} here",
    "one {shape} painted {colour}",
)


def synthetic_features(concepts: np.ndarray, prototypes: np.ndarray, n_regions: int, rng: np.random.Generator,
                       noise: float = 0.5) -> np.ndarray:
    """``[n_img, n_regions, D]`` float32 for ``concepts [n_img, 2]`` (colour, shape) ids and
    ``prototypes [n_colours + n_shapes, D]`` (shared by all splits)."""
    feature_dim = prototypes.shape[1]
    n_img = len(concepts)
    half = max(1, n_regions // 2)
    which = np.where(np.arange(n_regions) < half, 0, 1)  # region -> colour (0) or shape (1) slot
    ids = concepts[:, which] + np.where(which == 1, len(COLOURS), 0)  # [n_img, n_regions]
    feats = rng.standard_normal((n_img, n_regions, feature_dim), dtype=np.float32)
    feats *= noise
    feats += prototypes[ids]
    return feats


def write_synthetic_precomp(
    root: str | Path,
    split_sizes: dict[str, int] | None = None,
    n_regions: int = 4,
    feature_dim: int = 8,
    seed: int = 0,
    captions: dict[str, list[str]] | None = None,
) -> Path:
    """Write ``root/{split}_ims.npy`` and ``{split}_caps.txt`` for each split; returns ``root``.

    Args:
        split_sizes: images per split (default train 40, dev 12, test 10).
        captions: optional real captions per split (5 per image) used instead of the templates;
            the features then carry no relation to them.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    split_sizes = split_sizes or {"train": 40, "dev": 12, "test": 10}
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(len(COLOURS) + len(SHAPES), feature_dim)).astype(np.float32)
    for split, n_img in split_sizes.items():
        concepts = np.stack([rng.integers(0, len(COLOURS), n_img), rng.integers(0, len(SHAPES), n_img)], axis=1)
        np.save(root / f"{split}_ims.npy", synthetic_features(concepts, prototypes, n_regions, rng))
        if captions is not None and split in captions:
            lines = captions[split]
            if len(lines) != 5 * n_img:
                raise ValueError(f"write_synthetic_precomp captions[{split!r}]: expected {5 * n_img} lines, found {len(lines)}")
        else:
            lines = [t.format(colour=COLOURS[c], shape=SHAPES[s]) for c, s in concepts for t in TEMPLATES]
        (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
