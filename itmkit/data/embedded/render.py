"""Drawing scenes to pixels (PIL) and proposing detector-like region boxes.

The region boxes imitate what a bottom-up-attention detector hands to the precomp features
(baselines.md §A.1): a tight box per object, jittered duplicates of objects (detectors return
several overlapping boxes per thing), boxes around pairs of objects, background crops and the whole
image. Which boxes are objects is recorded, never used for the features: those come from the
pixels (see ``region_features.py``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from itmkit.data.embedded.scenes import Scene, outline

REGION_KINDS = ("object", "jitter", "pair", "background", "image")


def render_scene(scene: Scene, supersample: int = 2) -> np.ndarray:
    """The scene as RGB uint8 ``[image_size, image_size, 3]``.

    Drawn ``supersample`` times larger and downsampled (Lanczos) for anti-aliased edges; a soft
    vertical light gradient keeps the background from being one flat value. Deterministic.
    """
    size = scene.image_size
    big = size * supersample
    shade = np.linspace(1.06, 0.94, big)[:, None, None]  # lighter at the top, like a lit table
    background = np.clip(np.asarray(scene.background_rgb, dtype=np.float64)[None, None, :] * shade + 4 * (shade - 1), 0, 255)
    canvas = Image.fromarray(np.broadcast_to(background, (big, big, 3)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        if obj.shape == "circle":
            (cx, cy), r = obj.centre, obj.radius
            draw.ellipse([(cx - r) * supersample, (cy - r) * supersample, (cx + r) * supersample, (cy + r) * supersample], fill=obj.rgb)
        else:
            points = outline(obj) * supersample
            draw.polygon([tuple(p) for p in points.tolist()], fill=obj.rgb)
    return np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def _clip_box(box: np.ndarray, size: int, min_side: float = 4.0) -> np.ndarray:
    """Clip to the canvas and keep at least ``min_side`` pixels per side."""
    x1, y1, x2, y2 = np.clip(box, 0, size)
    if x2 - x1 < min_side:
        x1 = max(0.0, min(x1, size - min_side))
        x2 = x1 + min_side
    if y2 - y1 < min_side:
        y1 = max(0.0, min(y1, size - min_side))
        y2 = y1 + min_side
    return np.array([x1, y1, x2, y2])


def propose_regions(scene: Scene, n_regions: int, rng: np.random.Generator) -> dict:
    """Detector-like boxes for a scene: ``{"boxes": [K, 4] float32 pixels, "kind": [K] str,
    "object": [K] int}`` (object index for ``object``/``jitter`` boxes, else -1).

    One tight box per object and one whole-image box always; the rest are jittered object boxes
    (about half), pair unions (about a quarter, scenes with 2+ objects) and background crops. The
    order is shuffled, as a detector's order carries no meaning here.
    """
    n_objects = len(scene.objects)
    if n_regions < n_objects + 1:
        raise ValueError(
            f"propose_regions: expected n_regions >= objects + 1 = {n_objects + 1} (image {scene.image_id}), found {n_regions}"
        )
    size = scene.image_size
    object_boxes = np.array([o.box() for o in scene.objects], dtype=np.float64)
    boxes = [b for b in object_boxes] + [np.array([0.0, 0.0, size, size])]
    kinds = ["object"] * n_objects + ["image"]
    owners = list(range(n_objects)) + [-1]
    for _ in range(n_regions - len(boxes)):
        u = rng.random()
        if u < 0.5:
            i = min(int(rng.random() * n_objects), n_objects - 1)
            x1, y1, x2, y2 = object_boxes[i]
            w, h = x2 - x1, y2 - y1
            # shift by up to 20 % and rescale by 0.75–1.35: IoU with the object stays roughly >= 0.4
            shift = (rng.random(2) - 0.5) * 0.4 * np.array([w, h])
            scale = 0.75 + 0.6 * rng.random(2)
            cx, cy = (x1 + x2) / 2 + shift[0], (y1 + y2) / 2 + shift[1]
            box = np.array([cx - w * scale[0] / 2, cy - h * scale[1] / 2, cx + w * scale[0] / 2, cy + h * scale[1] / 2])
            boxes.append(_clip_box(box, size))
            kinds.append("jitter")
            owners.append(i)
        elif u < 0.75 and n_objects >= 2:
            i = min(int(rng.random() * n_objects), n_objects - 1)
            j = (i + 1 + min(int(rng.random() * (n_objects - 1)), n_objects - 2)) % n_objects
            pair = np.concatenate([np.minimum(object_boxes[i, :2], object_boxes[j, :2]), np.maximum(object_boxes[i, 2:], object_boxes[j, 2:])])
            boxes.append(_clip_box(pair + (rng.random(4) - 0.5) * 6, size))
            kinds.append("pair")
            owners.append(-1)
        else:
            side = size * (0.15 + 0.35 * rng.random(2))
            corner = rng.random(2) * (size - side)
            boxes.append(_clip_box(np.concatenate([corner, corner + side]), size))
            kinds.append("background")
            owners.append(-1)
    order = rng.permutation(n_regions)
    return {
        "boxes": np.asarray(boxes, dtype=np.float32)[order],
        "kind": [kinds[k] for k in order],
        "object": [int(owners[k]) for k in order],
    }
