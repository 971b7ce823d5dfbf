"""Scene graphs of the embedded data set: objects with attributes and places, plus hard negatives.

A scene is 2–4 flat shapes on a plain background. Each object has a shape, a colour (unique within
its scene, so a colour names one object), a size (small / large), a centre and a rotation. Spatial
relations are derived from the centres (:func:`relation`). Hard-negative partners
(:func:`make_partner`) keep every object and change one thing: two objects swap colours, swap
places, or swap sizes, so only attribute binding or word-to-region alignment can tell the pair
apart (bag-of-words cannot for colour and place swaps).
All randomness comes from the ``np.random.Generator`` passed in; geometry is in pixels of a square
``image_size`` canvas.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 205, 30),
    "purple": (130, 60, 180),
    "orange": (245, 130, 20),
    "pink": (240, 120, 190),
    "brown": (140, 86, 45),
}
BACKGROUNDS = {"white": (242, 242, 238), "grey": (150, 150, 150), "black": (24, 24, 28)}
SIZES = {"small": 0.075, "large": 0.13}  # radius as a fraction of the image side
# a relation is stated only when one axis dominates by this factor, so "left of" is never a
# judgement call on a diagonal
RELATION_DOMINANCE = 1.6
NEXT_TO_GAP = 0.12  # boxes closer than this fraction of the side also count as "next to"
SWAP_KINDS = ("colour", "relation", "size")


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``centre`` (x, y) and ``radius`` in pixels; ``rgb`` is the rendered shade."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float
    rotation: float  # degrees; circles ignore it
    rgb: tuple[int, int, int]

    def box(self) -> tuple[float, float, float, float]:
        """Tight pixel box (x1, y1, x2, y2) of the drawn outline."""
        points = outline(self)
        return (float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max()))


@dataclass
class Scene:
    """One image's scene graph. ``partner``: image id of its hard negative (or None);
    ``swap``: ``{"kind": "colour" | "relation" | "size", "objects": [i, j]}`` describing how the
    partner differs (stored on both images of a pair); ``caption_seed`` is shared by a pair, so
    both get captions from the same sentence choices."""

    image_id: int
    split: str
    image_size: int
    background: str
    background_rgb: tuple[int, int, int]
    objects: list[SceneObject]
    caption_seed: int
    partner: int | None = None
    swap: dict | None = None
    regions: dict = field(default_factory=dict)  # {"kind": [K] str, "object": [K] int}
    caption_objects: list = field(default_factory=list)  # per caption, the objects it mentions

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        for obj, source in zip(record["objects"], self.objects):
            obj["box"] = [round(v, 2) for v in source.box()]
        return record


def outline(obj: SceneObject, samples: int = 48) -> np.ndarray:
    """Polygon vertices ``[P, 2]`` (pixels) of an object's shape, rotated and placed.

    Every shape is inscribed in a circle of ``radius``; a circle is returned as a ``samples``-gon
    (used only for its box; the renderer draws a true ellipse).
    """
    r = obj.radius
    if obj.shape == "circle":
        angles = np.linspace(0, 2 * np.pi, samples, endpoint=False)
        unit = np.stack([np.cos(angles), np.sin(angles)], 1)
        return unit * r + np.asarray(obj.centre)
    if obj.shape == "square":
        s = r / math.sqrt(2) * 1.15  # a little larger than inscribed so squares look as big as circles
        unit = np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    elif obj.shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        unit = np.stack([np.cos(angles), np.sin(angles)], 1) * r
        unit[:, 1] += r * 0.2  # the centroid sits low; shift so the triangle fills its circle
    elif obj.shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        unit = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
    elif obj.shape == "diamond":
        unit = np.array([[0, -r], [0.65 * r, 0], [0, r], [-0.65 * r, 0]])
    elif obj.shape == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60)
        unit = np.stack([np.cos(angles), np.sin(angles)], 1) * r
    elif obj.shape == "cross":
        a, b = 0.32 * r, 0.9 * r
        unit = np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])
    else:
        raise ValueError(f"scene object: expected a shape in {SHAPES}, found {obj.shape!r}")
    theta = math.radians(obj.rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return unit @ rot.T + np.asarray(obj.centre)


def relation(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """The spatial relation of ``a`` to ``b``: ``"left"``, ``"right"``, ``"above"``, ``"below"``,
    or None when neither axis dominates (diagonal pairs are never described)."""
    dx = b.centre[0] - a.centre[0]
    dy = b.centre[1] - a.centre[1]
    if abs(dx) >= RELATION_DOMINANCE * abs(dy) and abs(dx) > 0.05 * image_size:
        return "left" if dx > 0 else "right"
    if abs(dy) >= RELATION_DOMINANCE * abs(dx) and abs(dy) > 0.05 * image_size:
        return "above" if dy > 0 else "below"
    return None


def is_next_to(a: SceneObject, b: SceneObject, image_size: int) -> bool:
    """Side by side: a horizontal relation and a small gap between the two boxes."""
    if relation(a, b, image_size) not in ("left", "right"):
        return False
    ax1, _, ax2, _ = a.box()
    bx1, _, bx2, _ = b.box()
    gap = max(bx1 - ax2, ax1 - bx2)
    return gap < NEXT_TO_GAP * image_size


def layout_is_valid(objects: list[SceneObject], image_size: int, margin: float = 3.0) -> bool:
    """Objects inside the canvas and their boxes at least ``margin`` pixels apart."""
    boxes = np.array([o.box() for o in objects])
    if (boxes[:, :2] < margin).any() or (boxes[:, 2:] > image_size - margin).any():
        return False
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            if a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin:
                return False
    return True


def _shade(base: tuple[int, int, int], rng: np.random.Generator, spread: int = 14) -> tuple[int, int, int]:
    """A nearby shade of a colour, so a colour is a region of RGB space and not one exact value."""
    jitter = np.floor(rng.random(3) * (2 * spread + 1)).astype(int) - spread
    return tuple(int(v) for v in np.clip(np.asarray(base) + jitter, 0, 255))


def _pick(rng: np.random.Generator, options):
    """One element, always consuming exactly one draw (``rng.integers`` may consume more)."""
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


def random_scene(
    rng: np.random.Generator, image_id: int, split: str, image_size: int, min_objects: int = 2, max_objects: int = 4
) -> Scene:
    """Draw a scene: background, ``min_objects``..``max_objects`` objects with unique colours,
    non-overlapping places (rejection sampling, restarted when the canvas is too full)."""
    while True:
        n = min_objects + min(int(rng.random() * (max_objects - min_objects + 1)), max_objects - min_objects)
        background = _pick(rng, list(BACKGROUNDS))
        colours = [str(c) for c in rng.permutation(list(COLOURS))[:n]]
        objects: list[SceneObject] = []
        for colour in colours:
            size = _pick(rng, list(SIZES))
            radius = SIZES[size] * image_size * (0.9 + 0.2 * rng.random())
            shape = _pick(rng, SHAPES)
            rotation = float(rng.random() * 30 - 15)
            rgb = _shade(COLOURS[colour], rng)
            for _ in range(60):
                lo, hi = radius + 4, image_size - radius - 4
                centre = (float(lo + rng.random() * (hi - lo)), float(lo + rng.random() * (hi - lo)))
                candidate = SceneObject(shape, colour, size, centre, float(radius), rotation, rgb)
                if layout_is_valid(objects + [candidate], image_size):
                    objects.append(candidate)
                    break
            else:
                break  # no room: draw the whole scene again
        if len(objects) == n:
            return Scene(
                image_id=image_id,
                split=split,
                image_size=image_size,
                background=background,
                background_rgb=BACKGROUNDS[background],
                objects=objects,
                caption_seed=int(rng.integers(0, 2**62)),
            )


def swap_candidates(scene: Scene, kind: str) -> list[tuple[int, int]]:
    """Object pairs whose ``kind`` swap gives a valid, different scene.

    colour: different shapes (same-shape colour swaps are place swaps in disguise); relation: an
    unambiguous relation between them; size: different sizes and shapes. Swaps that would make
    objects overlap or leave the canvas are excluded.
    """
    pairs = []
    objs = scene.objects
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            if kind == "colour" and a.shape == b.shape:
                continue
            if kind == "relation" and relation(a, b, scene.image_size) is None:
                continue
            if kind == "size" and (a.size == b.size or a.shape == b.shape):
                continue
            if layout_is_valid(_swapped_objects(objs, kind, i, j), scene.image_size):
                pairs.append((i, j))
    return pairs


def _swapped_objects(objects: list[SceneObject], kind: str, i: int, j: int) -> list[SceneObject]:
    a, b = objects[i], objects[j]
    if kind == "colour":
        new_a = dataclasses.replace(a, colour=b.colour, rgb=b.rgb)
        new_b = dataclasses.replace(b, colour=a.colour, rgb=a.rgb)
    elif kind == "relation":
        new_a = dataclasses.replace(a, centre=b.centre)
        new_b = dataclasses.replace(b, centre=a.centre)
    elif kind == "size":
        new_a = dataclasses.replace(a, size=b.size, radius=b.radius)
        new_b = dataclasses.replace(b, size=a.size, radius=a.radius)
    else:
        raise ValueError(f"hard negative: expected a swap kind in {SWAP_KINDS}, found {kind!r}")
    out = list(objects)
    out[i], out[j] = new_a, new_b
    return out


def make_partner(
    scene: Scene, rng: np.random.Generator, partner_id: int, kind_weights: dict[str, float] | None = None
) -> Scene | None:
    """The hard negative of ``scene``: the same objects with one swap between two of them.

    The swap kind is drawn with ``kind_weights`` among the kinds that have a valid pair (None when
    no kind has one). Both scenes are linked (``partner``, ``swap``) and share ``caption_seed``.
    """
    kind_weights = kind_weights or {"colour": 0.45, "relation": 0.4, "size": 0.15}
    options = {kind: swap_candidates(scene, kind) for kind in SWAP_KINDS}
    kinds = [k for k in SWAP_KINDS if options[k] and kind_weights.get(k, 0) > 0]
    if not kinds:
        return None
    weights = np.array([kind_weights[k] for k in kinds], dtype=float)
    u = rng.random() * weights.sum()
    kind = kinds[min(int(np.searchsorted(np.cumsum(weights), u, side="right")), len(kinds) - 1)]
    i, j = _pick(rng, options[kind])
    swap = {"kind": kind, "objects": [i, j]}
    scene.partner = partner_id
    scene.swap = swap
    return dataclasses.replace(
        scene,
        image_id=partner_id,
        objects=_swapped_objects(scene.objects, kind, i, j),
        partner=scene.image_id,
        swap=dict(swap),
        regions={},
        caption_objects=[],
    )
