"""BUTD TSV -> precomp features (baselines.md §A.4), on generated TSV files."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import numpy as np
import pytest

from itmkit.data.butd_tsv import read_tsv, tsv_to_precomp, write_tsv
from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import PrecompSplit

K, D = 4, 6


def features_of(image_id: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(image_id)
    return rng.uniform(0, 50, (K, 4)).astype(np.float32), rng.standard_normal((K, D)).astype(np.float32)


def write_rows(path: Path, image_ids, num_boxes: int = K) -> Path:
    rows = []
    for image_id in image_ids:
        boxes, feats = features_of(image_id)
        rows.append((image_id, 640, 480, boxes[:num_boxes], feats[:num_boxes]))
    write_tsv(path, rows)
    return path


def make_precomp(root: Path, splits: dict[str, list[int]], ids_per_caption: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / f"{split}_caps.txt").write_text("".join(f"image {i} caption {k}\n" for i in ids for k in range(5)))
        listed = np.repeat(ids, 5) if ids_per_caption else ids
        (root / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in listed))
    return root


def test_tsv_fields_decode_as_written(tmp_path):
    path = write_rows(tmp_path / "a.tsv", [7, 3])
    rows = list(read_tsv(path))
    assert [(r.image_id, r.image_w, r.image_h, r.num_boxes, r.line) for r in rows] == [(7, 640, 480, K, 1), (3, 640, 480, K, 2)]
    boxes, feats = features_of(3)
    np.testing.assert_array_equal(rows[1].decode("features", D), feats)
    np.testing.assert_array_equal(rows[1].decode("boxes", 4), boxes)
    # base64 of raw little-endian float32, decoded independently of the reader
    raw = base64.b64decode(next(csv.reader(path.open(), delimiter="\t"))[5])
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(K, D), features_of(7)[1])


@pytest.mark.parametrize("ids_per_caption", [False, True])
def test_outputs_follow_each_splits_ids(tmp_path, ids_per_caption):
    root = make_precomp(tmp_path / "p", {"train": [5, 1, 9], "test": [2, 5]}, ids_per_caption)
    write_rows(tmp_path / "part1.tsv", [9, 2, 77])  # 77 belongs to no split: ignored
    write_rows(tmp_path / "part2.tsv", [1, 5])
    counts = tsv_to_precomp([tmp_path / "part1.tsv", tmp_path / "part2.tsv"], root, num_boxes=K, feature_dim=D, progress=False)
    assert counts == {"test": 2, "train": 3}
    for split, ids in {"train": [5, 1, 9], "test": [2, 5]}.items():
        opened = PrecompSplit.open(root, split)
        assert opened.images.shape == (len(ids), K, D) and opened.images.dtype == np.float32
        for row, image_id in enumerate(ids):
            boxes, feats = features_of(image_id)
            np.testing.assert_array_equal(opened.images[row], feats)
            np.testing.assert_array_equal(opened.boxes[row], boxes)
    assert not list(root.glob("*.partial"))


def test_large_field_exceeds_csv_default_limit(tmp_path):
    root = make_precomp(tmp_path / "p", {"dev": [4]})
    feats = np.arange(36 * 2048, dtype=np.float32).reshape(36, 2048)  # ~390 KB of base64 > 131072
    write_tsv(tmp_path / "big.tsv", [(4, 10, 10, np.zeros((36, 4), np.float32), feats)])
    csv.field_size_limit(131072)  # the default; the reader must raise it itself
    tsv_to_precomp([tmp_path / "big.tsv"], root, num_boxes=36, feature_dim=2048, write_boxes=False, progress=False)
    np.testing.assert_array_equal(np.load(root / "dev_ims.npy"), feats[None])
    assert not (root / "dev_boxes.npy").exists()


def test_missing_image_raises_and_leaves_no_output(tmp_path):
    root = make_precomp(tmp_path / "p", {"train": [1, 2, 3]})
    write_rows(tmp_path / "a.tsv", [1, 3])
    with pytest.raises(DataFormatError) as caught:
        tsv_to_precomp([tmp_path / "a.tsv"], root, num_boxes=K, feature_dim=D, progress=False)
    assert "train_ids.txt" in str(caught.value) and "1 missing" in str(caught.value) and "[2]" in str(caught.value)
    assert not (root / "train_ims.npy").exists() and not list(root.glob("*.partial"))


def test_wrong_num_boxes_raises_naming_line_and_image(tmp_path):
    root = make_precomp(tmp_path / "p", {"train": [1, 2]})
    write_rows(tmp_path / "a.tsv", [1])
    with (tmp_path / "a.tsv").open("a") as handle:  # image 2 has only 3 boxes
        boxes, feats = features_of(2)
        handle.write("\t".join(["2", "640", "480", "3", base64.b64encode(boxes[:3].tobytes()).decode(),
                                base64.b64encode(feats[:3].tobytes()).decode()]) + "\n")
    with pytest.raises(DataFormatError) as caught:
        tsv_to_precomp([tmp_path / "a.tsv"], root, num_boxes=K, feature_dim=D, progress=False)
    message = str(caught.value)
    assert "a.tsv" in message and "line 2 (image 2) num_boxes" in message and f"expected {K}, found 3" in message


@pytest.mark.parametrize("case,fragment", [
    ("feature bytes", "line 1 (image 1) features"),
    ("field count", "6 tab-separated fields"),
    ("bad integer", "integers image_id"),
    ("duplicate", "a repeat of a.tsv line 1"),
])
def test_corrupt_rows(tmp_path, case, fragment):
    root = make_precomp(tmp_path / "p", {"train": [1]})
    boxes, feats = features_of(1)
    fields = ["1", "640", "480", str(K), base64.b64encode(boxes.tobytes()).decode(), base64.b64encode(feats.tobytes()).decode()]
    if case == "feature bytes":
        fields[5] = base64.b64encode(feats.tobytes()[:-4]).decode()
    elif case == "field count":
        fields = fields[:5]
    elif case == "bad integer":
        fields[0] = "abc"
    lines = ["\t".join(fields)] * (2 if case == "duplicate" else 1)
    (tmp_path / "a.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as caught:
        tsv_to_precomp([tmp_path / "a.tsv"], root, num_boxes=K, feature_dim=D, progress=False)
    assert "a.tsv" in str(caught.value) and fragment in str(caught.value), str(caught.value)
