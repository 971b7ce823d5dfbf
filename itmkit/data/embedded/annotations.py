"""The embedded set's ground truth beside its features: which region shows which object.

``scenes.json`` (written by :mod:`itmkit.data.embedded.build`) records, per image, the objects
(shape, colour, size) and for each proposed region its kind and owning object (``-1`` for
background, pair and whole-image regions). Notebook 01 asks what the region features encode; this
module pairs each object region's feature vector with its object's attributes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from itmkit.data.precomp import PrecompSplit


def read_scenes(root: str | Path) -> dict:
    """``scenes.json`` of an embedded data folder (``FileNotFoundError`` names the file)."""
    path = Path(root) / "scenes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected the embedded set's scene records (itmkit.data.embedded), found no file")
    return json.loads(path.read_text(encoding="utf-8"))


def object_regions(root: str | Path, split: str = "train") -> tuple[pd.DataFrame, np.ndarray]:
    """Every region of ``split`` that shows one object, with that object's attributes.

    Returns ``(rows, vectors)``: ``rows`` with columns ``image`` (index in the split), ``region``,
    ``kind``, ``colour``, ``shape``, ``size``; ``vectors [len(rows), feature_dim]`` the regions'
    stored features, in the same order. An image id missing from ``scenes.json`` raises
    ``KeyError`` naming it.
    """
    records = read_scenes(root)
    scenes = {int(s["image_id"]): s for s in records["images"]}
    opened = PrecompSplit.open(root, split)
    if opened.image_ids is None:
        raise ValueError(f"{opened.root} split {split!r}: expected {split}_ids.txt to find each image's scene, found none")
    rows, vectors = [], []
    for i, image_id in enumerate(opened.image_ids):
        if int(image_id) not in scenes:
            raise KeyError(f"{Path(root) / 'scenes.json'}: image id {int(image_id)} of split {split!r}: no scene record")
        scene = scenes[int(image_id)]
        features = opened.image_features(i)
        for k, owner in enumerate(scene["regions"]["object"]):
            if owner >= 0:
                obj = scene["objects"][owner]
                rows.append({"image": i, "region": k, "kind": scene["regions"]["kind"][k], "colour": obj["colour"],
                             "shape": obj["shape"], "size": obj.get("size")})  # fmt: skip
                vectors.append(features[k])
    return pd.DataFrame(rows), np.stack(vectors) if vectors else np.zeros((0, opened.feature_dim), np.float32)
