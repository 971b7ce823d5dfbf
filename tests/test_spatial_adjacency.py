"""The direction-sector adjacency (cefg.md §3.4): hand-made boxes, a per-region loop written from
the spec's steps, the split-level readers, the data_prep command, and the appended region columns
that carry it to the model (PrecompSplit.with_region_columns)."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle

import numpy as np
import pytest

from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import PrecompSplit, RegionColumns
from itmkit.data.spatial_adjacency import (
    adjacency_file,
    check_adjacency,
    read_image_sizes,
    sector_adjacency,
    split_adjacency,
)
from itmkit.paths import REPO_ROOT

TAN30 = math.tan(math.pi / 6)


def box(cx, cy, w=2.0, h=2.0):
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def adjacency_of(boxes, size=(100.0, 100.0), rule="released"):
    return sector_adjacency(np.asarray(boxes, dtype=np.float32), np.asarray(size, dtype=np.float64), rule)


def edges(adjacency):
    """Off-diagonal ones as a set of (i, j)."""
    return {(int(i), int(j)) for i, j in np.argwhere(adjacency == 1) if i != j}


# ----------------------------------------------------------------------------------------------
# hand-made boxes (y grows downwards in pixels; the rule's Δy is "up")
# ----------------------------------------------------------------------------------------------
def test_three_boxes_in_a_row_point_left_only():
    a = adjacency_of([box(10, 50), box(30, 50), box(60, 50)])
    assert np.all(np.diag(a) == 1)
    # region 1 sees 0 on its left; region 2 sees 1 and 0 (its two nearest to the left); 0 sees nobody
    assert edges(a) == {(1, 0), (2, 1), (2, 0)}


def test_only_the_two_nearest_on_the_left():
    a = adjacency_of([box(90, 50), box(70, 50), box(50, 50), box(20, 50)])
    assert {j for i, j in edges(a) if i == 0} == {1, 2}


def test_left_sector_is_plus_minus_30_degrees():
    # candidates 20 px to the left of region 0, at 25 deg above, 35 deg above and 28 deg below
    def at(angle_deg):
        r = 20.0
        return box(50 - r * math.cos(math.radians(angle_deg)), 50 - r * math.sin(math.radians(angle_deg)))

    a = adjacency_of([box(50, 50), at(25), at(35), at(-28)])
    assert {j for i, j in edges(a) if i == 0} == {1, 3}
    # straight above / below / right: never
    a = adjacency_of([box(50, 50), box(50, 20), box(50, 80), box(80, 50)])
    assert not {j for i, j in edges(a) if i == 0}


def test_image_size_normalisation_changes_angles():
    # 10 px left and 8 px up: 38.7 deg in pixels (outside the sector); in a 50 x 100 image the
    # normalised offsets are (0.2, 0.08): 21.8 deg (inside)
    boxes = [box(30, 30), box(20, 22)]
    assert not edges(adjacency_of(boxes, (100.0, 100.0)))
    assert edges(adjacency_of(boxes, (50.0, 100.0))) == {(0, 1)}


def test_a_box_inside_is_dropped_and_not_replaced():
    big = [0.0, 0.0, 60.0, 100.0]  # region 0, centre (30, 50)
    inside_left = box(20, 50, 6, 6)  # centre 10 px left, inside box 0: dropped
    second = box(12, 50, 4, 4)  # inside as well: dropped
    third = [-20.0, 40.0, 4.0, 60.0]  # centre (-8, 50), sticks out: would be third nearest, not taken
    a = adjacency_of([big, inside_left, second, third])
    assert not {j for i, j in edges(a) if i == 0}
    # the other way round: the small box's left neighbour is the big box, which contains it (not
    # "inside" it), so that edge is kept
    a = adjacency_of([box(50, 50, 4, 4), [0.0, 30.0, 96.0, 70.0]])  # big centre (48, 50): 2 px left
    assert edges(a) == {(0, 1)}


def test_concentric_boxes_fall_in_the_left_sector():
    # equal centres: Δx = -(0.0) = -0.0, atan2(+0, -0) = π -> sector 7 (the reference's arithmetic)
    small, large = box(50, 50, 4, 4), box(50, 50, 20, 20)
    a = adjacency_of([small, large])
    assert edges(a) == {(0, 1)}  # large is not inside small: kept; small inside large: dropped
    identical = adjacency_of([small, small])
    assert not edges(identical)  # an identical box counts as inside (intersection = its area)


def test_rules_identity_and_all_sectors():
    rng = np.random.default_rng(0)
    centres = rng.uniform(10, 90, (9, 2))
    boxes = np.array([box(x, y, 3, 3) for x, y in centres], dtype=np.float32)
    assert np.array_equal(adjacency_of(boxes, rule="identity"), np.eye(9, dtype=np.float32))
    full = adjacency_of(boxes, rule="all_sectors")
    released = adjacency_of(boxes, rule="released")
    assert np.all(np.diag(full) == 1) and np.all(full.sum(1) <= 5)
    # small separated boxes: every region has a neighbour in several sectors, so exactly 4 are
    # kept, and they are its 4 nearest among the regions of its sector picks
    assert np.all(full.sum(1) == 5)
    per_sector = reference_adjacency(boxes, (100.0, 100.0), sectors=range(8))
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    for i in range(9):
        candidates = sorted((distance[i, j], j) for j in range(9) if j != i and per_sector[i, j])
        assert {j for _, j in candidates[:4]} == {j for i2, j in edges(full) if i2 == i}
    assert edges(released) <= edges(per_sector)


# ----------------------------------------------------------------------------------------------
# against a per-region loop written from the spec (cefg.md §3.4 steps 1-5)
# ----------------------------------------------------------------------------------------------
def reference_adjacency(boxes, size, sectors=(7,)):
    """Plain loops in float32: one region, one sector, one candidate at a time."""
    f = np.float32
    w, h = size
    b = [[f(x1 / w), f(y1 / h), f(x2 / w), f(y2 / h)] for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64)]
    K = len(b)
    centre = [(bx[0] + f(0.5) * (bx[2] - bx[0]), bx[1] + f(0.5) * (bx[3] - bx[1])) for bx in b]
    bounds = [f(v) for v in (-5 * math.pi / 6, -2 * math.pi / 3, -math.pi / 3, -math.pi / 6,
                             math.pi / 6, math.pi / 3, 2 * math.pi / 3, 5 * math.pi / 6)]  # fmt: skip

    def in_sector(theta, k):
        if k == 7:
            return theta >= bounds[7] or theta < bounds[0]
        return bounds[k] <= theta < bounds[k + 1]

    def inside(i, j):  # intersection area == area of box j
        wi = max(f(0), min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]))
        hi = max(f(0), min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]))
        return wi * hi == (b[j][2] - b[j][0]) * (b[j][3] - b[j][1])

    out = np.eye(K, dtype=np.float32)
    for k in sectors:
        for i in range(K):
            found = []
            for j in range(K):
                if j == i:
                    continue
                dx = -(centre[i][0] - centre[j][0])
                dy = centre[i][1] - centre[j][1]
                if in_sector(np.arctan2(f(dy), f(dx)), k):
                    found.append((np.sqrt(f(dx * dx + dy * dy)), j))
            for _, j in sorted(found)[:2]:
                if not inside(i, j):
                    out[i, j] = 1
    return out


@pytest.mark.parametrize("seed", range(4))
def test_released_rule_equals_the_loop_on_random_boxes(seed):
    rng = np.random.default_rng(seed)
    n, K = 3, 12
    sizes = rng.uniform(200, 600, (n, 2))
    boxes = np.empty((n, K, 4), dtype=np.float32)
    for m in range(n):
        wh = rng.uniform(0.1, 0.5, (K, 2)) * sizes[m]
        corner = rng.uniform(0, 1, (K, 2)) * (sizes[m] - wh)
        boxes[m] = np.concatenate([corner, corner + wh], 1)
        boxes[m, 3] = boxes[m, 0] * 0.5 + boxes[m, 2] * 0.5  # a duplicate-ish box inside others
    a = sector_adjacency(boxes, sizes)
    for m in range(n):
        assert np.array_equal(a[m], reference_adjacency(boxes[m], sizes[m])), m
        # properties (§10): diagonal 1, <= 3 ones per row, every edge points left within 30 deg
        assert np.all(np.diag(a[m]) == 1) and np.all(a[m].sum(1) <= 3)
        centre = (boxes[m, :, :2] + boxes[m, :, 2:]) / 2 / sizes[m]
        for i, j in edges(a[m]):
            dx, dy = centre[j, 0] - centre[i, 0], centre[i, 1] - centre[j, 1]
            assert dx < 0 and abs(dy) <= TAN30 * abs(dx) + 1e-6


def test_input_errors():
    with pytest.raises(ValueError, match=r"expected \[n, K, 4\]"):
        sector_adjacency(np.zeros((2, 3, 5)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="expected 2 .*found 1"):
        sector_adjacency(np.zeros((2, 3, 4)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="positive image sizes"):
        sector_adjacency(np.zeros((1, 3, 4)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="rule.*'left'"):
        sector_adjacency(np.zeros((1, 3, 4)), np.ones((1, 2)), rule="left")


# ----------------------------------------------------------------------------------------------
# splits: stored files, on-the-fly from boxes, sizes, the data_prep command
# ----------------------------------------------------------------------------------------------
def write_split(root, n=4, K=5, split="test", seed=0, boxes=True):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{split}_ims.npy", rng.standard_normal((n, K, 3)).astype(np.float32))
    (root / f"{split}_caps.txt").write_text("".join(f"image {i} caption {c}\n" for i in range(n) for c in range(5)))
    sizes = rng.uniform(100, 300, (n, 2))
    wh = rng.uniform(0.1, 0.5, (n, K, 2)) * sizes[:, None]
    corner = rng.uniform(0, 1, (n, K, 2)) * (sizes[:, None] - wh)
    box_array = np.concatenate([corner, corner + wh], -1).astype(np.float32)
    if boxes:
        np.save(root / f"{split}_boxes.npy", box_array)
    return box_array, sizes


def test_image_sizes_from_numeric_file_reference_dicts_and_meta(tmp_path):
    np.save(tmp_path / "test_ims_size.npy", np.array([[640, 480], [500, 375]]))
    assert read_image_sizes(tmp_path, "test", 2).tolist() == [[640, 480], [500, 375]]
    with pytest.raises(DataFormatError, match=r"shape.*\(3, 2\)"):
        read_image_sizes(tmp_path, "test", 3)
    dicts = np.array([{"image_w": 640, "image_h": 480}, {"image_w": 500, "image_h": 375}], dtype=object)
    np.save(tmp_path / "test_ims_size.npy", dicts, allow_pickle=True)
    with pytest.raises(DataFormatError, match="allow-pickle"):
        read_image_sizes(tmp_path, "test", 2)
    assert read_image_sizes(tmp_path, "test", 2, allow_pickle=True).tolist() == [[640, 480], [500, 375]]
    (tmp_path / "test_ims_size.npy").unlink()
    with pytest.raises(DataFormatError, match="test_ims_size.npy.*image sizes"):
        read_image_sizes(tmp_path, "test", 2)
    (tmp_path / "meta.json").write_text(json.dumps({"preset": {"image_size": 224}}))
    assert read_image_sizes(tmp_path, "test", 2).tolist() == [[224, 224], [224, 224]]


def test_split_adjacency_on_the_fly_and_from_a_stored_file(tmp_path):
    boxes, sizes = write_split(tmp_path / "data", n=4)
    root = tmp_path / "data"
    np.save(root / "test_ims_size.npy", sizes)
    split = PrecompSplit.open(root, "test")
    computed = split_adjacency(split, "released")
    assert computed.shape == (4, 5, 5)
    assert np.array_equal(computed, sector_adjacency(boxes, sizes))
    # a prefix view (max_captions) reads the sizes of its own rows
    head = PrecompSplit.open(root, "test", max_captions=10)
    assert np.array_equal(split_adjacency(head, "released"), computed[:2])
    # a stored file wins, and is checked
    stored = computed.copy()
    stored[:, 0, 1] = 1.0
    np.save(adjacency_file(root, "test", "released"), stored)
    assert np.array_equal(split_adjacency(split, "released"), stored)
    assert np.array_equal(split_adjacency(head, "released"), stored[:2])
    stored[2, 1, 1] = 0.0
    np.save(adjacency_file(root, "test", "released"), stored)
    with pytest.raises(DataFormatError, match="row 2 diagonal entry 1.*expected 1"):
        split_adjacency(split, "released")
    np.save(adjacency_file(root, "test", "released"), stored[:3])
    with pytest.raises(DataFormatError, match=r"shape.*\(4, 5, 5\)"):
        split_adjacency(split, "released")
    with pytest.raises(DataFormatError, match="entry .*0 or 1"):
        check_adjacency(np.full((1, 2, 2), 0.5))


def test_missing_boxes_name_the_files(tmp_path):
    write_split(tmp_path, boxes=False)
    split = PrecompSplit.open(tmp_path, "test")
    with pytest.raises(DataFormatError, match="test_boxes.npy.*test_ims_dir_selfadj4.npy.*cefg_adjacency"):
        split_adjacency(split, "released")
    assert np.array_equal(split_adjacency(split, "identity")[2], np.eye(5))


def load_command():
    spec = importlib.util.spec_from_file_location("cefg_adjacency_command", REPO_ROOT / "data_prep" / "cefg_adjacency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_prep_command_writes_the_reference_file_from_reference_inputs(tmp_path, capsys):
    boxes, sizes = write_split(tmp_path, n=4, boxes=False)
    # the reference's inputs: {split}_ims_bbx.npy and an array of {"image_w", "image_h"} dicts
    np.save(tmp_path / "test_ims_bbx.npy", boxes)
    dicts = np.array([{"image_w": w, "image_h": h} for w, h in sizes], dtype=object)
    np.save(tmp_path / "test_ims_size.npy", dicts, allow_pickle=True)
    command = load_command()
    assert command.main([str(tmp_path), "--splits", "test"]) == 2  # the dicts need --allow-pickle
    assert "allow-pickle" in capsys.readouterr().err
    assert command.main([str(tmp_path), "--splits", "test", "--allow-pickle"]) == 0
    written = np.load(tmp_path / "test_ims_dir_selfadj4.npy")
    assert written.dtype == np.float32 and np.array_equal(written, sector_adjacency(boxes, sizes))
    assert "test_ims_dir_selfadj4.npy" in capsys.readouterr().out
    assert command.main([str(tmp_path), "--rule", "all_sectors", "--allow-pickle"]) == 0
    assert np.array_equal(np.load(tmp_path / "test_ims_dir_allsectors.npy"), sector_adjacency(boxes, sizes, "all_sectors"))
    # the split reader picks the written file up
    assert np.array_equal(split_adjacency(PrecompSplit.open(tmp_path, "test"), "released"), written)


def test_data_prep_command_with_a_fixed_image_size_and_errors(tmp_path, capsys):
    boxes, _ = write_split(tmp_path, n=3)
    command = load_command()
    assert command.main([str(tmp_path), "--image-size", "320", "240"]) == 0
    assert np.array_equal(np.load(tmp_path / "test_ims_dir_selfadj4.npy"),
                          sector_adjacency(boxes, np.tile([320.0, 240.0], (3, 1))))  # fmt: skip
    (tmp_path / "test_boxes.npy").unlink()
    assert command.main([str(tmp_path), "--image-size", "320", "240"]) == 2
    assert "no split with" in capsys.readouterr().err
    assert command.main([str(tmp_path), "--splits", "test", "--image-size", "320", "240"]) == 2
    assert "test_boxes.npy" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the appended region columns
# ----------------------------------------------------------------------------------------------
def test_region_columns_read_like_features_and_survive_pickling(tmp_path):
    write_split(tmp_path, n=4, K=5)
    split = PrecompSplit.open(tmp_path, "test")
    extra = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)
    wide = split.with_region_columns(extra, "demo")
    assert isinstance(wide.images, RegionColumns) and wide.images.shape == (4, 5, 5)
    assert wide.n_regions == 5 and wide.feature_dim == 5
    np.testing.assert_array_equal(wide.image_features(2), np.concatenate([split.image_features(2), extra[2]], -1))
    np.testing.assert_array_equal(wide.image_block(1, 3), np.concatenate([split.image_block(1, 3), extra[1:3]], -1))
    fold = wide.subset(2, 4)
    assert isinstance(fold.images, RegionColumns)
    np.testing.assert_array_equal(fold.image_features(0), wide.image_features(2))
    again = pickle.loads(pickle.dumps(fold))
    np.testing.assert_array_equal(again.image_block(0, 2), wide.image_block(2, 4))
    assert again.images.name == "demo"
    rewrapped = wide.with_region_columns(extra[..., :1], "other")  # replaces, never nests
    assert rewrapped.images.shape == (4, 5, 4)
    with pytest.raises(ValueError, match=r"\[n, K\] = \(4, 5\)"):
        split.with_region_columns(np.zeros((4, 3, 2)), "bad")


def test_loaders_hand_the_columns_to_models(tmp_path):
    from itmkit.data.loaders import PairDataset, image_batches
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary

    write_split(tmp_path, n=4, K=5)
    split = PrecompSplit.open(tmp_path, "test")
    wide = split.with_region_columns(np.ones((4, 5, 5), dtype=np.float32), "ones")
    pipeline = WordIdPipeline(Vocabulary.build(split.captions, threshold=1))
    item = PairDataset(wide, pipeline, train=False)[7]
    assert item.image.shape == (5, 8) and np.all(item.image[:, 3:] == 1)
    images, lengths = next(image_batches(wide, 3))
    assert tuple(images.shape) == (3, 5, 8) and lengths.tolist() == [5, 5, 5]


def test_command_runs_as_a_script_with_help():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO_ROOT / "data_prep" / "cefg_adjacency.py"), "--help"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage:" in done.stdout and "cefg.md" in done.stdout
