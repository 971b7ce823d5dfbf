"""Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``) -> precomp text files
(baselines.md §A.3).

Writes ``{split}_caps.txt`` (the ``raw`` sentences, exactly 5 consecutive lines per image, images
in file order), ``{split}_ids.txt`` (one image id per image) and ``id_mapping.json``
(``{"<image id>": "<file name>"}``). Splits: ``train`` (+ ``restval``), ``val`` -> ``dev``,
``test``; for COCO ``testall`` = the 5,000 test images and ``test`` = its first 1,000.
Features come separately (:mod:`itmkit.data.butd_tsv`), ordered by the ids written here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import CAPTIONS_PER_IMAGE

SPLIT_NAMES = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
COCO_TEST_1K = 1000


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a Karpathy JSON: its id, file name (relative to the image root) and 5 captions."""

    image_id: int
    file_name: str
    captions: tuple[str, ...]


def read_karpathy_json(path: str | Path) -> dict:
    """Parse a Karpathy split file; corrupt JSON or a missing ``images`` list -> ``DataFormatError``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataFormatError(path, "file", "a Karpathy split JSON", "no such file") from None
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"line {err.lineno} column {err.colno}", "valid JSON", err.msg) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        found = f"keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise DataFormatError(path, "images", 'an object with an "images" list', found)
    return data


def _image_id(entry: dict) -> int:
    # COCO carries "cocoid"; Flickr30K's id is the file name's stem ("1000092795.jpg").
    if "cocoid" in entry:
        return int(entry["cocoid"])
    stem = Path(str(entry.get("filename", ""))).stem
    if stem.isdigit():
        return int(stem)
    return int(entry["imgid"])


def parse_image(entry: object, number: int, path: Path) -> tuple[str, KarpathyImage]:
    """``(karpathy split, image)`` of the ``number``-th entry, keeping its first 5 ``raw`` captions."""
    where = f"images[{number}]"
    if not isinstance(entry, dict):
        raise DataFormatError(path, where, "an object", type(entry).__name__)
    for key in ("filename", "split", "sentences"):
        if key not in entry:
            raise DataFormatError(path, f"{where}.{key}", f"a {key!r} field", f"keys {sorted(entry)}")
    name = str(entry["filename"])
    if entry["split"] not in SPLIT_NAMES:
        raise DataFormatError(path, f"{where}.split ({name})", f"one of {sorted(SPLIT_NAMES)}", repr(entry["split"]))
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or len(sentences) < CAPTIONS_PER_IMAGE:
        found = f"{len(sentences)} sentences" if isinstance(sentences, list) else type(sentences).__name__
        raise DataFormatError(path, f"{where}.sentences ({name})", f"at least {CAPTIONS_PER_IMAGE} sentences", found)
    captions = []
    for k, sentence in enumerate(sentences[:CAPTIONS_PER_IMAGE]):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        # A caption file holds one caption per line: line breaks inside a caption become spaces.
        text = " ".join(str(raw).splitlines()).strip() if raw is not None else ""
        if not text:
            raise DataFormatError(path, f"{where}.sentences[{k}].raw ({name})", "a non-empty caption", repr(raw))
        captions.append(text)
    file_name = f"{entry['filepath']}/{name}" if entry.get("filepath") else name
    try:
        image_id = _image_id(entry)
    except (KeyError, TypeError, ValueError):
        raise DataFormatError(path, f"{where} ({name})", "an image id (cocoid, a numeric file name or imgid)", f"keys {sorted(entry)}") from None
    return entry["split"], KarpathyImage(image_id, file_name, tuple(captions))


def karpathy_splits(data: dict, path: str | Path = "<karpathy json>", coco: bool | None = None) -> dict[str, list[KarpathyImage]]:
    """Precomp splits of a parsed Karpathy JSON, images in file order (baselines.md §A.3).

    Args:
        data: :func:`read_karpathy_json` output.
        coco: add ``testall`` (all test images) and cut ``test`` to its first 1,000;
            ``None`` -> ``data["dataset"] == "coco"``.
    """
    path = Path(path)
    if coco is None:
        coco = str(data.get("dataset", "")).lower() == "coco"
    splits: dict[str, list[KarpathyImage]] = {}
    for number, entry in enumerate(tqdm(data["images"], desc="reading images", leave=False)):
        karpathy_split, image = parse_image(entry, number, path)
        splits.setdefault(SPLIT_NAMES[karpathy_split], []).append(image)
    if coco and "test" in splits:
        splits["testall"] = splits["test"]
        splits["test"] = splits["testall"][:COCO_TEST_1K]
    order = ["train", "dev", "test", "testall"]
    return {name: splits[name] for name in order if name in splits}


def write_precomp_text(splits: dict[str, list[KarpathyImage]], out_dir: str | Path) -> list[Path]:
    """Write ``{split}_caps.txt``, ``{split}_ids.txt`` and ``id_mapping.json``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    mapping: dict[str, str] = {}
    for split, images in splits.items():
        caps_path, ids_path = out_dir / f"{split}_caps.txt", out_dir / f"{split}_ids.txt"
        caps_path.write_text("".join(c + "\n" for image in images for c in image.captions), encoding="utf-8")
        ids_path.write_text("".join(f"{image.image_id}\n" for image in images), encoding="utf-8")
        written += [caps_path, ids_path]
        for image in images:
            mapping[str(image.image_id)] = image.file_name
    mapping_path = out_dir / "id_mapping.json"
    mapping_path.write_text(json.dumps(mapping), encoding="utf-8")
    written.append(mapping_path)
    return written


def karpathy_to_precomp(json_path: str | Path, out_dir: str | Path, coco: bool | None = None) -> dict[str, int]:
    """Read a Karpathy JSON and write its precomp text files; returns images per split."""
    data = read_karpathy_json(json_path)
    splits = karpathy_splits(data, json_path, coco=coco)
    write_precomp_text(splits, out_dir)
    return {name: len(images) for name, images in splits.items()}
