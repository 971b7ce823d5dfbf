"""PrecompSplit: layout inference, memory-mapping, and every corrupt-input case (baselines.md §A.1)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import PrecompSplit, list_splits, read_captions, verify_precomp
from itmkit.paths import scan_text_dir


def write_split(root: Path, split: str, n_img: int, k: int = 3, d: int = 4, im_div: int = 5,
                ids: str | None = "image", boxes: bool = True, seed: int = 0) -> np.ndarray:
    """A small valid split; returns the unique-image features ``[n_img, k, d]``."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_img, k, d)).astype(np.float32)
    rows = feats if im_div == 5 else np.repeat(feats, 5, axis=0)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{split}_ims.npy", rows)
    (root / f"{split}_caps.txt").write_text("\n".join(f"image {i} caption {j}" for i in range(n_img) for j in range(5)) + "\n")
    image_ids = 1000 + np.arange(n_img)
    if ids == "image":
        (root / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in image_ids))
    elif ids == "caption":
        (root / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in np.repeat(image_ids, 5)))
    if boxes:
        np.save(root / f"{split}_boxes.npy", rng.uniform(0, 100, (len(rows), k, 4)).astype(np.float32))
    return feats


def test_open_reads_layout_im_div_5(tmp_path):
    feats = write_split(tmp_path, "train", n_img=4)
    split = PrecompSplit.open(tmp_path, "train")
    assert isinstance(split.images, np.memmap)
    assert (split.n_images, split.n_captions, split.n_regions, split.feature_dim, split.im_div) == (4, 20, 3, 4, 5)
    assert split.captions[7] == "image 1 caption 2"
    assert split.image_of_caption(7) == 1 and split.row_of_caption(7) == 1
    np.testing.assert_array_equal(split.image_features(2), feats[2])
    np.testing.assert_array_equal(split.image_block(1, 3), feats[1:3])
    assert split.image_ids.tolist() == [1000, 1001, 1002, 1003] and split.ids_per == "image"
    assert split.boxes.shape == (4, 3, 4)


def test_im_div_1_when_images_repeated_per_caption(tmp_path):
    feats = write_split(tmp_path, "test", n_img=3, im_div=1, ids="caption")
    split = PrecompSplit.open(tmp_path, "test")
    assert split.im_div == 1 and split.images.shape[0] == 15
    assert split.n_images == 3 and split.image_step == 5
    assert split.row_of_caption(7) == 7 and split.image_of_caption(7) == 1
    np.testing.assert_array_equal(split.image_block(0, 3), feats)
    assert split.image_ids.tolist() == [1000, 1001, 1002] and split.ids_per == "caption"


def test_no_trailing_newline_and_crlf(tmp_path):
    write_split(tmp_path, "dev", n_img=2)
    path = tmp_path / "dev_caps.txt"
    path.write_bytes(path.read_bytes().rstrip(b"\n").replace(b"\n", b"\r\n"))
    split = PrecompSplit.open(tmp_path, "dev")
    assert split.n_captions == 10 and split.captions[-1] == "image 1 caption 4"


def test_max_captions_keeps_a_prefix(tmp_path):
    feats = write_split(tmp_path, "dev", n_img=5)
    split = PrecompSplit.open(tmp_path, "dev", max_captions=15)
    assert (split.n_images, split.n_captions, split.images.shape[0]) == (3, 15, 3)
    assert isinstance(split.images, np.memmap)
    np.testing.assert_array_equal(split.image_block(0, 3), feats[:3])
    assert split.boxes.shape[0] == 3 and split.image_ids.tolist() == [1000, 1001, 1002]
    assert PrecompSplit.open(tmp_path, "dev", max_captions=500).n_captions == 25
    with pytest.raises(ValueError, match="multiple of 5"):
        PrecompSplit.open(tmp_path, "dev", max_captions=12)


@pytest.mark.parametrize("im_div", [5, 1])
def test_folds_slice_images_and_captions(tmp_path, im_div):
    feats = write_split(tmp_path, "testall", n_img=10, im_div=im_div, ids="caption" if im_div == 1 else "image")
    split = PrecompSplit.open(tmp_path, "testall")
    for f in range(5):
        fold = split.fold(f, images_per_fold=2)
        assert fold.n_images == 2 and fold.n_captions == 10
        assert fold.captions[0] == f"image {2 * f} caption 0"
        assert fold.image_range == (2 * f, 2 * f + 2)
        np.testing.assert_array_equal(fold.image_block(0, 2), feats[2 * f : 2 * f + 2])
        assert fold.image_ids.tolist() == [1000 + 2 * f, 1001 + 2 * f]
    with pytest.raises(ValueError, match="fold 5"):
        split.fold(5, images_per_fold=2)


# --- corrupt inputs: each names the file and what was expected --------------------------------
def _corrupt(root: Path, case: str) -> tuple[str, str]:
    """Break a valid split in one way; return (file name, message fragment) the error must hold."""
    if case == "missing folder":
        shutil.rmtree(root)
        return root.name, "no such folder"
    if case == "missing captions":
        (root / "train_caps.txt").unlink()
        return "train_caps.txt", "no such file"
    if case == "missing features":
        (root / "train_ims.npy").unlink()
        return "train_ims.npy", "no such file"
    if case == "features rank":
        np.save(root / "train_ims.npy", np.zeros((4, 12), np.float32))
        return "train_ims.npy", "3 dims"
    if case == "features dtype":
        np.save(root / "train_ims.npy", np.zeros((4, 3, 4), np.int64))
        return "train_ims.npy", "float32"
    if case == "caption count":
        lines = (root / "train_caps.txt").read_text().splitlines()
        (root / "train_caps.txt").write_text("\n".join(lines[:-1]))
        return "train_caps.txt", "found 19 lines"
    if case == "empty caption":
        lines = (root / "train_caps.txt").read_text().splitlines()
        lines[6] = "   "
        (root / "train_caps.txt").write_text("\n".join(lines))
        return "train_caps.txt", "line 7"
    if case == "not utf-8":
        (root / "train_caps.txt").write_bytes(b"caf\xe9\n" * 20)
        return "train_caps.txt", "UTF-8"
    if case == "corrupt npy":
        (root / "train_ims.npy").write_bytes(b"this is not an npy file")
        return "train_ims.npy", "readable .npy"
    if case == "truncated npy":
        data = (root / "train_ims.npy").read_bytes()
        (root / "train_ims.npy").write_bytes(data[: len(data) // 2])
        return "train_ims.npy", "readable .npy"
    if case == "ids count":
        (root / "train_ids.txt").write_text("1\n2\n3\n")
        return "train_ids.txt", "found 3 lines"
    if case == "ids not integers":
        (root / "train_ids.txt").write_text("1\n2\nthree\n4\n")
        return "train_ids.txt", "line 3"
    if case == "ids per caption disagree":
        ids = [7] * 5 + [8] * 4 + [9] + [10] * 10
        (root / "train_ids.txt").write_text("".join(f"{i}\n" for i in ids))
        return "train_ids.txt", "image 1"
    if case == "boxes shape":
        np.save(root / "train_boxes.npy", np.zeros((4, 3, 5), np.float32))
        return "train_boxes.npy", "(4, 3, 4)"
    if case == "corrupt id_mapping":
        (root / "id_mapping.json").write_text('{"1": "a.jpg", ')
        return "id_mapping.json", "valid JSON"
    raise AssertionError(case)


CORRUPT_CASES = ["missing folder", "missing captions", "missing features", "features rank", "features dtype",
                 "caption count", "empty caption", "not utf-8", "corrupt npy", "truncated npy", "ids count",
                 "ids not integers", "ids per caption disagree", "boxes shape", "corrupt id_mapping"]


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_corrupt_input_raises_data_format_error(tmp_path, case):
    root = tmp_path / "f30k_precomp"
    write_split(root, "train", n_img=4)
    PrecompSplit.open(root, "train")  # valid before the damage
    file_name, fragment = _corrupt(root, case)
    with pytest.raises(DataFormatError) as caught:
        PrecompSplit.open(root, "train")
    message = str(caught.value)
    assert file_name in message and fragment in message, message
    assert caught.value.path.name == file_name


@pytest.mark.parametrize("im_div", [5, 1])
def test_pickled_split_reopens_its_rows_instead_of_copying(tmp_path, im_div):
    import pickle

    feats = write_split(tmp_path, "testall", n_img=10, k=6, d=50, im_div=im_div, ids="caption" if im_div == 1 else "image")
    fold = PrecompSplit.open(tmp_path, "testall").fold(3, images_per_fold=2)
    data = pickle.dumps(fold)
    assert len(data) < fold.images.nbytes  # the features are not in the pickle
    again = pickle.loads(data)
    assert isinstance(again.images, np.memmap) and again.image_range == (6, 8)
    np.testing.assert_array_equal(again.image_block(0, 2), feats[6:8])
    np.testing.assert_array_equal(again.boxes, fold.boxes)
    assert again.captions == fold.captions and again.image_ids.tolist() == fold.image_ids.tolist()


def test_error_message_names_all_four_parts():
    err = DataFormatError("/x/train_caps.txt", "line 3", "a non-empty caption", "an empty line")
    assert str(err) == "/x/train_caps.txt: line 3: expected a non-empty caption, found an empty line"
    assert isinstance(err, ValueError)
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.field, again.expected, again.found) == (err.path, err.field, err.expected, err.found)


def test_id_mapping_in_parent_folder_is_read(tmp_path):
    root = tmp_path / "coco_precomp"
    write_split(root, "dev", n_img=2)
    (tmp_path / "id_mapping.json").write_text(json.dumps({"1000": "val2014/a.jpg", "1001": "val2014/b.jpg"}))
    split = PrecompSplit.open(root, "dev")
    assert split.id_mapping[str(split.image_ids[1])] == "val2014/b.jpg"


def test_list_splits_and_verify(tmp_path):
    write_split(tmp_path, "train", n_img=4)
    write_split(tmp_path, "dev", n_img=2, boxes=False, ids=None)
    write_split(tmp_path, "testall", n_img=3, im_div=1, ids="caption")
    write_split(tmp_path, "extra", n_img=1)
    (tmp_path / "extra_caps.txt").write_text("only one line\n")
    assert list_splits(tmp_path) == ["train", "dev", "testall", "extra"]
    table = verify_precomp(tmp_path).set_index("split")
    assert table.loc["train", "status"] == "ok" and table.loc["train", "images"] == 4
    assert not table.loc["dev", "boxes"] and pd.isna(table.loc["dev", "ids"])
    assert table.loc["testall", "im_div"] == 1 and table.loc["testall", "ids"] == "caption"
    train_bytes = sum(p.stat().st_size for p in tmp_path.glob("train_*"))
    assert table.loc["train", "size_mb"] * 2**20 == pytest.approx(train_bytes)
    assert table.loc["extra", "status"] == "error" and "extra_caps.txt" in table.loc["extra", "problem"]
    empty = verify_precomp(tmp_path / "nothing")
    assert len(empty) == 1 and empty.loc[0, "status"] == "error"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS read from /proc (Linux only)")
def test_large_features_are_memory_mapped_not_read(tmp_path):
    shape = (1000, 36, 2048)  # ~295 MB of float32, the size of a small real split
    out = np.lib.format.open_memmap(tmp_path / "test_ims.npy", mode="w+", dtype=np.float32, shape=shape)
    out[-1, -1, -1] = 3.5
    out.flush()
    del out
    (tmp_path / "test_caps.txt").write_text("".join(f"caption {i}\n" for i in range(5000)))
    file_size = (tmp_path / "test_ims.npy").stat().st_size
    before = _rss_bytes()
    split = PrecompSplit.open(tmp_path, "test")
    one = split.image_features(999)
    grown = _rss_bytes() - before
    assert isinstance(split.images, np.memmap)
    assert one[-1, -1] == 3.5
    assert file_size > 290e6 and grown < file_size / 20, (grown, file_size)


# --- the real SCAN caption files ------------------------------------------------------------
def _real(name: str) -> Path:
    path = scan_text_dir() / name
    if not path.is_file():
        pytest.skip(f"real SCAN file {path} absent (set ITMKIT_SCAN_TEXT)")
    return path


def _with_fake_features(tmp_path: Path, caps: Path, split: str, n_rows: int) -> Path:
    (tmp_path / f"{split}_caps.txt").symlink_to(caps)
    np.lib.format.open_memmap(tmp_path / f"{split}_ims.npy", mode="w+", dtype=np.float32, shape=(n_rows, 2, 3)).flush()
    return tmp_path


def test_real_f30k_test_captions(tmp_path):
    caps = _real("f30k_precomp/test_caps.txt")
    assert not caps.read_bytes().endswith(b"\n")  # the release has no trailing newline
    captions = read_captions(caps)
    assert len(captions) == 5000 and all(c == c.strip() and c for c in captions)
    split = PrecompSplit.open(_with_fake_features(tmp_path, caps, "test", 1000), "test")
    assert (split.n_images, split.im_div, split.captions[-1]) == (1000, 5, captions[-1])


def test_real_coco_testall_folds(tmp_path):
    caps = _real("coco_precomp/testall_caps.txt")
    split = PrecompSplit.open(_with_fake_features(tmp_path, caps, "testall", 5000), "testall")
    assert split.n_captions == 25000 and split.n_images == 5000
    first_fold = split.fold(0).captions
    test_1k = read_captions(_real("coco_precomp/test_caps.txt"))
    # The released test_caps.txt is testall's first fold except for its very last line, which
    # holds another version of the caption ("cegetables" typo, lower case): a quirk of the release.
    assert len(test_1k) == len(first_fold) == 5000
    assert [i for i in range(5000) if first_fold[i] != test_1k[i]] == [4999]
    assert split.fold(4).captions[-1] == split.captions[-1]


def test_real_f30k_dev_first_5000(tmp_path):
    caps = _real("f30k_precomp/dev_caps.txt")
    split = PrecompSplit.open(_with_fake_features(tmp_path, caps, "dev", 1014), "dev", max_captions=5000)
    assert (split.n_images, split.n_captions, split.images.shape[0]) == (1000, 5000, 1000)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_found_by_readers_and_verify(tmp_path, monkeypatch, bad):
    import itmkit.data.precomp as precomp

    write_split(tmp_path, "test", n_img=30)
    feats = np.load(tmp_path / "test_ims.npy")
    feats[21, 2, 1] = bad
    np.save(tmp_path / "test_ims.npy", feats)
    split = PrecompSplit.open(tmp_path, "test")  # opening reads no values
    where = r"test_ims\.npy: row 21, region 2, dim 1: expected finite region features, found " + ("nan" if bad != bad else "inf")
    with pytest.raises(DataFormatError, match=where):
        split.image_features(21)
    with pytest.raises(DataFormatError, match=where + r" \(1 non-finite values in rows 21-21\)"):
        split.image_block(16, 24)
    np.testing.assert_array_equal(split.image_block(0, 21), feats[:21])  # clean rows read as before
    # a view further into the file names the file's row, not the view's
    with pytest.raises(DataFormatError, match=where):
        split.subset(20, 30).feature_row(1)
    # verify scans the whole memmap in blocks (here of 4 rows) and reports the split
    monkeypatch.setattr(precomp, "SCAN_ROWS", 4)
    table = verify_precomp(tmp_path).set_index("split")
    assert table.loc["test", "status"] == "error" and table.loc["test", "images"] == 30
    assert "row 21, region 2, dim 1" in table.loc["test", "problem"]
    assert "rows 20-23" in table.loc["test", "problem"]
    assert verify_precomp(tmp_path, check_values=False).loc[0, "status"] == "ok"


def test_non_finite_boxes_are_reported_by_verify(tmp_path):
    write_split(tmp_path, "dev", n_img=3)
    boxes = np.load(tmp_path / "dev_boxes.npy")
    boxes[1, 0, 3] = np.nan
    np.save(tmp_path / "dev_boxes.npy", boxes)
    problem = verify_precomp(tmp_path).loc[0, "problem"]
    assert "dev_boxes.npy: row 1, region 0, dim 3: expected finite boxes, found nan" in problem


# --- issue 14 §5: a byte-order mark, and feature rows that only look repeated -------------------
def test_utf8_byte_order_mark_is_not_part_of_the_first_word(tmp_path):
    from itmkit.data.precomp import read_ids, read_id_mapping
    from itmkit.data.vocab import Vocabulary

    write_split(tmp_path, "test", n_img=2)
    caps = tmp_path / "test_caps.txt"
    plain = read_captions(caps)
    caps.write_bytes(b"\xef\xbb\xbf" + caps.read_bytes())
    with_bom = read_captions(caps)
    assert with_bom == plain and with_bom[0] == "image 0 caption 0"
    vocab = Vocabulary.build(plain, threshold=1)
    assert vocab.encode(with_bom[0]) == vocab.encode(plain[0])
    assert Vocabulary.UNK not in vocab.encode(with_bom[0])
    ids = tmp_path / "test_ids.txt"
    ids.write_bytes(b"\xef\xbb\xbf" + ids.read_bytes())
    assert read_ids(ids).tolist() == [1000, 1001]
    mapping = tmp_path / "id_mapping.json"
    mapping.write_bytes(b"\xef\xbb\xbf" + json.dumps({"1000": "a.jpg"}).encode())
    assert read_id_mapping(mapping) == {"1000": "a.jpg"}
    assert PrecompSplit.open(tmp_path, "test").captions[0] == "image 0 caption 0"


def _rows_as_captions(root: Path, rows: np.ndarray) -> None:
    np.save(root / "test_ims.npy", rows)
    (root / "test_caps.txt").write_text("".join(f"caption {i}\n" for i in range(len(rows))))


def test_one_distinct_row_per_caption_is_refused_not_read_every_fifth(tmp_path):
    rows = np.random.default_rng(0).standard_normal((10, 2, 3)).astype(np.float32)  # 10 different rows
    _rows_as_captions(tmp_path, rows)
    with pytest.raises(DataFormatError) as caught:
        PrecompSplit.open(tmp_path, "test")
    err = caught.value
    assert err.path == tmp_path / "test_ims.npy" and err.field == "rows 0-4"
    assert "found row 1 differing from row 0" in str(err) and "im_div 1" in str(err)
    # only image 1's group differs (row 7): named precisely
    repeated = np.repeat(rows[:2], 5, axis=0)
    repeated[7, 1, 2] += 1.0
    _rows_as_captions(tmp_path, repeated)
    with pytest.raises(DataFormatError, match=r"rows 5-9: .*found row 7 differing from row 5"):
        PrecompSplit.open(tmp_path, "test")
    # truly repeated rows (NaN included: equal to themselves here) open as im_div 1
    repeated = np.repeat(rows[:2], 5, axis=0)
    repeated[:5, 0, 0] = np.nan
    _rows_as_captions(tmp_path, repeated)
    assert PrecompSplit.open(tmp_path, "test").im_div == 1


def test_large_repeated_files_are_checked_on_a_sample_that_includes_the_last_image(tmp_path, monkeypatch):
    import itmkit.data.precomp as precomp

    rows = np.repeat(np.random.default_rng(1).standard_normal((200, 2, 3)).astype(np.float32), 5, axis=0)
    rows[-1] += 1.0  # the last image's fifth row differs
    _rows_as_captions(tmp_path, rows)
    monkeypatch.setattr(precomp, "REPEAT_CHECK_BYTES", 0)  # force the sampled check
    with pytest.raises(DataFormatError, match=r"rows 995-999"):
        PrecompSplit.open(tmp_path, "test")
