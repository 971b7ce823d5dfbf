"""Bottom-up-attention TSV -> precomp ``{split}_ims.npy`` / ``{split}_boxes.npy`` (baselines.md §A.4).

The TSV (``generate_tsv.py`` of ``peteanderson80/bottom-up-attention``) has no header and six
tab-separated fields: ``image_id, image_w, image_h, num_boxes, boxes, features``; ``boxes`` and
``features`` are base64 of little-endian float32 ``[num_boxes, 4]`` / ``[num_boxes, dim]``.

Rows come in any order; outputs follow each split's ``{split}_ids.txt`` (written by
:mod:`itmkit.data.karpathy`). One pass over the TSV fills every split, row by row, into
``np.lib.format.open_memmap`` files, so the features never sit in RAM (COCO train ~33 GB).
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import CAPTIONS_PER_IMAGE, read_captions, read_ids, read_image_ids

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass(frozen=True)
class BUTDRow:
    """One TSV row, fields still encoded (decoding only pays for rows a split needs)."""

    path: Path
    line: int
    image_id: int
    image_w: int
    image_h: int
    num_boxes: int
    boxes_b64: str
    features_b64: str

    def where(self) -> str:
        return f"line {self.line} (image {self.image_id})"

    def decode(self, field: str, columns: int) -> np.ndarray:
        """``[num_boxes, columns]`` float32 array of the base64 field ``"boxes"`` or ``"features"``."""
        text = self.boxes_b64 if field == "boxes" else self.features_b64
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise DataFormatError(self.path, f"{self.where()} {field}", "base64 text", f"undecodable ({err})") from None
        expected = self.num_boxes * columns * 4
        if len(raw) != expected:
            raise DataFormatError(
                self.path,
                f"{self.where()} {field}",
                f"{self.num_boxes} x {columns} float32 = {expected} bytes",
                f"{len(raw)} bytes",
            )
        return np.frombuffer(raw, dtype="<f4").reshape(self.num_boxes, columns)


def allow_large_csv_fields() -> None:
    """Raise csv's per-field limit: one features field is ~400 KB of base64 (§A.4)."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32-bit on some platforms
            limit //= 10


def read_tsv(path: str | Path) -> Iterator[BUTDRow]:
    """Stream the rows of one BUTD TSV file (checks the field count and the integer fields)."""
    path = Path(path)
    allow_large_csv_fields()
    with path.open(newline="", encoding="ascii") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for fields in reader:
            line = reader.line_num
            if len(fields) != len(TSV_FIELDS):
                raise DataFormatError(path, f"line {line}", f"{len(TSV_FIELDS)} tab-separated fields {TSV_FIELDS}", f"{len(fields)} fields")
            try:
                image_id, width, height, num_boxes = (int(float(v)) if i in (1, 2) else int(v) for i, v in enumerate(fields[:4]))
            except ValueError:
                raise DataFormatError(path, f"line {line}", "integers image_id, image_w, image_h, num_boxes", repr(fields[:4])) from None
            yield BUTDRow(path, line, image_id, width, height, num_boxes, fields[4], fields[5])


def split_image_ids(root: str | Path, split: str) -> np.ndarray:
    """Per-image ids of ``root/{split}_ids.txt``: one per image, or one per caption collapsed to
    every 5th (decided by ``{split}_caps.txt``'s count when present)."""
    root = Path(root)
    ids_path = root / f"{split}_ids.txt"
    if not ids_path.is_file():
        raise DataFormatError(ids_path, "file", f"the image ids of split {split!r} (run karpathy_to_precomp first)", "no such file")
    caps_path = root / f"{split}_caps.txt"
    if not caps_path.is_file():
        return read_ids(ids_path)
    n_caps = len(read_captions(caps_path))
    ids, _ = read_image_ids(ids_path, n_caps // CAPTIONS_PER_IMAGE, n_caps, caps_path)
    return ids


class _SplitWriter:
    """Memory-mapped ``.npy`` outputs of one split, written under a temporary name until complete."""

    def __init__(self, root: Path, split: str, ids: np.ndarray, num_boxes: int, dim: int, boxes: bool) -> None:
        self.split, self.ids = split, ids
        self.final = [root / f"{split}_ims.npy"] + ([root / f"{split}_boxes.npy"] if boxes else [])
        self.partial = [p.with_name(p.name + ".partial") for p in self.final]
        self.features = np.lib.format.open_memmap(self.partial[0], mode="w+", dtype=np.float32, shape=(len(ids), num_boxes, dim))
        self.boxes = (
            np.lib.format.open_memmap(self.partial[1], mode="w+", dtype=np.float32, shape=(len(ids), num_boxes, 4)) if boxes else None
        )
        self.filled = np.zeros(len(ids), dtype=bool)

    def finish(self) -> None:
        for array in (self.features, self.boxes):
            if array is not None:
                array.flush()
        self.features = self.boxes = None
        for partial, final in zip(self.partial, self.final):
            os.replace(partial, final)

    def discard(self) -> None:
        self.features = self.boxes = None
        for partial in self.partial:
            partial.unlink(missing_ok=True)


def tsv_to_precomp(
    tsv_paths: Sequence[str | Path],
    root: str | Path,
    splits: Sequence[str] | None = None,
    num_boxes: int = 36,
    feature_dim: int = 2048,
    write_boxes: bool = True,
    progress: bool = True,
) -> dict[str, int]:
    """Fill ``root/{split}_ims.npy`` (+ ``_boxes.npy``) for ``splits`` from BUTD TSV files.

    Args:
        tsv_paths: one or more TSV files (read in order, one pass in total).
        root: precomp folder holding ``{split}_ids.txt`` (and usually ``{split}_caps.txt``).
        splits: split names; ``None`` -> every split with an ids file.
        num_boxes: boxes per image every row must have (the release used a fixed 36).
        feature_dim: feature length per box (2048 for BUTD ResNet-101).

    Returns:
        images written per split.

    Raises:
        DataFormatError: a row with the wrong field count or ``num_boxes``, undecodable base64,
            an image listed twice, or an id of a split found in no TSV (outputs are then removed).
    """
    root = Path(root)
    tsv_paths = [Path(p) for p in tsv_paths]
    if splits is None:
        splits = [p.name[: -len("_ids.txt")] for p in sorted(root.glob("*_ids.txt"))]
    if not splits:
        raise DataFormatError(root, "splits", "at least one {split}_ids.txt", "none")
    wanted: dict[int, list[tuple[_SplitWriter, int]]] = {}
    writers = []
    try:
        for split in splits:
            ids = split_image_ids(root, split)
            writer = _SplitWriter(root, split, ids, num_boxes, feature_dim, write_boxes)
            writers.append(writer)
            for row, image_id in enumerate(ids.tolist()):
                wanted.setdefault(image_id, []).append((writer, row))
        seen: dict[int, str] = {}
        with tqdm(total=len(wanted), desc="images", unit="img", disable=not progress) as bar:
            for path in tsv_paths:
                for record in read_tsv(path):
                    targets = wanted.get(record.image_id)
                    if targets is None:
                        continue
                    if record.image_id in seen:
                        raise DataFormatError(path, record.where(), "each image once", f"a repeat of {seen[record.image_id]}")
                    seen[record.image_id] = f"{path.name} line {record.line}"
                    if record.num_boxes != num_boxes:
                        raise DataFormatError(path, f"{record.where()} num_boxes", num_boxes, record.num_boxes)
                    features = record.decode("features", feature_dim)
                    boxes = record.decode("boxes", 4) if write_boxes else None
                    for writer, row in targets:
                        writer.features[row] = features
                        if boxes is not None:
                            writer.boxes[row] = boxes
                        writer.filled[row] = True
                    bar.update(1)
        for writer in writers:
            missing = writer.ids[~writer.filled]
            if len(missing):
                raise DataFormatError(
                    tsv_paths[0] if len(tsv_paths) == 1 else tsv_paths[0].parent,
                    f"image ids of {writer.split}_ids.txt",
                    f"all {len(writer.ids)} images in the TSV",
                    f"{len(missing)} missing, e.g. {missing[:5].tolist()}",
                )
        for writer in writers:
            writer.finish()
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    return {writer.split: len(writer.ids) for writer in writers}


def write_tsv(path: str | Path, rows: Sequence[tuple[int, int, int, np.ndarray, np.ndarray]]) -> None:
    """Write ``(image_id, w, h, boxes [n, 4], features [n, D])`` rows in BUTD's TSV layout
    (for tests and for exporting features to tools that read this format)."""
    with Path(path).open("w", newline="", encoding="ascii") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        for image_id, width, height, boxes, features in rows:
            boxes = np.ascontiguousarray(boxes, dtype="<f4")
            features = np.ascontiguousarray(features, dtype="<f4")
            writer.writerow(
                [image_id, width, height, len(boxes), base64.b64encode(boxes.tobytes()).decode("ascii"),
                 base64.b64encode(features.tobytes()).decode("ascii")]
            )
