"""Build the embedded data set: scenes -> PNG images -> boxes -> CNN region features -> precomp folder.

The folder has SCAN's precomp layout (baselines.md §A.1, §A.2) so every reader and method in the
kit opens it unchanged: ``{train,dev,test}_ims.npy`` float32 ``[n, K, D]``, ``_caps.txt`` (5 lines per
image), ``_ids.txt``, ``_boxes.npy`` ``[n, K, 4]``, plus ``images/<id>.png``, ``scenes.json`` (scene
graphs, regions, hard-negative partners, which objects each caption mentions), ``vocab.json`` and
``meta.json`` (written last: a folder without it is incomplete).

Builds go into a hidden temporary folder beside the target and are renamed into place in one step,
so a concurrent or interrupted build never leaves a half folder under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from itmkit.data.embedded.captions import scene_captions
from itmkit.data.embedded.render import propose_regions, render_scene
from itmkit.data.embedded.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, make_partner, random_scene
from itmkit.data.region_features import (
    CNNRoIExtractor,
    RegionFeatureExtractor,
    EFFICIENTNET_LITE0_FEATURE_DIM,
    default_extractor_name,
    extract_region_features,
)
from itmkit.data.vocab import Vocabulary
from itmkit.paths import cache_dir

# Bump when scenes, captions, rendering or regions change: cached folders of another version are rebuilt.
GENERATOR_VERSION = 3
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class EmbeddedPreset:
    """Size and settings of an embedded data set.

    ``pair_fraction``: about this fraction of the images belong to a hard-negative pair.
    ``feature_dim``: region feature size; None keeps the extractor's own (1360 for the default
    EfficientNet-Lite0 extractor), any other value adds a fixed seeded projection (2048 gives
    BUTD-shaped features). ``input_size``: the CNN's input side.
    """

    name: str
    n_train: int
    n_dev: int
    n_test: int
    image_size: int = 224
    n_regions: int = 12
    feature_dim: int | None = None
    min_objects: int = 2
    max_objects: int = 4
    pair_fraction: float = 0.5
    vocab_threshold: int = 1
    input_size: int = 224
    pool: str = "avg"
    batch_size: int = 8

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}

    def validate(self) -> None:
        problems = []
        if min(self.n_train, self.n_dev, self.n_test) < 1:
            problems.append(f"split sizes >= 1, found {self.split_sizes()}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            problems.append(f"1 <= min_objects <= max_objects <= 4, found {self.min_objects}, {self.max_objects}")
        if self.n_regions < self.max_objects + 1:
            problems.append(f"n_regions >= max_objects + 1 = {self.max_objects + 1}, found {self.n_regions}")
        if not 0 <= self.pair_fraction <= 1:
            problems.append(f"pair_fraction in [0, 1], found {self.pair_fraction}")
        if self.image_size < 64:
            problems.append(f"image_size >= 64, found {self.image_size}")
        if problems:
            raise ValueError(f"EmbeddedPreset {self.name!r}: expected " + "; ".join(problems))


PRESETS: dict[str, EmbeddedPreset] = {
    # tests and CI: seconds, including the CNN
    "tiny": EmbeddedPreset("tiny", n_train=48, n_dev=16, n_test=16),
    # the course's default: every method learns on a 2-core CPU within minutes
    "course": EmbeddedPreset("course", n_train=600, n_dev=100, n_test=100),
}


def resolve_preset(preset: str | EmbeddedPreset) -> EmbeddedPreset:
    if isinstance(preset, EmbeddedPreset):
        preset.validate()
        return preset
    if preset not in PRESETS:
        raise ValueError(f"embedded data set: expected a preset in {sorted(PRESETS)} or an EmbeddedPreset, found {preset!r}")
    return PRESETS[preset]


def default_extractor(preset: EmbeddedPreset) -> CNNRoIExtractor:
    """EfficientNet-Lite0 RoI features with the preset's input size, pooling and dimension."""
    return CNNRoIExtractor(
        input_size=preset.input_size, pool=preset.pool, feature_dim=preset.feature_dim, batch_size=preset.batch_size  # type: ignore[arg-type]
    )


def embedded_feature_dim(name: str) -> int:
    """Region feature size ``D`` of the embedded preset ``name``: its ``feature_dim``, or the
    default extractor's own size when that is ``None``. Method presets size their image encoders
    with it, so they follow the data layer when its settings change."""
    return PRESETS[name].feature_dim or EFFICIENTNET_LITE0_FEATURE_DIM


def folder_name(preset: EmbeddedPreset, seed: int, extractor_name: str, feature_dim: int) -> str:
    """``<preset>-seed<seed>-<extractor>-<K>x<D>``; a preset that differs from the registered one
    of its name gets a short hash of its fields, so two custom presets never share a cache."""
    label = preset.name
    if PRESETS.get(preset.name) != preset:
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(preset), sort_keys=True).encode()).hexdigest()[:8]
        label = f"{preset.name}-{digest}"
    return f"{label}-seed{seed}-{extractor_name}-{preset.n_regions}x{feature_dim}"


def is_complete(folder: Path) -> bool:
    """A finished build of the current generator (``meta.json`` is written last)."""
    meta = folder / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("generator_version") == GENERATOR_VERSION
    except json.JSONDecodeError:
        return False


def generate_split_scenes(preset: EmbeddedPreset, seed: int, split: str, first_id: int) -> list[Scene]:
    """The split's scenes in id order; a hard-negative partner directly follows its original."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 0])
    n = preset.split_sizes()[split]
    # a base scene gets a partner with probability p, so the paired fraction is 2p / (1 + p)
    p_partner = preset.pair_fraction / (2 - preset.pair_fraction)
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = random_scene(rng, first_id + len(scenes), split, preset.image_size, preset.min_objects, preset.max_objects)
        scenes.append(scene)
        wants_partner = rng.random() < p_partner
        if wants_partner and len(scenes) < n:
            partner = make_partner(scene, rng, first_id + len(scenes))
            if partner is not None:
                scenes.append(partner)
    return scenes


def write_split(
    preset: EmbeddedPreset, seed: int, split: str, scenes: list[Scene], out: Path, progress: bool
) -> tuple[list[str], list[Path], np.ndarray]:
    """Render images, regions and captions of one split into ``out``; returns (captions, image
    paths, boxes ``[n, K, 4]``)."""
    captions: list[str] = []
    paths: list[Path] = []
    boxes = np.zeros((len(scenes), preset.n_regions, 4), dtype=np.float32)
    by_id = {s.image_id: s for s in scenes}
    for row, scene in enumerate(tqdm(scenes, desc=f"{split}: drawing scenes", unit="img", disable=not progress)):
        # partners share the region draw of their original, so a colour swap keeps identical boxes
        base_id = min(scene.image_id, scene.partner) if scene.partner is not None else scene.image_id
        rng = np.random.default_rng([seed, SPLITS.index(split), 2, base_id])
        regions = propose_regions(scene, preset.n_regions, rng)
        boxes[row] = regions["boxes"]
        scene.regions = {"kind": regions["kind"], "object": regions["object"]}
        texts, mentions = scene_captions(scene)
        scene.caption_objects = mentions
        captions.extend(texts)
        path = out / "images" / f"{scene.image_id}.png"
        Image.fromarray(render_scene(scene)).save(path, optimize=False)
        paths.append(path)
        assert scene.partner is None or scene.partner in by_id, "partners live in the same split"
    (out / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    (out / f"{split}_ids.txt").write_text("".join(f"{s.image_id}\n" for s in scenes), encoding="utf-8")
    np.save(out / f"{split}_boxes.npy", boxes)
    return captions, paths, boxes


def build_embedded(
    preset: str | EmbeddedPreset = "course",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    extractor: RegionFeatureExtractor | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Build the embedded set into exactly ``out_dir`` (atomically) and return it.

    An existing complete folder is kept unless ``force``. Without ``out_dir`` this is
    :func:`embedded_dataset`'s cache folder.
    """
    preset = resolve_preset(preset)
    started = time.perf_counter()
    extractor = extractor if extractor is not None else default_extractor(preset)
    if out_dir is None:
        out_dir = cache_dir() / "embedded" / folder_name(preset, seed, extractor.name, extractor.feature_dim)
    out_dir = Path(out_dir)
    if is_complete(out_dir) and not force:
        return out_dir
    # never replace a folder that is not an embedded set, even with force (a mistyped --out)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "meta.json").exists():
        raise FileExistsError(f"{out_dir}: expected a missing, empty or embedded-data folder, found other files")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        all_scenes: list[Scene] = []
        train_dev_captions: list[str] = []
        counts = {}
        first_id = 0
        for split in SPLITS:
            scenes = generate_split_scenes(preset, seed, split, first_id)
            first_id += len(scenes)
            captions, paths, boxes = write_split(preset, seed, split, scenes, tmp, progress)
            extract_region_features(paths, boxes, extractor, tmp / f"{split}_ims.npy", progress=progress)
            if split in ("train", "dev"):
                train_dev_captions.extend(captions)
            all_scenes.extend(scenes)
            counts[split] = {
                "images": len(scenes),
                "captions": len(captions),
                "paired_images": sum(s.partner is not None for s in scenes),
            }
        Vocabulary.build(train_dev_captions, threshold=preset.vocab_threshold).to_json(tmp / "vocab.json")
        scenes_doc = {
            "generator_version": GENERATOR_VERSION,
            "image_size": preset.image_size,
            "shapes": list(SHAPES),
            "colours": {k: list(v) for k, v in COLOURS.items()},
            "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
            "sizes": dict(SIZES),
            "images": [s.to_json() for s in all_scenes],
        }
        (tmp / "scenes.json").write_text(json.dumps(scenes_doc, indent=1, sort_keys=True), encoding="utf-8")
        describe = getattr(extractor, "describe", None)
        meta = {
            "generator_version": GENERATOR_VERSION,
            "preset": dataclasses.asdict(preset),
            "seed": seed,
            "extractor": describe() if callable(describe) else {"name": extractor.name, "feature_dim": extractor.feature_dim},
            "n_regions": preset.n_regions,
            "feature_dim": extractor.feature_dim,
            "counts": counts,
            "vocab_size": len(Vocabulary.from_json(tmp / "vocab.json")),
            "build_seconds": round(time.perf_counter() - started, 2),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        _move_into_place(tmp, out_dir, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out_dir`` in one step. If another build finished first, keep its folder
    (same inputs, same bytes) unless ``force``, which swaps the old folder out first."""
    if out_dir.exists() and (force or not is_complete(out_dir)):
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not is_complete(out_dir):  # pragma: no cover - only a third party writing there gets here
            raise


def embedded_dataset(
    preset: str | EmbeddedPreset = "course",
    seed: int = 0,
    root: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    extractor: RegionFeatureExtractor | None = None,
) -> Path:
    """The embedded data set's precomp folder, built on first use and cached.

    Lives under ``root`` (default ``itmkit.paths.cache_dir() / "embedded"``) in
    ``<preset>-seed<seed>-<extractor>-<K>x<D>``. ``preset``: ``"tiny"`` (48/16/16 images, seconds),
    ``"course"`` (600/100/100) or an :class:`EmbeddedPreset`. Same seed -> byte-identical captions
    and features on the same machine and thread count.
    """
    preset = resolve_preset(preset)
    if extractor is None:  # name the folder without loading the CNN: a cached set opens instantly
        name = default_extractor_name(preset.input_size, preset.pool, preset.feature_dim)
        dim = preset.feature_dim or EFFICIENTNET_LITE0_FEATURE_DIM
    else:
        name, dim = extractor.name, extractor.feature_dim
    root = Path(root) if root is not None else cache_dir() / "embedded"
    out_dir = root / folder_name(preset, seed, name, dim)
    if is_complete(out_dir) and not force:
        return out_dir
    with build_lock(out_dir):
        if is_complete(out_dir) and not force:  # another process built it while this one waited
            return out_dir
        return build_embedded(preset, seed, out_dir, extractor=extractor, progress=progress, force=force)


@contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``out_dir`` while building it, so two
    processes that ask for the same set at once (notebooks run in parallel, test workers) build
    it once: the second waits, then finds it complete. Builds are atomic without the lock too
    (the lock only saves the duplicate work); where ``fcntl`` is missing (Windows) it is a no-op."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
