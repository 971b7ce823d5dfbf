"""Karpathy split JSON -> precomp text files (baselines.md §A.3), on small hand-made JSONs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itmkit.data.errors import DataFormatError
from itmkit.data.karpathy import karpathy_splits, karpathy_to_precomp, read_karpathy_json
from itmkit.data.precomp import read_captions, read_ids


def image(split: str, n_captions: int = 5, cocoid: int | None = None, name: str | None = None, imgid: int = 0) -> dict:
    file_name = name or (f"COCO_val2014_{cocoid:012d}.jpg" if cocoid is not None else f"{1000 + imgid}.jpg")
    entry = {
        "filename": file_name,
        "imgid": imgid,
        "split": split,
        "sentences": [{"raw": f"Image {imgid} says {k}.", "tokens": [], "imgid": imgid, "sentid": 5 * imgid + k}
                      for k in range(n_captions)],
    }
    if cocoid is not None:
        entry.update(cocoid=cocoid, filepath="val2014")
    return entry


def write_json(path: Path, images: list[dict], dataset: str) -> Path:
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path


def test_flickr_layout(tmp_path):
    splits = ["train", "test", "val", "train", "test", "train"]
    src = write_json(tmp_path / "dataset_flickr30k.json", [image(s, imgid=i) for i, s in enumerate(splits)], "flickr30k")
    counts = karpathy_to_precomp(src, tmp_path / "f30k_precomp")
    assert counts == {"train": 3, "dev": 1, "test": 2}
    out = tmp_path / "f30k_precomp"
    train = read_captions(out / "train_caps.txt")
    assert len(train) == 15 and train[0] == "Image 0 says 0." and train[5] == "Image 3 says 0." and train[14] == "Image 5 says 4."
    assert read_ids(out / "train_ids.txt").tolist() == [1000, 1003, 1005]
    assert read_ids(out / "dev_ids.txt").tolist() == [1002]
    assert read_captions(out / "test_caps.txt")[5] == "Image 4 says 0."
    assert not (out / "testall_caps.txt").exists()
    assert json.loads((out / "id_mapping.json").read_text())["1004"] == "1004.jpg"


def test_coco_restval_testall_and_extra_captions(tmp_path, monkeypatch):
    import itmkit.data.karpathy as karpathy

    monkeypatch.setattr(karpathy, "COCO_TEST_1K", 2)  # "first 1,000" shrunk to 2 for a 3-image test set
    images = [image("train", cocoid=10, imgid=0), image("restval", cocoid=11, imgid=1, n_captions=7),
              image("test", cocoid=12, imgid=2), image("val", cocoid=13, imgid=3),
              image("test", cocoid=14, imgid=4, n_captions=6), image("test", cocoid=15, imgid=5)]
    src = write_json(tmp_path / "dataset_coco.json", images, "coco")
    counts = karpathy_to_precomp(src, tmp_path / "coco_precomp")
    assert counts == {"train": 2, "dev": 1, "test": 2, "testall": 3}
    out = tmp_path / "coco_precomp"
    train = read_captions(out / "train_caps.txt")
    assert len(train) == 10 and train[5:] == [f"Image 1 says {k}." for k in range(5)]  # first 5 of 7 kept
    assert read_ids(out / "testall_ids.txt").tolist() == [12, 14, 15]
    assert read_ids(out / "test_ids.txt").tolist() == [12, 14]
    assert read_captions(out / "test_caps.txt") == read_captions(out / "testall_caps.txt")[:10]
    assert json.loads((out / "id_mapping.json").read_text())["13"] == "val2014/COCO_val2014_000000000013.jpg"


def test_line_breaks_inside_a_caption_become_spaces(tmp_path):
    entry = image("test", imgid=0)
    entry["sentences"][2]["raw"] = "  A dog\nruns.  "
    splits = karpathy_splits({"images": [entry]})
    assert splits["test"][0].captions[2] == "A dog runs."


@pytest.mark.parametrize("case,fragment", [
    ("four captions", "1003.jpg"),
    ("empty raw", "sentences[1].raw"),
    ("bad split", "'holdout'"),
    ("no sentences", "'sentences'"),
])
def test_bad_images_raise_naming_the_image(tmp_path, case, fragment):
    images = [image("train", imgid=i) for i in range(4)]
    if case == "four captions":
        images[3] = image("train", imgid=3, n_captions=4)
    elif case == "empty raw":
        images[2]["sentences"][1]["raw"] = "   "
    elif case == "bad split":
        images[1]["split"] = "holdout"
    elif case == "no sentences":
        del images[0]["sentences"]
    src = write_json(tmp_path / "dataset_flickr30k.json", images, "flickr30k")
    with pytest.raises(DataFormatError) as caught:
        karpathy_to_precomp(src, tmp_path / "out")
    assert "dataset_flickr30k.json" in str(caught.value) and fragment in str(caught.value), str(caught.value)


def test_corrupt_json(tmp_path):
    (tmp_path / "k.json").write_text('{"images": [')
    with pytest.raises(DataFormatError, match="valid JSON"):
        read_karpathy_json(tmp_path / "k.json")
    (tmp_path / "k.json").write_text('{"dataset": "coco"}')
    with pytest.raises(DataFormatError, match="images"):
        read_karpathy_json(tmp_path / "k.json")
