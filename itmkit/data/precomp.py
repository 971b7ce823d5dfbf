"""Reader for SCAN "precomp" folders, the layout every method in this kit reads (baselines.md §A.1).

A precomp folder holds, per split (``train``, ``dev``, ``test``, ``testall``):

- ``{split}_ims.npy``: float32 ``[n_rows, n_regions, dim]`` region features;
- ``{split}_caps.txt``: one caption per line, 5 consecutive lines per image;
- ``{split}_ids.txt`` (optional): image ids, one per image or one per caption;
- ``{split}_boxes.npy`` (optional): ``[n_rows, n_regions, 4]`` boxes x1, y1, x2, y2;
- ``id_mapping.json`` (optional, in the folder or its parent): ``{"<image id>": "<file name>"}``.

Features are memory-mapped, never read whole (COCO train is ~33 GB). Everything else is checked
when a split is opened; each problem raises :class:`~itmkit.data.errors.DataFormatError` naming
the file, the field, what was expected and what was found. Feature values are checked as they
are read: every row the loaders hand out (:meth:`PrecompSplit.feature_row`,
:meth:`PrecompSplit.image_block`) must be finite, so one NaN region stops training or evaluation
with the file, row, region and dimension instead of scoring a model that means nothing;
:func:`verify_precomp` scans whole files that way, a block of rows at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from itmkit.data.errors import DataFormatError

CAPTIONS_PER_IMAGE = 5
KNOWN_SPLITS = ("train", "dev", "test", "testall")
# float16 is accepted so that a user may halve a 33 GB feature file; readers hand out float32.
FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# rows per block when a whole feature file is scanned for NaN/Inf (36 x 2048 float32: ~300 KB a row)
SCAN_ROWS = 256


def check_finite_features(block: np.ndarray, path: Path, first_row: int, what: str = "region features") -> None:
    """Raise :class:`DataFormatError` if ``block`` (rows ``first_row..`` of the ``[n_rows, K, D]``
    array in ``path``) holds a NaN or an infinity, naming the first bad row, region and dim."""
    finite = np.isfinite(block)
    if finite.all():
        return
    bad = np.argwhere(~finite)
    row, *rest = (int(v) for v in bad[0])
    where = f"row {first_row + row}" + (f", region {rest[0]}" if rest else "") + (f", dim {rest[1]}" if len(rest) > 1 else "")
    last = first_row + block.shape[0] - 1
    raise DataFormatError(path, where, f"finite {what}",
                          f"{block[tuple(bad[0])]} ({len(bad)} non-finite values in rows {first_row}-{last})")


def read_captions(path: str | Path) -> list[str]:
    """Captions of a ``{split}_caps.txt`` file, one per line, ``strip()``-ed (baselines.md §A.1).

    A final newline is optional (the f30k test file has none). A UTF-8 byte-order mark at the top
    (Windows editors write one) is dropped, not read as part of the first word. An empty line is
    an error: the reference code silently turns it into ``<start> <end>``.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataFormatError(path, "file", "a caption file", "no such file") from None
    except UnicodeDecodeError as err:
        raise DataFormatError(path, f"byte {err.start}", "UTF-8 text", f"undecodable bytes ({err.reason})") from None
    # split("\n") rather than splitlines(): captions may contain Unicode line separators.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    captions = [line.strip() for line in lines]
    for number, caption in enumerate(captions, start=1):
        if not caption:
            raise DataFormatError(path, f"line {number}", "a non-empty caption", "an empty line")
    return captions


def read_ids(path: str | Path) -> np.ndarray:
    """Integer image ids of a ``{split}_ids.txt`` file, one per line -> ``[n]`` int64 (a leading
    UTF-8 byte-order mark is dropped)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, f"byte {err.start}", "UTF-8 text", f"undecodable bytes ({err.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()
    ids = np.empty(len(lines), dtype=np.int64)
    for number, line in enumerate(lines, start=1):
        try:
            ids[number - 1] = int(line.strip())
        except ValueError:
            raise DataFormatError(path, f"line {number}", "an integer image id", repr(line)) from None
    return ids


def load_array(path: Path, what: str) -> np.ndarray:
    """Memory-map a ``.npy`` file; a missing or unreadable file raises :class:`DataFormatError`."""
    if not path.is_file():
        raise DataFormatError(path, "file", f"a .npy file of {what}", _missing_description(path))
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataFormatError(path, "file", f"a readable .npy array of {what}", f"{type(err).__name__}: {err}") from None
    if not isinstance(array, np.ndarray):
        raise DataFormatError(path, "file", f"a single .npy array of {what}", type(array).__name__)
    return array


def _missing_description(path: Path) -> str:
    if not path.parent.is_dir():
        return f"no such folder {path.parent}"
    present = sorted(p.name for p in path.parent.iterdir() if p.is_file())
    shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")
    return f"no such file (the folder holds: {shown or 'nothing'})"


def find_id_mapping(root: Path) -> Path | None:
    """``id_mapping.json`` in the folder itself or its parent (VSE∞ keeps it one level up)."""
    for candidate in (root / "id_mapping.json", root.parent / "id_mapping.json"):
        if candidate.is_file():
            return candidate
    return None


def read_id_mapping(path: Path) -> dict[str, str]:
    """``{"<image id>": "<file name>"}``; corrupt JSON or another layout raises ``DataFormatError``."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"line {err.lineno} column {err.colno}", "valid JSON", err.msg) from None
    if not isinstance(mapping, dict):
        raise DataFormatError(path, "top level", 'an object {"<image id>": "<file name>"}', type(mapping).__name__)
    for key, value in mapping.items():
        if not isinstance(value, str):
            raise DataFormatError(path, f"entry {key!r}", "a file name string", repr(value))
    return mapping


class RegionColumns:
    """Region features with extra per-region columns appended on read: ``[n, K, D + E]``.

    Wraps a (memory-mapped) feature array ``[n, K, D]`` and an aligned ``[n, K, E]`` array; an
    integer row reads ``[K, D + E]`` float32, a slice gives another lazy view, ``np.array(view)``
    reads the rows. What :meth:`PrecompSplit.with_region_columns` puts in ``images``, so loaders
    that read feature rows hand the extra columns to the model unchanged (CEFG's region adjacency,
    cefg.md §3.4). ``name`` says what the columns are.
    """

    def __init__(self, features: np.ndarray, extra: np.ndarray, name: str) -> None:
        if extra.ndim != 3 or tuple(extra.shape[:2]) != tuple(features.shape[:2]):
            raise ValueError(
                f"RegionColumns {name!r}: expected extra columns [n, K, E] with [n, K] = {tuple(features.shape[:2])}, "
                f"found shape {tuple(extra.shape)}"
            )
        self.features, self.extra, self.name = features, extra, name

    @property
    def shape(self) -> tuple[int, int, int]:
        n, k, d = self.features.shape
        return n, k, d + self.extra.shape[2]

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return RegionColumns(self.features[key], self.extra[key], self.name)
        parts = (np.asarray(self.features[key], dtype=np.float32), np.asarray(self.extra[key], dtype=np.float32))
        return np.concatenate(parts, axis=-1)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = np.concatenate([np.asarray(self.features, dtype=np.float32), np.asarray(self.extra, dtype=np.float32)], -1)
        return rows if dtype is None else rows.astype(dtype, copy=False)


@dataclass(frozen=True, eq=False)
class PrecompSplit:
    """One split of a precomp folder, checked and memory-mapped (baselines.md §A.1).

    Attributes:
        root: the precomp folder.
        split: split name (``"train"``, ``"dev"``, ``"test"``, ``"testall"``).
        images: ``[n_rows, n_regions, dim]`` feature memmap; ``n_rows`` is ``n_images`` when
            ``im_div == 5`` and ``n_captions`` when an older release repeats each image 5 times.
            After :meth:`with_region_columns`, a :class:`RegionColumns` view read the same way.
        captions: ``n_captions`` stripped captions; caption ``c`` belongs to image ``c // 5``.
        im_div: caption ``c`` reads feature row ``c // im_div`` (5 or 1, inferred from counts).
        image_ids: ``[n_images]`` int64 ids, or ``None`` without ``{split}_ids.txt``.
        ids_per: ``"image"``, ``"caption"`` or ``None``: how the ids file was laid out.
        boxes: ``[n_rows, n_regions, 4]`` memmap, or ``None`` without ``{split}_boxes.npy``.
        id_mapping: ``{"<image id>": "<file name>"}`` from ``id_mapping.json``, or ``None``.
        image_range: ``(first, stop)`` unique-image range of the files this view covers
            (a prefix from ``max_captions``, or a fold).
    """

    root: Path
    split: str
    images: np.ndarray
    captions: list[str]
    im_div: int
    image_ids: np.ndarray | None = None
    ids_per: str | None = None
    boxes: np.ndarray | None = None
    id_mapping: dict[str, str] | None = None
    image_range: tuple[int, int] = (0, 0)

    @classmethod
    def open(cls, root: str | Path, split: str, max_captions: int | None = None) -> "PrecompSplit":
        """Open and check ``root/{split}_*``.

        Args:
            root: precomp folder (``.../f30k_precomp``).
            split: split name; any ``{split}_caps.txt`` + ``{split}_ims.npy`` pair works.
            max_captions: keep only the first ``max_captions`` captions (a multiple of 5) and
                their images: VSE∞/SCAN validate on dev's first 5,000 captions (§A.1).

        Raises:
            DataFormatError: a missing or unreadable file, a feature array of the wrong rank or
                dtype, a caption count that is not 5x (or 1x) the feature rows, an empty caption
                line, an ids file whose count fits neither images nor captions, boxes of the
                wrong shape, corrupt ``id_mapping.json``.
        """
        root = Path(root)
        if not root.is_dir():
            raise DataFormatError(root, "folder", "a precomp folder", "no such folder")
        caps_path = root / f"{split}_caps.txt"
        ims_path = root / f"{split}_ims.npy"
        if not caps_path.is_file():
            raise DataFormatError(caps_path, "file", f"the captions of split {split!r}", _missing_description(caps_path))
        images = load_array(ims_path, "region features [n_img, n_regions, dim]")
        if images.ndim != 3:
            raise DataFormatError(ims_path, "shape", "3 dims [n_img, n_regions, dim]", f"shape {images.shape}")
        if images.dtype not in FEATURE_DTYPES:
            raise DataFormatError(ims_path, "dtype", "float32 (or float16)", str(images.dtype))
        if min(images.shape) == 0:
            raise DataFormatError(ims_path, "shape", "a non-empty [n_img, n_regions, dim] array", f"shape {images.shape}")
        captions = read_captions(caps_path)
        n_rows, n_caps = images.shape[0], len(captions)
        # Reference rule (§A.1): im_div = 5 when the counts differ, else 1 (images repeated).
        if n_caps == CAPTIONS_PER_IMAGE * n_rows:
            im_div = CAPTIONS_PER_IMAGE
        elif n_caps == n_rows and n_caps % CAPTIONS_PER_IMAGE == 0:
            im_div = 1
        else:
            raise DataFormatError(
                caps_path,
                "caption count",
                f"{CAPTIONS_PER_IMAGE} x {n_rows} = {CAPTIONS_PER_IMAGE * n_rows} ({CAPTIONS_PER_IMAGE} per image "
                f"of {ims_path.name}) or {n_rows} (one row per caption, a multiple of {CAPTIONS_PER_IMAGE})",
                f"{n_caps} lines",
            )
        if im_div == 1:
            check_repeated_rows(images, ims_path, caps_path)
        n_images = n_caps // CAPTIONS_PER_IMAGE
        image_ids, ids_per = read_image_ids(root / f"{split}_ids.txt", n_images, n_caps, caps_path)
        boxes = None
        boxes_path = root / f"{split}_boxes.npy"
        if boxes_path.exists():
            boxes = load_array(boxes_path, "boxes [n_img, n_regions, 4]")
            expected = (n_rows, images.shape[1], 4)
            if boxes.shape != expected:
                raise DataFormatError(boxes_path, "shape", f"{expected} (rows and regions of {ims_path.name}, 4 coordinates)", f"shape {boxes.shape}")
            if boxes.dtype.kind != "f":
                raise DataFormatError(boxes_path, "dtype", "a float dtype", str(boxes.dtype))
        mapping_path = find_id_mapping(root)
        id_mapping = read_id_mapping(mapping_path) if mapping_path is not None else None
        opened = cls(root, split, images, captions, im_div, image_ids, ids_per, boxes, id_mapping, (0, n_images))
        if max_captions is not None and max_captions < n_caps:
            if max_captions <= 0 or max_captions % CAPTIONS_PER_IMAGE:
                raise ValueError(f"max_captions must be a positive multiple of {CAPTIONS_PER_IMAGE}, got {max_captions}")
            opened = opened.subset(0, max_captions // CAPTIONS_PER_IMAGE)
        return opened

    # --- sizes -------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        """Unique images (``n_captions // 5``)."""
        return len(self.captions) // CAPTIONS_PER_IMAGE

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def n_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[2])

    @property
    def image_step(self) -> int:
        """Feature rows between consecutive unique images: 1, or 5 when images are repeated."""
        return CAPTIONS_PER_IMAGE // self.im_div

    # --- indexing ----------------------------------------------------------------------------
    def image_of_caption(self, caption: int | np.ndarray) -> int | np.ndarray:
        """Unique image index of caption ``c`` (``c // 5``); works on arrays too."""
        return caption // CAPTIONS_PER_IMAGE

    def row_of_caption(self, caption: int) -> int:
        """Feature row of caption ``c`` (``c // im_div``, the reference rule)."""
        return caption // self.im_div

    @property
    def features_path(self) -> Path:
        return self.root / f"{self.split}_ims.npy"

    def _file_row(self, row: int) -> int:
        """Row of the features file for row ``row`` of this view (a subset starts further in)."""
        return self.image_range[0] * self.image_step + row

    def feature_row(self, row: int) -> np.ndarray:
        """``[n_regions, dim]`` float32 copy of feature row ``row`` of this view, checked finite."""
        values = np.array(self.images[row], dtype=np.float32)
        check_finite_features(values[None], self.features_path, self._file_row(row))
        return values

    def image_features(self, image: int) -> np.ndarray:
        """``[n_regions, dim]`` float32 copy of one unique image's features (checked finite)."""
        return self.feature_row(image * self.image_step)

    def image_block(self, start: int, stop: int) -> np.ndarray:
        """``[stop - start, n_regions, dim]`` float32 copy of unique images ``start:stop``, checked
        finite (a NaN raises :class:`DataFormatError` naming the file row)."""
        step = self.image_step
        block = np.array(self.images[start * step : stop * step : step], dtype=np.float32)
        if not np.isfinite(block).all():
            for offset in range(block.shape[0]):  # name the file row of the first bad image
                check_finite_features(block[offset : offset + 1], self.features_path, self._file_row((start + offset) * step))
        return block

    def check_features_finite(self, progress: bool = False) -> None:
        """Scan every feature row (and box) of this view for NaN/Inf, :data:`SCAN_ROWS` rows at a
        time (the memmap is never read whole); the first problem raises :class:`DataFormatError`."""
        arrays = [(self.images, self.features_path, "region features")]
        if self.boxes is not None:
            arrays.append((self.boxes, self.root / f"{self.split}_boxes.npy", "boxes"))
        for array, path, what in arrays:
            starts = range(0, array.shape[0], SCAN_ROWS)
            for start in tqdm(starts, desc=f"scanning {path.name}", disable=not progress, leave=False):
                check_finite_features(np.asarray(array[start : start + SCAN_ROWS]), path, self._file_row(start), what)

    def subset(self, start: int, stop: int) -> "PrecompSplit":
        """A view on unique images ``start:stop`` and their captions (features stay memory-mapped)."""
        if not 0 <= start < stop <= self.n_images:
            raise ValueError(f"{self.split}: image range {start}:{stop} outside 0:{self.n_images}")
        step = self.image_step
        rows = slice(start * step, stop * step)
        first = self.image_range[0]
        return replace(
            self,
            images=self.images[rows],
            captions=self.captions[start * CAPTIONS_PER_IMAGE : stop * CAPTIONS_PER_IMAGE],
            image_ids=None if self.image_ids is None else self.image_ids[start:stop],
            boxes=None if self.boxes is None else self.boxes[rows],
            image_range=(first + start, first + stop),
        )

    def fold(self, fold: int, images_per_fold: int = 1000) -> "PrecompSplit":
        """Fold ``f`` of the COCO 5-fold 1K protocol: images ``1000f ... 1000f+999`` and their
        captions ``5000f ... 5000f+4999`` (baselines.md §C.2)."""
        n_folds = self.n_images // images_per_fold
        if not 0 <= fold < n_folds:
            raise ValueError(
                f"{self.root / self.split}: fold {fold} needs {(fold + 1) * images_per_fold} images, "
                f"the split has {self.n_images} ({n_folds} folds of {images_per_fold})"
            )
        return self.subset(fold * images_per_fold, (fold + 1) * images_per_fold)

    def with_region_columns(self, extra: np.ndarray, name: str) -> "PrecompSplit":
        """This split with ``extra [n_rows, K, E]`` (aligned with the feature rows of this view)
        appended to every region's features when read (:class:`RegionColumns`)."""
        features = self.images.features if isinstance(self.images, RegionColumns) else self.images
        return replace(self, images=RegionColumns(features, extra, name))

    def __getstate__(self) -> dict:
        # Pickling a memmap copies its data: DataLoader workers started with "spawn" (macOS,
        # Windows) would each receive the whole array. Send the rows' location instead (appended
        # region columns travel by value).
        state = dict(self.__dict__)
        columns = self.images if isinstance(self.images, RegionColumns) else None
        state["images"] = state["boxes"] = None
        state["has_boxes"] = self.boxes is not None
        state["region_columns"] = None if columns is None else (columns.extra, columns.name)
        return state

    def __setstate__(self, state: dict) -> None:
        has_boxes = state.pop("has_boxes")
        columns = state.pop("region_columns", None)
        self.__dict__.update(state)
        first, stop = self.image_range
        step = CAPTIONS_PER_IMAGE // self.im_div
        rows = slice(first * step, stop * step)
        images = load_array(self.root / f"{self.split}_ims.npy", "region features")[rows]
        self.__dict__["images"] = images if columns is None else RegionColumns(images, *columns)
        if has_boxes:
            self.__dict__["boxes"] = load_array(self.root / f"{self.split}_boxes.npy", "boxes")[rows]

    def __repr__(self) -> str:
        return (
            f"PrecompSplit({str(self.root)!r}, {self.split!r}, images={self.n_images}, captions={self.n_captions}, "
            f"regions={self.n_regions}, dim={self.feature_dim}, im_div={self.im_div}, image_range={self.image_range})"
        )


REPEAT_CHECK_BYTES = 64 * 2**20  # repeated-row files up to this size are checked whole
REPEAT_CHECK_SAMPLE = 32  # larger ones: this many images, evenly spaced, first and last (~47 MB of COCO rows)


def check_repeated_rows(images: np.ndarray, ims_path: Path, caps_path: Path) -> None:
    """With as many feature rows as captions, the reference reads row ``c // 1`` for caption
    ``c`` but encodes every 5th row as the image (``im_div = 1``, an older release that repeats
    each image 5 times). That holds only if the 5 rows of each image are equal; a file with one
    *different* row per caption would be read with 4 rows in 5 silently ignored, so it is
    refused. Small files are checked whole, large ones (COCO train) on a sample of images."""
    n_groups = images.shape[0] // CAPTIONS_PER_IMAGE
    group_bytes = CAPTIONS_PER_IMAGE * images.shape[1] * images.shape[2] * images.dtype.itemsize
    if n_groups * group_bytes <= REPEAT_CHECK_BYTES:
        groups = np.arange(n_groups)
    else:
        groups = np.unique(np.linspace(0, n_groups - 1, REPEAT_CHECK_SAMPLE).round().astype(int))
    for group in groups:
        rows = np.asarray(images[group * CAPTIONS_PER_IMAGE : (group + 1) * CAPTIONS_PER_IMAGE])
        same = (rows == rows[:1]) | (np.isnan(rows) & np.isnan(rows[:1]))
        if not same.all():
            first = group * CAPTIONS_PER_IMAGE
            differs = int(np.flatnonzero(~same.reshape(CAPTIONS_PER_IMAGE, -1).all(axis=1))[0]) + first
            raise DataFormatError(
                ims_path,
                f"rows {first}-{first + CAPTIONS_PER_IMAGE - 1}",
                f"{CAPTIONS_PER_IMAGE} equal rows per image (the file has as many rows as {caps_path.name} has "
                f"lines, so each image must be repeated for its {CAPTIONS_PER_IMAGE} captions: im_div 1)",
                f"row {differs} differing from row {first}; a file with one row per image has "
                f"{n_groups} rows for these {images.shape[0]} captions",
            )


def read_image_ids(path: Path, n_images: int, n_caps: int, caps_path: Path) -> tuple[np.ndarray | None, str | None]:
    """``([n_images] ids, "image" | "caption")`` from an ids file laid out per image or per
    caption (inferred from its count; per-caption ids must repeat within each image's 5 lines).
    ``(None, None)`` when the file is absent."""
    if not path.is_file():
        return None, None
    ids = read_ids(path)
    if len(ids) == n_images:
        return ids, "image"
    if len(ids) == n_caps:
        groups = ids.reshape(n_images, CAPTIONS_PER_IMAGE)
        differs = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
        if len(differs):
            image = int(differs[0])
            first_line = image * CAPTIONS_PER_IMAGE + 1
            raise DataFormatError(
                path,
                f"lines {first_line}-{first_line + CAPTIONS_PER_IMAGE - 1}",
                f"one id repeated for the {CAPTIONS_PER_IMAGE} captions of image {image}",
                f"ids {groups[image].tolist()}",
            )
        return groups[:, 0].copy(), "caption"
    raise DataFormatError(
        path,
        "line count",
        f"{n_images} (one id per image) or {n_caps} (one per caption of {caps_path.name})",
        f"{len(ids)} lines",
    )


def list_splits(root: str | Path) -> list[str]:
    """Splits present in a precomp folder (a ``{split}_caps.txt`` or ``{split}_ims.npy``),
    the four standard ones first in their usual order."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = set()
    for path in root.iterdir():
        for suffix in ("_caps.txt", "_ims.npy"):
            if path.name.endswith(suffix):
                found.add(path.name[: -len(suffix)])
    known = [s for s in KNOWN_SPLITS if s in found]
    return known + sorted(found - set(KNOWN_SPLITS))


def split_size_bytes(root: Path, split: str) -> int:
    """Bytes of a split's files (``{split}_caps.txt``, ``_ims.npy``, ``_ids.txt``, ``_boxes.npy``)."""
    names = [f"{split}_caps.txt", f"{split}_ims.npy", f"{split}_ids.txt", f"{split}_boxes.npy"]
    return sum((root / n).stat().st_size for n in names if (root / n).is_file())


def verify_precomp(root: str | Path, progress: bool = False, check_values: bool = True):
    """Open every split of a precomp folder and summarise it, one row per split.

    ``check_values`` also reads every feature and box value (a block of rows at a time) and
    reports NaN or Inf with its file row; it reads the whole files (COCO train: ~33 GB).

    Returns:
        ``pandas.DataFrame`` with columns ``split, images, captions, im_div, regions, dim,
        dtype, size_mb, boxes, ids, status, problem``; ``status`` is ``"ok"`` or ``"error"``
        with the :class:`DataFormatError` message in ``problem``. A folder with no split at all
        gives one ``"error"`` row.
    """
    import pandas as pd

    root = Path(root)
    rows = []
    splits = list_splits(root)
    for split in tqdm(splits, desc="checking splits", disable=not progress, leave=False):
        row = {"split": split, "images": None, "captions": None, "im_div": None, "regions": None, "dim": None,
               "dtype": None, "size_mb": split_size_bytes(root, split) / 2**20, "boxes": None,
               "ids": None, "status": "ok", "problem": ""}
        try:
            opened = PrecompSplit.open(root, split)
            row.update(images=opened.n_images, captions=opened.n_captions, im_div=opened.im_div,
                       regions=opened.n_regions, dim=opened.feature_dim, dtype=str(opened.images.dtype),
                       boxes=opened.boxes is not None, ids=opened.ids_per)
            if check_values:
                opened.check_features_finite(progress)
        except DataFormatError as err:
            row.update(status="error", problem=str(err))
        rows.append(row)
    if not splits:
        problem = "no such folder" if not root.is_dir() else "no {split}_caps.txt or {split}_ims.npy files"
        rows.append({"split": None, "status": "error", "problem": f"{root}: {problem}"})
    columns = ["split", "images", "captions", "im_div", "regions", "dim", "dtype", "size_mb", "boxes", "ids", "status", "problem"]
    return pd.DataFrame(rows, columns=columns)
