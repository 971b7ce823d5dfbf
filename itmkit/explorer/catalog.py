"""What the explorer can open: trained runs under a folder, and the splits that have pictures.

A *run* is a folder the trainer wrote (``config.json`` beside ``model_best.pt`` or
``checkpoint.pt``, :mod:`itmkit.train`); :func:`find_runs` lists every one under a root, however
deep (a course run keeps its shared runs in ``<out>/_shared_runs/<name>/``).

A split *has pictures* when every one of its images has an image file: the embedded set and the
precomp folders ``data_prep/`` builds keep them in ``<precomp>/images/`` named by image id
(``<id>.png`` or ``.jpg``), or by the file name ``id_mapping.json`` gives the id
(:class:`~itmkit.data.precomp.PrecompSplit`). :func:`picture_path` finds one;
:func:`splits_with_pictures` lists the splits where all are there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from itmkit.data.precomp import PrecompSplit, list_splits

PICTURE_FOLDER = "images"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHECKPOINT_NAMES = ("model_best.pt", "checkpoint.pt")


@dataclass(frozen=True)
class RunEntry:
    """One trained run found under a root.

    Attributes:
        path: the run folder.
        method: the registry name from its ``config.json`` (``"scan"``, ...).
        preset: the preset it was trained with.
        label: what a menu shows: ``"<folder relative to the root> (method, preset)"``.
        rsum: the test rsum from ``result.json`` when the run finished, else ``None``.
    """

    path: Path
    method: str
    preset: str
    label: str
    rsum: float | None = None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: expected a JSON object written by the trainer, found unreadable text ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object written by the trainer, found {type(data).__name__}")
    return data


def _test_rsum(run: Path) -> float | None:
    """The run's test rsum from ``result.json`` (its ``test`` block, ``test/rsum``); ``None`` when
    the run has not finished (no file) or evaluated no test split."""
    path = run / "result.json"
    if not path.is_file():
        return None
    test = _read_json(path).get("test")
    value = test.get("test/rsum") if isinstance(test, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def find_runs(root: str | Path) -> list[RunEntry]:
    """Every trained run under ``root`` (``root`` itself included), sorted by path.

    A folder counts when it holds ``config.json`` and ``model_best.pt`` or ``checkpoint.pt``;
    an evaluation folder (``test/``, ``eval-*``) holds neither checkpoint and is skipped.
    ``root`` missing raises ``FileNotFoundError`` naming it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected a folder holding trained runs, found no such folder")
    runs = []
    for config in sorted(root.rglob("config.json")):
        folder = config.parent
        if not any((folder / name).is_file() for name in CHECKPOINT_NAMES):
            continue
        data = _read_json(config)
        method = data.get("method")
        if not isinstance(method, str):
            raise ValueError(f"{config}: field 'method': expected a method name, found {method!r}")
        preset = str(data.get("preset", "?"))
        name = folder.relative_to(root).as_posix() if folder != root else folder.name
        runs.append(RunEntry(folder, method, preset, f"{name} ({method}, {preset})", _test_rsum(folder)))
    return runs


def picture_path(split: PrecompSplit, image: int) -> Path | None:
    """The image file of image ``image`` of ``split``, or ``None`` when it has none.

    Looked up in ``<split.root>/images/``: the file ``id_mapping.json`` names for the image's id,
    else ``<id>.png`` / ``.jpg`` / ``.jpeg``. A split without ids has no pictures."""
    if not 0 <= int(image) < split.n_images:
        raise IndexError(f"{split.root} split {split.split!r}: image {image}: expected an index in [0, {split.n_images})")
    if split.image_ids is None:
        return None
    folder = split.root / PICTURE_FOLDER
    image_id = str(int(split.image_ids[int(image)]))
    if split.id_mapping is not None and image_id in split.id_mapping:
        candidate = folder / split.id_mapping[image_id]
        return candidate if candidate.is_file() else None
    for suffix in PICTURE_SUFFIXES:
        candidate = folder / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def has_pictures(split: PrecompSplit) -> bool:
    """Every image of ``split`` has a picture (:func:`picture_path`)."""
    return all(picture_path(split, i) is not None for i in range(split.n_images))


def splits_with_pictures(data_dir: str | Path) -> list[str]:
    """The splits of the precomp folder ``data_dir`` whose every image has a picture, in
    :func:`~itmkit.data.precomp.list_splits` order."""
    return [name for name in list_splits(data_dir) if has_pictures(PrecompSplit.open(data_dir, name))]
