"""RoI pooling, the pluggable CNN extractor and the incremental .npy writer (region_features.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itmkit.data.region_features import (
    EFFICIENTNET_LITE0_FEATURE_DIM,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CNNRoIExtractor,
    RegionFeatureExtractor,
    extract_region_features,
    roi_pool,
    seeded_projection,
    validate_boxes,
)


def cell_mean_module(stride: int = 4) -> torch.nn.Module:
    """A 'CNN' whose feature map is the mean colour of each stride x stride cell: features can be
    computed by hand from the pixels."""
    return torch.nn.AvgPool2d(stride)


def half_red_half_blue(size: int = 32) -> np.ndarray:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:, : size // 2] = (255, 0, 0)
    image[:, size // 2 :] = (0, 0, 255)
    return image


# ---------------------------------------------------------------------------- roi_pool by hand
def test_roi_pool_average_matches_hand_computed_area_weights():
    fmap = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[None, None]  # [1, 1, h=2, w=3]
    boxes = torch.tensor([[[0.0, 0.0, 3.0, 2.0], [0.5, 0.0, 2.0, 1.0], [1.0, 0.5, 3.0, 2.0]]])
    pooled = roi_pool(fmap, boxes, "avg")[0, :, 0]
    # whole map: mean of 1..6; second box: half of cell 1 and all of cell 2 -> (0.5*1 + 2) / 1.5;
    # third: half of cells 2, 3 in row 0, all of 5, 6 in row 1 -> (0.5*2 + 0.5*3 + 5 + 6) / 3
    expected = torch.tensor([3.5, 2.5 / 1.5, 13.5 / 3])
    torch.testing.assert_close(pooled, expected)


def test_roi_pool_max_uses_cells_with_positive_overlap_only():
    fmap = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[None, None]
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 2.0, 1.0], [0.2, 0.9, 1.1, 1.5]]])
    pooled = roi_pool(fmap, boxes, "max")[0, :, 0]
    # a box ending exactly on a cell border does not touch the next cell
    torch.testing.assert_close(pooled, torch.tensor([1.0, 2.0, 5.0]))


def _loop_roi_pool(fmap: np.ndarray, boxes: np.ndarray, mode: str) -> np.ndarray:
    """Independent reference: visit every cell, integrate its overlap with the box."""
    n, c, h, w = fmap.shape
    out = np.zeros((n, boxes.shape[1], c))
    for b in range(n):
        for k in range(boxes.shape[1]):
            x1, y1, x2, y2 = boxes[b, k]
            total, area, best = np.zeros(c), 0.0, np.full(c, -np.inf)
            for i in range(h):
                for j in range(w):
                    ox = max(0.0, min(x2, j + 1) - max(x1, j))
                    oy = max(0.0, min(y2, i + 1) - max(y1, i))
                    if ox * oy > 0:
                        total += ox * oy * fmap[b, :, i, j]
                        area += ox * oy
                        best = np.maximum(best, fmap[b, :, i, j])
            out[b, k] = total / area if mode == "avg" else best
    return out


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_pool_matches_plain_loop_reference(mode):
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(3, 4, 5, 6))
    corners = rng.uniform(-0.5, 5.5, size=(3, 7, 2, 2))
    lo, hi = corners.min(2), corners.max(2) + 0.05
    boxes = np.concatenate([lo, hi], -1)  # x1, y1, x2, y2 (some stick out of the map: clipped)
    boxes[..., 1::2] = np.clip(boxes[..., 1::2], -0.4, 4.6)
    got = roi_pool(torch.tensor(fmap), torch.tensor(boxes), mode).numpy()
    np.testing.assert_allclose(got, _loop_roi_pool(fmap, boxes, mode), rtol=1e-10, atol=1e-10)


def test_roi_pool_rejects_boxes_outside_the_map_and_bad_shapes():
    fmap = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match="box 1 of image 0 has no area"):
        roi_pool(fmap, torch.tensor([[[0.0, 0.0, 1.0, 1.0], [4.0, 4.0, 5.0, 5.0]]]))
    with pytest.raises(ValueError, match=r"expected feature_maps \[N, C, h, w\] and boxes \[N, K, 4\]"):
        roi_pool(fmap, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="mode 'avg' or 'max'"):
        roi_pool(fmap, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), "median")  # type: ignore[arg-type]


def test_validate_boxes_names_the_source_and_the_box():
    with pytest.raises(ValueError, match=r"img\.png: box 1 expected x2 > x1"):
        validate_boxes(np.array([[0, 0, 5, 5], [3, 0, 3, 4]]), 10, 10, "img.png")
    with pytest.raises(ValueError, match=r"expected boxes of shape \[K, 4\]"):
        validate_boxes(np.zeros((3, 5)), 10, 10)
    with pytest.raises(ValueError, match="box 0 expected to overlap the 10x10 image"):
        validate_boxes(np.array([[12, 0, 15, 4]]), 10, 10)


# ---------------------------------------------------------------------------- pluggable extractor
def test_pluggable_module_pools_hand_computable_colours():
    extractor = CNNRoIExtractor(cell_mean_module(4), input_size=32, mean=(0, 0, 0), std=(1, 1, 1), name="cell-mean")
    assert isinstance(extractor, RegionFeatureExtractor)
    assert (extractor.feature_dim, extractor.name, extractor.map_sizes) == (3, "cell-mean", [(8, 8)])
    boxes = np.array([[0, 0, 16, 32], [16, 0, 32, 32], [8, 0, 24, 16], [0, 0, 32, 32]], dtype=np.float32)
    feats = extractor(half_red_half_blue(), boxes)
    assert feats.dtype == np.float32 and feats.shape == (4, 3)
    np.testing.assert_allclose(feats, [[255, 0, 0], [0, 0, 255], [127.5, 0, 127.5], [127.5, 0, 127.5]], atol=1e-4)


def test_boxes_scale_with_the_resize_to_input_size():
    extractor = CNNRoIExtractor(cell_mean_module(4), input_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    big = np.repeat(np.repeat(half_red_half_blue(32), 2, 0), 2, 1)  # 64 x 64 image, same picture
    feats = extractor(big, np.array([[0, 0, 32, 64], [32, 0, 64, 64]]))
    # the anti-aliased resize blends the one column at the colour border: 1/128 of each half
    np.testing.assert_allclose(feats, [[253, 0, 2], [2, 0, 253]], atol=0.05)


def test_batched_extraction_equals_one_image_at_a_time():
    rng = np.random.default_rng(1)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2))
    torch.manual_seed(0)
    extractor = CNNRoIExtractor(module, input_size=32, batch_size=3)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(5)]
    boxes = rng.uniform(0, 14, size=(5, 4, 2))
    boxes = np.concatenate([boxes, boxes + rng.uniform(2, 16, size=(5, 4, 2))], -1)
    batched = extractor.extract_batch(images, boxes)
    single = np.stack([extractor(img, b) for img, b in zip(images, boxes)])
    assert batched.shape == (5, 4, 6)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same number of boxes"):
        extractor.extract_batch(images[:2], [boxes[0], boxes[1][:2]])
    with pytest.raises(ValueError, match=r"expected an RGB image uint8 \[H, W, 3\]"):
        extractor(images[0].astype(np.float32), boxes[0])


def test_projection_to_2048_is_the_seeded_linear_map_of_the_native_features():
    native = CNNRoIExtractor(cell_mean_module(4), input_size=32)
    projected = CNNRoIExtractor(cell_mean_module(4), input_size=32, feature_dim=2048, projection_seed=7)
    again = CNNRoIExtractor(cell_mean_module(4), input_size=32, feature_dim=2048, projection_seed=7)
    boxes = np.array([[0, 0, 16, 32], [4, 4, 30, 30]])
    out = projected(half_red_half_blue(), boxes)
    assert out.shape == (2, 2048) and out.dtype == np.float32
    expected = native(half_red_half_blue(), boxes) @ seeded_projection(3, 2048, 7).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, again(half_red_half_blue(), boxes))
    assert not np.allclose(seeded_projection(3, 2048, 7), seeded_projection(3, 2048, 8))
    assert projected.name.endswith("-proj7")


def test_weights_path_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(3)
    trained = torch.nn.Conv2d(3, 4, 4, stride=4)
    path = tmp_path / "toy.pt"
    torch.save(trained.state_dict(), path)
    fresh = torch.nn.Conv2d(3, 4, 4, stride=4)
    boxes = np.array([[0, 0, 20, 20]])
    image = half_red_half_blue()
    loaded = CNNRoIExtractor(fresh, weights_path=path, input_size=32)(image, boxes)
    np.testing.assert_allclose(loaded, CNNRoIExtractor(trained, input_size=32)(image, boxes), rtol=1e-6)
    with pytest.raises(ValueError, match=r"toy\.pt: expected the state dict of Conv2d"):
        CNNRoIExtractor(torch.nn.Conv2d(3, 4, 4, stride=4, bias=False), weights_path=path, input_size=32)


def test_extra_layers_are_pooled_and_concatenated():
    module = torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.AvgPool2d(2))
    extractor = CNNRoIExtractor(module, extra_layers=["0"], input_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    assert extractor.feature_dim == 6 and extractor.map_sizes == [(8, 8), (16, 16)]
    feats = extractor(half_red_half_blue(), np.array([[0, 0, 16, 32]]))
    np.testing.assert_allclose(feats, [[255, 0, 0, 255, 0, 0]], atol=1e-4)
    with pytest.raises(ValueError, match="extra layer 'nope'"):
        CNNRoIExtractor(module, extra_layers=["nope"], input_size=32)


# ---------------------------------------------------------------------------- default EfficientNet
@pytest.fixture(scope="module")
def effnet() -> CNNRoIExtractor:
    return CNNRoIExtractor(input_size=128)


def test_default_extractor_shapes_and_name(effnet):
    assert effnet.feature_dim == EFFICIENTNET_LITE0_FEATURE_DIM == 1360
    assert effnet.name == "efficientnet-lite0-128px-avg"
    assert effnet.map_sizes == [(4, 4), (8, 8)]
    assert not effnet.module.training
    feats = effnet(half_red_half_blue(96), np.array([[0, 0, 48, 96], [48, 0, 96, 96], [10, 10, 20, 20]]))
    assert feats.shape == (3, 1360) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])  # red and blue halves differ
    again = effnet(half_red_half_blue(96), np.array([[0, 0, 48, 96], [48, 0, 96, 96], [10, 10, 20, 20]]))
    assert again.tobytes() == feats.tobytes()  # same input, same bytes (eval mode, no dropout)


def test_efficientnet_lite_normalisation_beats_imagenet_statistics(effnet):
    """EfficientNet-Lite expects (x - 127) / 128; check it on a real photograph."""
    matplotlib = pytest.importorskip("matplotlib")
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"matplotlib's sample photograph is not installed ({photo})")
    pixels = np.asarray(Image.open(photo).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
    x = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]
    probs = {}
    with torch.no_grad():
        for name, (mean, std) in {"lite": ((127.0,) * 3, (128.0,) * 3), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}.items():
            xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
            probs[name] = effnet.module(xn).softmax(-1)[0]
    military_uniform = 652
    assert int(probs["lite"].argmax()) == military_uniform
    assert probs["lite"][military_uniform] > probs["imagenet"][military_uniform]
    torch.testing.assert_close(effnet.mean.flatten(), torch.tensor([127.0] * 3))


# ---------------------------------------------------------------------------- writing .npy files
def test_extract_region_features_writes_a_complete_npy(tmp_path):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    boxes = np.tile(np.array([[0, 0, 20, 16], [10, 8, 40, 32], [0, 0, 40, 32]], dtype=np.float32), (5, 1, 1))
    extractor = CNNRoIExtractor(cell_mean_module(4), input_size=32)
    out = extract_region_features(paths, boxes, extractor, tmp_path / "train_ims.npy", progress=False, chunk_size=2)
    feats = np.load(out)
    assert feats.shape == (5, 3, 3) and feats.dtype == np.float32
    for i, path in enumerate(paths):
        np.testing.assert_allclose(feats[i], extractor(np.asarray(Image.open(path)), boxes[i]), rtol=1e-6)
    assert not list(tmp_path.glob("*.partial"))


def test_extract_region_features_errors_name_the_problem(tmp_path):
    extractor = CNNRoIExtractor(cell_mean_module(4), input_size=32)
    with pytest.raises(ValueError, match="found 2 images and 1 box sets"):
        extract_region_features([tmp_path / "a.png", tmp_path / "b.png"], np.zeros((1, 2, 4)), extractor, tmp_path / "x.npy")
    with pytest.raises(FileNotFoundError, match=r"missing\.png: expected an image file"):
        extract_region_features([tmp_path / "missing.png"], np.array([[[0, 0, 4, 4]]]), extractor, tmp_path / "x.npy", progress=False)
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.npy.partial").exists()


def test_extract_region_features_failed_rename_raises_the_real_error(tmp_path, monkeypatch):
    # the rename is the last step: if it fails, its own error surfaces and no partial file stays
    import itmkit.data.region_features as region_features

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)

    def refuse(src, dst):
        raise PermissionError(f"read-only: {dst}")

    monkeypatch.setattr(region_features.os, "replace", refuse)
    extractor = CNNRoIExtractor(cell_mean_module(4), input_size=32)
    with pytest.raises(PermissionError, match="read-only"):
        extract_region_features([path], np.array([[[0, 0, 8, 8]]]), extractor, tmp_path / "x.npy", progress=False)
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.npy.partial").exists()


# ---------------------------------------------------------------------------- the command line
def _load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "data_prep" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_extract_region_features_command(tmp_path, capsys):
    script = _load_script("extract_region_features")
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--feature-dim" in capsys.readouterr().out
    images = tmp_path / "images"
    images.mkdir()
    for image_id in (7, 3):
        Image.fromarray(half_red_half_blue(64)).save(images / f"{image_id}.png")
    boxes = np.tile(np.array([[0, 0, 32, 64], [32, 0, 64, 64]], dtype=np.float32), (2, 1, 1))
    np.save(tmp_path / "boxes.npy", boxes)
    (tmp_path / "ids.txt").write_text("7\n7\n7\n7\n7\n3\n3\n3\n3\n3\n")  # one id per caption: collapsed
    args = ["--images", str(images), "--boxes", str(tmp_path / "boxes.npy"), "--ids", str(tmp_path / "ids.txt")]
    assert script.main(args + ["--out", str(tmp_path / "out"), "--split", "dev", "--input-size", "64", "--no-progress"]) == 0
    feats = np.load(tmp_path / "out" / "dev_ims.npy")
    assert feats.shape == (2, 2, 1360) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats[0], feats[1])  # the same picture under two ids
    (tmp_path / "ids.txt").write_text("7\n8\n")
    with pytest.raises(FileNotFoundError, match="expected an image named 8"):
        script.main(args + ["--out", str(tmp_path / "out")])
