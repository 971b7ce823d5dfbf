"""Direction-sector adjacency between the detected regions of an image (cefg.md §3.4).

CEFG's spatial context module lets every region gather a few spatially close regions. Which ones
is decided offline from the detection boxes by the reference's ``adj.py``; this module computes
the same ``[n_img, K, K]`` 0/1 matrices, vectorised over images:

1. boxes normalised by the image size ``(W, H, W, H)``; centres ``(x1, y1) + ½ (x2 − x1, y2 − y1)``;
2. for every ordered pair ``(i, j)``: ``Δx = c_j.x − c_i.x``, ``Δy = c_i.y − c_j.y`` (y up),
   ``ρ = √(Δx² + Δy²)``, ``θ = atan2(Δy, Δx)``; the diagonal gets ``(1e9, 1e9)``;
3. eight angular sectors with boundaries :data:`SECTOR_BOUNDS`: sectors 0–6 are
   ``[b_k, b_{k+1})``, sector 7 is ``[5π/6, π] ∪ [−π, −5π/6)`` (within 30° of "left"). In each
   sector every region takes its 2 nearest regions (smallest ``ρ``; picks at the 1e9 sentinel
   are dropped) and keeps the edge ``(i, j)`` unless box ``j`` lies inside box ``i``;
4. the diagonal is set to 1.

Rules (``rule=``):

- ``"released"`` [code]: the reference keeps **only sector 7's edges** (an indentation slip puts
  ``edge_tuples.extend`` after the sector loop, cefg.md §3.4 step 4, §8.5), so ``A[i, j] = 1`` for
  at most 2 regions to the left of ``i``. This is what the reported numbers were trained with
  (probably: ``adj.py``'s first line names the README's rsum).
- ``"all_sectors"`` [itmkit design choice, §8.5]: the evident intent, all 8 sectors (up to 16
  neighbours), reduced to the ``max_neighbours = 4`` nearest by ``ρ`` (ties: lower index) so that
  CEFG's 5-slot gather (self + 4) is deterministic instead of depending on ``topk``'s tie order.
- ``"identity"`` [itmkit, cefg.md §9]: ``A = I`` (no boxes needed; every region gathers itself).

Reference details kept exactly (each checked against ``adj.py`` on hand-made boxes in
``tests/test_spatial_adjacency.py``):

- the "contained" test is ``getIou``'s: the edge is dropped when the intersection area *equals*
  box ``j``'s area (``j`` inside ``i``, identical boxes, or both areas 0), compared exactly in the
  boxes' float type;
- ``Δx`` is computed as ``−(c_i.x − c_j.x)``: for two regions with the same centre that is
  ``−0.0`` and ``atan2(+0, −0) = π``, so concentric regions fall in the "left" sector 7;
- arithmetic in the boxes' own float type (float32 for the released ``.npy`` files).
- nearest-2 ties are broken by the lower region index (``torch.topk``'s order is unspecified).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import PrecompSplit, load_array

AdjacencyRule = Literal["released", "all_sectors", "identity"]
ADJACENCY_RULES: tuple[str, ...] = ("released", "all_sectors", "identity")

#: ``adj.py``'s ``thero`` list without its two closing entries (π, −π): sector ``k`` starts at
#: ``SECTOR_BOUNDS[k]``; the last sector wraps around from 5π/6 through π to −5π/6.
SECTOR_BOUNDS: tuple[float, ...] = (
    -5 * math.pi / 6, -2 * math.pi / 3, -math.pi / 3, -math.pi / 6,
    math.pi / 6, math.pi / 3, 2 * math.pi / 3, 5 * math.pi / 6,
)  # fmt: skip
LEFT_SECTOR = 7  # the only sector whose edges survive in the released adj.py
NEAREST_PER_SECTOR = 2  # adj.py's n_min
FAR = 1e9  # adj.py's sentinel for "not in this sector" and for the diagonal
LEGAL_DISTANCE = 1e3  # picks farther than this (the sentinel) are dropped

#: The file each rule is stored in beside the features, ``{split}_<name>``: the released rule uses
#: the reference loader's own file name, so an ``adj.py`` output works unchanged.
ADJACENCY_FILES: dict[str, str] = {"released": "ims_dir_selfadj4.npy", "all_sectors": "ims_dir_allsectors.npy"}


def check_rule(rule: str) -> str:
    if rule not in ADJACENCY_RULES:
        raise ValueError(f"adjacency rule: expected one of {list(ADJACENCY_RULES)}, found {rule!r}")
    return rule


def adjacency_file(root: str | Path, split: str, rule: str) -> Path:
    """Where the ``rule`` adjacency of ``split`` lives beside the features."""
    check_rule(rule)
    if rule not in ADJACENCY_FILES:
        raise ValueError(f"adjacency rule {rule!r} needs no file (only {sorted(ADJACENCY_FILES)} are stored)")
    return Path(root) / f"{split}_{ADJACENCY_FILES[rule]}"


def _polar(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``boxes [n, K, 4]`` (normalised) -> ``(ρ, θ)`` ``[n, K, K]`` as ``adj.py``'s ``compute_pseudo``,
    with the diagonal at the sentinel."""
    size = boxes[..., 2:] - boxes[..., :2]
    centre = boxes[..., :2] + boxes.dtype.type(0.5) * size
    offset = centre[:, :, None, :] - centre[:, None, :, :]  # c_i - c_j
    dx = -offset[..., 0]  # the reference negates after subtracting: -0.0 for equal x (see module doc)
    dy = offset[..., 1]
    rho = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    diagonal = np.eye(boxes.shape[1], dtype=bool)[None]
    far = boxes.dtype.type(FAR)
    return np.where(diagonal, far, rho), np.where(diagonal, far, theta)


def _sector_mask(theta: np.ndarray, sector: int) -> np.ndarray:
    """``θ`` in sector ``sector`` (bounds compared in ``θ``'s float type, as torch does)."""
    bounds = np.asarray(SECTOR_BOUNDS, dtype=theta.dtype)
    if sector == LEFT_SECTOR:
        pi = theta.dtype.type(math.pi)
        return ((theta >= bounds[-1]) & (theta <= pi)) | ((theta >= -pi) & (theta < bounds[0]))
    return (theta >= bounds[sector]) & (theta < bounds[sector + 1])


def _contained(boxes: np.ndarray) -> np.ndarray:
    """``[n, K, K]`` bool: ``getIou(box_i, box_j) == 1``, i.e. the intersection area equals box
    ``j``'s area (exact comparison, in the boxes' float type)."""
    b_i, b_j = boxes[:, :, None, :], boxes[:, None, :, :]
    zero = boxes.dtype.type(0)
    width = np.maximum(zero, np.minimum(b_i[..., 2], b_j[..., 2]) - np.maximum(b_i[..., 0], b_j[..., 0]))
    height = np.maximum(zero, np.minimum(b_i[..., 3], b_j[..., 3]) - np.maximum(b_i[..., 1], b_j[..., 1]))
    area_j = (b_j[..., 0] - b_j[..., 2]) * (b_j[..., 1] - b_j[..., 3])  # getIou's sign convention
    return width * height == area_j


def _sector_edges(rho: np.ndarray, theta: np.ndarray, contained: np.ndarray, sector: int) -> np.ndarray:
    """``[n, K, K]`` bool edges of one sector: each region's 2 nearest in the sector, not contained."""
    in_sector = _sector_mask(theta, sector)
    masked = np.where(in_sector, rho, rho.dtype.type(FAR))
    nearest = np.argsort(masked, axis=-1, kind="stable")[..., :NEAREST_PER_SECTOR]  # ties: lower index
    distance = np.take_along_axis(masked, nearest, -1)
    keep = (distance <= LEGAL_DISTANCE) & ~np.take_along_axis(contained, nearest, -1)
    edges = np.zeros(rho.shape, dtype=bool)
    np.put_along_axis(edges, nearest, keep, -1)
    return edges


def sector_adjacency(
    boxes: np.ndarray, image_sizes: np.ndarray, rule: AdjacencyRule = "released", max_neighbours: int = 4
) -> np.ndarray:
    """0/1 adjacency of every image's regions (cefg.md §3.4; see the module docstring).

    Args:
        boxes: ``[n, K, 4]`` (or ``[K, 4]``) ``x1, y1, x2, y2`` in pixels; float32 or float64 (the
            arithmetic runs in that type, like the reference; other dtypes are read as float64).
        image_sizes: ``[n, 2]`` (or ``[2]``) image ``(width, height)`` the boxes are measured in.
        rule: ``"released"``, ``"all_sectors"`` or ``"identity"``.
        max_neighbours: ``"all_sectors"`` keeps this many nearest neighbours besides the region
            itself (4 = CEFG's 5 gather slots).

    Returns:
        ``[n, K, K]`` float32 (``[K, K]`` for one image): ``A[i, j] = 1`` when region ``i``
        gathers region ``j``; the diagonal is 1; not symmetric.
    """
    check_rule(rule)
    single = np.ndim(boxes) == 2
    boxes = np.asarray(boxes)[None] if single else np.asarray(boxes)
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"sector_adjacency boxes: expected [n, K, 4], found shape {boxes.shape}")
    if sizes.shape[0] != boxes.shape[0]:
        raise ValueError(f"sector_adjacency image_sizes: expected {boxes.shape[0]} (width, height) rows, found {sizes.shape[0]}")
    n, K, _ = boxes.shape
    eye = np.broadcast_to(np.eye(K, dtype=np.float32), (n, K, K))
    if rule == "identity":
        result = eye.copy()
        return result[0] if single else result
    if not np.all(np.isfinite(boxes)) or not np.all(sizes > 0):
        raise ValueError("sector_adjacency: expected finite boxes and positive image sizes, found "
                         f"{int((~np.isfinite(boxes)).sum())} non-finite coordinates, sizes min {sizes.min():g}")
    dtype = boxes.dtype if boxes.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    # dividing in float64 and rounding once equals the reference's in-place division in `dtype`
    normalised = (boxes.astype(np.float64) / np.concatenate([sizes, sizes], 1)[:, None, :]).astype(dtype)
    rho, theta = _polar(normalised)
    contained = _contained(normalised)
    sectors = [LEFT_SECTOR] if rule == "released" else range(len(SECTOR_BOUNDS))
    edges = np.zeros((n, K, K), dtype=bool)
    for sector in sectors:
        edges |= _sector_edges(rho, theta, contained, sector)
    if rule == "all_sectors":
        # our rule (§8.5): the max_neighbours nearest connected regions, ties by the lower index
        ranked = np.argsort(np.where(edges, rho, np.inf), axis=-1, kind="stable")[..., :max_neighbours]
        nearest = np.zeros_like(edges)
        np.put_along_axis(nearest, ranked, np.take_along_axis(edges, ranked, -1), -1)
        edges = nearest
    result = np.maximum(edges.astype(np.float32), eye)  # diagonal removed, identity added (step 5)
    return result[0] if single else result


# --------------------------------------------------------------------------- per split
def read_image_sizes(root: str | Path, split: str, n_rows: int, allow_pickle: bool = False) -> np.ndarray:
    """``[n_rows, 2]`` image ``(width, height)`` of a split's boxes.

    Sources, in order: ``{split}_ims_size.npy`` as a numeric ``[n_rows, 2]`` array, or (with
    ``allow_pickle``, files you trust) the reference's array of ``{"image_w", "image_h"}`` dicts;
    the folder's ``meta.json`` ``image_size`` (top level, or under ``preset`` as the embedded
    build writes it: square images of that side).
    Raises :class:`DataFormatError` naming what is missing.
    """
    root = Path(root)
    path = root / f"{split}_ims_size.npy"
    if path.is_file():
        try:
            sizes = np.load(path, allow_pickle=allow_pickle)
        except ValueError as err:
            raise DataFormatError(path, "dtype", "a numeric [n_img, 2] array of (width, height) (the reference's "
                                  "dicts need allow_pickle: data_prep/cefg_adjacency.py --allow-pickle)", str(err)) from None
        if sizes.dtype == object:
            try:
                sizes = np.array([[float(s["image_w"]), float(s["image_h"])] for s in sizes], dtype=np.float64)
            except (TypeError, KeyError, IndexError) as err:
                raise DataFormatError(path, "entries", "dicts with 'image_w' and 'image_h'", repr(err)) from None
        if sizes.shape != (n_rows, 2):
            raise DataFormatError(path, "shape", f"({n_rows}, 2): (width, height) per feature row", f"shape {sizes.shape}")
        return sizes.astype(np.float64)
    meta = root / "meta.json"
    if meta.is_file():
        settings = json.loads(meta.read_text(encoding="utf-8"))
        # the embedded build records its preset, whose images are squares of image_size pixels
        side = settings.get("image_size", (settings.get("preset") or {}).get("image_size"))
        if isinstance(side, (int, float)) and side > 0:
            return np.full((n_rows, 2), float(side))
    raise DataFormatError(path, "file", "image sizes for the boxes (a numeric [n_img, 2] (width, height) array, "
                          "or meta.json 'image_size')", "neither")


def adjacency_rows(
    boxes: np.ndarray, image_sizes: np.ndarray, rule: AdjacencyRule, out: np.ndarray | None = None,
    batch: int = 1024, progress: bool = False, desc: str = "adjacency",
) -> np.ndarray:
    """:func:`sector_adjacency` of ``boxes [n, K, 4]`` (may be memory-mapped) ``batch`` images at a
    time, into ``out`` (``[n, K, K]`` float32, e.g. a memmap) or a new array."""
    n, K = boxes.shape[:2]
    out = np.empty((n, K, K), dtype=np.float32) if out is None else out
    for start in tqdm(range(0, n, batch), desc=desc, disable=not progress, leave=False):
        stop = min(n, start + batch)
        out[start:stop] = sector_adjacency(np.asarray(boxes[start:stop]), image_sizes[start:stop], rule)
    return out


def compute_split_adjacency(split: PrecompSplit, rule: AdjacencyRule, image_sizes: np.ndarray | None = None) -> np.ndarray:
    """``[n_rows, K, K]`` float32 adjacency of a split computed from its ``{split}_boxes.npy``
    (rows as the feature rows), ``image_sizes`` from :func:`read_image_sizes` when not given."""
    check_rule(rule)
    n_rows, K = split.images.shape[0], split.n_regions
    if rule == "identity":
        return np.broadcast_to(np.eye(K, dtype=np.float32), (n_rows, K, K))
    if split.boxes is None:
        boxes_path = split.root / f"{split.split}_boxes.npy"
        raise DataFormatError(boxes_path, "file", f"region boxes to build the {rule!r} adjacency from (or "
                              f"{adjacency_file(split.root, split.split, rule).name} written by data_prep/cefg_adjacency.py)",
                              "no such file")
    if image_sizes is None:  # the sizes file covers every row of the features file; this view is a range of it
        first = split.image_range[0] * split.image_step
        file_rows = load_array(split.root / f"{split.split}_ims.npy", "region features").shape[0]
        image_sizes = read_image_sizes(split.root, split.split, file_rows)[first : first + n_rows]
    return adjacency_rows(split.boxes, image_sizes, rule, desc=f"{split.split} adjacency")


def write_split_adjacency(
    root: str | Path, split: str, rule: AdjacencyRule = "released", image_size: tuple[float, float] | None = None,
    allow_pickle: bool = False, progress: bool = True,
) -> Path:
    """Write ``{split}_<ADJACENCY_FILES[rule]>`` beside the features (``data_prep/cefg_adjacency.py``).

    Boxes: ``{split}_ims_bbx.npy`` (the reference's input) or ``{split}_boxes.npy``, pixels, one
    ``[K, 4]`` per feature row. Image sizes: ``image_size`` ``(width, height)`` for every image, or
    :func:`read_image_sizes`. The file appears complete or not at all (written under a temporary
    name, then renamed). Returns its path.
    """
    root = Path(root)
    target = adjacency_file(root, split, rule)
    features = load_array(root / f"{split}_ims.npy", "region features [n_img, n_regions, dim]")
    candidates = [root / f"{split}_ims_bbx.npy", root / f"{split}_boxes.npy"]
    source = next((p for p in candidates if p.is_file()), None)
    if source is None:
        raise DataFormatError(candidates[1], "file", f"region boxes ({candidates[0].name} or {candidates[1].name})", "neither")
    boxes = load_array(source, "boxes [n_img, n_regions, 4]")
    expected = (features.shape[0], features.shape[1], 4)
    if boxes.shape != expected or boxes.dtype.kind != "f":
        raise DataFormatError(source, "shape", f"float {expected} (rows and regions of {split}_ims.npy, x1 y1 x2 y2)",
                              f"{boxes.dtype} {boxes.shape}")
    n_rows = features.shape[0]
    sizes = (np.tile(np.asarray(image_size, dtype=np.float64), (n_rows, 1)) if image_size is not None
             else read_image_sizes(root, split, n_rows, allow_pickle))  # fmt: skip
    partial = target.with_name(target.name + ".partial")
    try:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n_rows, expected[1], expected[1]))
        adjacency_rows(boxes, sizes, rule, out=out, progress=progress, desc=f"{split} {rule} adjacency")
        out.flush()
        del out
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def split_adjacency(split: PrecompSplit, rule: AdjacencyRule) -> np.ndarray:
    """``[n_rows, K, K]`` adjacency of the split's feature rows for ``rule``: the stored file
    ``{split}_<ADJACENCY_FILES[rule]>`` when it exists (memory-mapped, checked), otherwise
    computed on the fly from ``{split}_boxes.npy`` and the image sizes (the embedded sets)."""
    check_rule(rule)
    if rule == "identity":
        return compute_split_adjacency(split, rule)
    path = adjacency_file(split.root, split.split, rule)
    if not path.is_file():
        return compute_split_adjacency(split, rule)
    stored = load_array(path, f"{rule} region adjacency [n_img, K, K]")
    step, (first, stop) = split.image_step, split.image_range
    K = split.n_regions
    expected_rows = split.root / f"{split.split}_ims.npy"
    full_rows = load_array(expected_rows, "region features").shape[0]
    if stored.shape != (full_rows, K, K):
        raise DataFormatError(path, "shape", f"({full_rows}, {K}, {K}): one [K, K] matrix per row of {expected_rows.name}",
                              f"shape {stored.shape}")
    rows = stored[first * step : stop * step]
    check_adjacency(rows, path)
    return rows


def check_adjacency(adjacency: np.ndarray, source: str | Path = "adjacency") -> None:
    """Raise :class:`DataFormatError` unless every matrix is 0/1 with a diagonal of ones."""
    values = np.asarray(adjacency)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise DataFormatError(source, f"entry {where}", "0 or 1", f"{values[tuple(where)]!r}")
    diagonal = np.diagonal(values, axis1=-2, axis2=-1)
    if not np.all(diagonal == 1):
        where = np.argwhere(diagonal != 1)[0].tolist()
        raise DataFormatError(source, f"row {where[0]} diagonal entry {where[1]}", "1 (every region gathers itself)",
                              f"{diagonal[tuple(where)]!r}")
