"""Frozen global features per image and per caption, read beside the precomp features (aahr.md §8).

AAHR guides its pooling with a frozen OpenCLIP ViT-B/32 embedding of every image and caption.
CLIP is frozen and sees un-augmented inputs, so itmkit precomputes it once
(``data_prep/clip_features.py``) into two arrays beside the region features::

    {split}_clip_img.npy   float32 [n_images, g]     (one row per unique image)
    {split}_clip_cap.npy   float32 [n_captions, g']  (one row per caption line)

:func:`read_global_features` reads them for a :class:`~itmkit.data.precomp.PrecompSplit` view
(a subset or a fold reads its rows). Missing arrays raise :class:`DataFormatError` listing the
files to supply and how.

For the embedded course sets (no raw photographs, no CLIP weights offline) itmkit's design is
:func:`embedded_global_features`: frozen, pretrained features the kit already has offline -
**images**: the EfficientNet-Lite0 RoI feature of the whole-image box that every embedded image
has (``kind = "image"`` in the region proposals; the CNN's view of the whole picture, as CLIP's
image tower sees the whole picture) - **captions**: the offline all-MiniLM-L6-v2 sentence embedding
(mean of the last hidden states over the real tokens, as sentence-transformers pools it). They are
computed once per embedded folder and cached under ``itmkit.paths.cache_dir() / "global_features"``
in the same two-file layout. Unlike CLIP, the two are not in one joint space: the model's
projections (``fc_clip``) must learn to align them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit, load_array, read_captions

IMAGE_FILE = "{split}_clip_img.npy"
CAPTION_FILE = "{split}_clip_cap.npy"
GlobalSource = Literal["precomp", "embedded"]

SUPPLY_HINT = (
    "write them with `python data_prep/clip_features.py --precomp <folder> --checkpoint "
    "<open_clip_pytorch_model.bin> --images <raw image folder> --id-mapping <id_mapping.json>` "
    "(pip install 'itmkit[clip]'; the OpenCLIP ViT-B-32 laion2b_s34b_b79k weights are a local file "
    "you supply), or train with model.clip_branch='none' (no CLIP branch, aahr.md §8)"
)


@dataclass
class GlobalFeatures:
    """One split view's global features.

    Attributes:
        images: ``[n_images, g_img]`` float32, row ``i`` = unique image ``i`` of the view.
        captions: ``[n_captions, g_txt]`` float32, row ``c`` = caption ``c`` of the view.
        folder: where the arrays were read.
    """

    images: np.ndarray
    captions: np.ndarray
    folder: Path


def global_feature_paths(folder: str | Path, split: str) -> tuple[Path, Path]:
    """``(image array, caption array)`` paths of ``split`` in ``folder``."""
    folder = Path(folder)
    return folder / IMAGE_FILE.format(split=split), folder / CAPTION_FILE.format(split=split)


def read_global_features(split: PrecompSplit, folder: str | Path | None = None) -> GlobalFeatures:
    """The global features of ``split``'s view from ``folder`` (default: beside the precomp files).

    Raises :class:`DataFormatError` naming the file when an array is missing (listing both files
    to supply and how), is not 2-D float, has another row count than the split's file has images /
    captions, or holds NaN/Inf."""
    folder = Path(folder) if folder is not None else Path(split.root)
    image_path, caption_path = global_feature_paths(folder, split.split)
    missing = [p for p in (image_path, caption_path) if not p.is_file()]
    if missing:
        raise DataFormatError(
            missing[0], "file",
            f"the frozen global (CLIP) features {image_path.name} [n_images, 512] and {caption_path.name} "
            f"[n_captions, 512] beside {split.split}_ims.npy; {SUPPLY_HINT}",
            "missing: " + ", ".join(p.name for p in missing),
        )  # fmt: skip
    n_file_captions = len(read_captions(Path(split.root) / f"{split.split}_caps.txt"))
    expected = {image_path: n_file_captions // CAPTIONS_PER_IMAGE, caption_path: n_file_captions}
    arrays = []
    for path, what in ((image_path, "images"), (caption_path, "captions")):
        array = load_array(path, f"global {what} features [n_{what}, g]")
        if array.ndim != 2 or array.dtype.kind != "f":
            raise DataFormatError(path, "shape", f"a 2-D float array [n_{what}, g]", f"shape {array.shape}, dtype {array.dtype}")
        if array.shape[0] != expected[path]:
            raise DataFormatError(path, "rows", f"{expected[path]} (one per {what[:-1]} of {split.split}_caps.txt)",
                                  f"{array.shape[0]} rows")  # fmt: skip
        arrays.append(array)
    first, stop = split.image_range
    images = np.array(arrays[0][first:stop], dtype=np.float32)
    captions = np.array(arrays[1][first * CAPTIONS_PER_IMAGE : stop * CAPTIONS_PER_IMAGE], dtype=np.float32)
    for path, values in ((image_path, images), (caption_path, captions)):
        if not np.isfinite(values).all():
            row = int(np.nonzero(~np.isfinite(values).all(axis=1))[0][0])
            raise DataFormatError(path, f"row {row}", "finite values", "NaN or Inf")
    return GlobalFeatures(images, captions, folder)


def write_global_features(folder: str | Path, split: str, images: np.ndarray, captions: np.ndarray) -> tuple[Path, Path]:
    """Write the two arrays of ``split`` into ``folder`` (float32; each file appears whole, via a
    temporary name and one rename). Returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = global_feature_paths(folder, split)
    for path, values in zip(paths, (images, captions)):
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2:
            raise ValueError(f"write_global_features {path.name}: expected a 2-D array [n, g], found shape {values.shape}")
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".npy")
        with os.fdopen(handle, "wb") as out:
            np.save(out, values)
        os.replace(tmp, path)
    return paths


# ----------------------------------------------------------------------------- writing CLIP features (data_prep)


def image_files(split: PrecompSplit, images_root: str | Path, id_mapping: Mapping[str, str] | None = None) -> list[Path]:
    """The raw image file of every unique image of ``split`` (``images_root / id_mapping[str(id)]``;
    without a mapping, ``images_root / f"{id}.jpg"``). Ids from ``{split}_ids.txt``.

    Raises :class:`DataFormatError` naming the ids file, an id the mapping lacks, or a missing file."""
    ids_path = Path(split.root) / f"{split.split}_ids.txt"
    if split.image_ids is None:
        raise DataFormatError(ids_path, "file", "one image id per image or caption (to find the raw images)", "no such file")
    root = Path(images_root)
    files = []
    for image, image_id in enumerate(split.image_ids):
        key = str(int(image_id))
        if id_mapping is not None and key not in id_mapping:
            raise DataFormatError(ids_path, f"image {image}", f"an id listed in the id mapping ({len(id_mapping)} ids)", f"id {key}")
        path = root / (id_mapping[key] if id_mapping is not None else f"{key}.jpg")
        if not path.is_file():
            raise DataFormatError(path, "file", f"the raw image of {split.split} image {image} (id {key})", "no such file")
        files.append(path)
    return files


def write_clip_features(
    split: PrecompSplit,
    files: list[Path],
    encode_images: Callable[[list[Path]], np.ndarray],
    encode_texts: Callable[[list[str]], np.ndarray],
    out_dir: str | Path | None = None,
    batch_size: int = 64,
) -> tuple[Path, Path]:
    """Encode ``split``'s images (``files``, one per unique image) and captions in batches with the
    given encoders (``[n, g]`` arrays each; OpenCLIP's ``encode_image`` / ``encode_text`` in
    ``data_prep/clip_features.py``) and write ``{split}_clip_{img,cap}.npy`` to ``out_dir``
    (default: the precomp folder). Returns the two paths."""
    if len(files) != split.n_images:
        raise ValueError(f"write_clip_features: expected {split.n_images} image files (one per image), found {len(files)}")
    if batch_size < 1:
        raise ValueError(f"write_clip_features batch_size: expected >= 1, found {batch_size}")

    def run(encode: Callable, items: list, what: str) -> np.ndarray:
        parts = []
        for start in range(0, len(items), batch_size):
            chunk = np.asarray(encode(items[start : start + batch_size]), dtype=np.float32)
            if chunk.ndim != 2 or chunk.shape[0] != len(items[start : start + batch_size]):
                raise ValueError(f"write_clip_features: the {what} encoder returned shape {chunk.shape} for "
                                 f"{len(items[start : start + batch_size])} items; expected [n, g]")  # fmt: skip
            parts.append(chunk)
        return np.concatenate(parts)

    images, captions = run(encode_images, list(files), "image"), run(encode_texts, list(split.captions), "text")
    return write_global_features(out_dir if out_dir is not None else split.root, split.split, images, captions)


# ----------------------------------------------------------------------------- embedded sets [itmkit]


def whole_image_rows(boxes: np.ndarray) -> np.ndarray:
    """``boxes [n, K, 4]`` -> ``[n]`` index of each image's largest box (the whole-image box of
    the embedded sets, which always have one)."""
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return areas.argmax(axis=1)


def sentence_embeddings(captions: list[str], hf_path: str | Path | None = None, batch_size: int = 128) -> np.ndarray:
    """``[n, hidden]`` float32 mean-pooled last hidden states of a local Hugging Face encoder
    (``None``: the offline all-MiniLM-L6-v2), no gradient, eval mode. Each distinct caption is
    encoded once (the embedded grammar repeats captions)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from itmkit.data.text import check_hf_folder

    path = check_hf_folder(hf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    distinct = sorted(set(captions))
    rows = []
    with torch.no_grad():
        for start in range(0, len(distinct), batch_size):
            encoded = tokenizer(distinct[start : start + batch_size], padding=True, return_tensors="pt")
            states = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"][..., None].to(states.dtype)
            rows.append(((states * mask).sum(1) / mask.sum(1)).numpy())
    table = np.concatenate(rows).astype(np.float32)
    index = {caption: i for i, caption in enumerate(distinct)}
    return table[[index[c] for c in captions]]


def embedded_global_cache(split: PrecompSplit) -> Path:
    """Cache folder of an embedded precomp folder's global features."""
    from itmkit.paths import cache_dir

    return cache_dir() / "global_features" / Path(split.root).resolve().name


def embedded_global_features(split: PrecompSplit) -> GlobalFeatures:
    """itmkit's frozen global features for an embedded set (see the module doc), computed on first
    use for the whole split file and cached; returns the view's rows."""
    folder = embedded_global_cache(split)
    if not all(p.is_file() for p in global_feature_paths(folder, split.split)):
        whole = PrecompSplit.open(split.root, split.split)
        if whole.boxes is None:
            raise DataFormatError(Path(split.root) / f"{split.split}_boxes.npy", "file",
                                  "the region boxes of an embedded set (to find each image's whole-image box)",
                                  "no such file")  # fmt: skip
        boxes = np.asarray(whole.boxes)[:: whole.image_step]
        rows = whole_image_rows(boxes)
        images = np.stack([whole.image_features(i)[rows[i]] for i in range(whole.n_images)])
        write_global_features(folder, split.split, images, sentence_embeddings(whole.captions))
    return read_global_features(split, folder)


def global_features_for(split: PrecompSplit, source: GlobalSource) -> GlobalFeatures:
    """``"precomp"``: the arrays beside the precomp files; ``"embedded"``: :func:`embedded_global_features`."""
    if source == "precomp":
        return read_global_features(split)
    if source == "embedded":
        return embedded_global_features(split)
    raise ValueError(f"global feature source: expected 'precomp' or 'embedded', found {source!r}")


__all__ = [
    "CAPTION_FILE",
    "IMAGE_FILE",
    "GlobalFeatures",
    "embedded_global_features",
    "global_feature_paths",
    "global_features_for",
    "image_files",
    "write_clip_features",
    "read_global_features",
    "sentence_embeddings",
    "whole_image_rows",
    "write_global_features",
]
