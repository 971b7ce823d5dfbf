"""Five human-like captions per scene from a small grammar (pure Python, seeded).

Sentence frames: a relation between two objects, a count and a list, every object, one or two
objects only (partial descriptions), counts per shape, and absolute places ("in the top left
corner"). Noun phrases drop size or colour now and then, and shapes, sizes, relations and
backgrounds have synonyms, so the same scene is told five different ways.

Every random choice takes exactly one ``rng.random()`` draw and no choice depends on an object's
colour, so a colour-swapped hard negative (same ``caption_seed``) gets the same sentences with the
two colour words exchanged: the partner's captions differ from the original's exactly by the swap.
"""

from __future__ import annotations

import numpy as np

from itmkit.data.embedded.scenes import Scene, SceneObject, is_next_to, relation

SHAPE_WORDS = {
    "circle": ("circle", "disc", "circle"),
    "square": ("square", "box", "square"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus", "diamond"),
    "hexagon": ("hexagon",),
    "cross": ("cross", "plus sign"),
}
PLURAL = {"circle": "circles", "disc": "discs", "square": "squares", "box": "boxes", "triangle": "triangles",
          "star": "stars", "diamond": "diamonds", "rhombus": "rhombuses", "hexagon": "hexagons",
          "cross": "crosses", "plus sign": "plus signs"}  # fmt: skip
SIZE_WORDS = {"small": ("small", "little", "small", "tiny"), "large": ("large", "big", "large")}
RELATION_PHRASES = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "above"),
    "below": ("below", "under", "beneath"),
    "next": ("next to", "beside"),
}
BACKGROUND_WORDS = {"white": ("white",), "grey": ("grey", "gray"), "black": ("black", "dark")}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# (row, column) of a clear absolute place -> phrases
PLACE_PHRASES = {
    ("top", "left"): ("in the top left corner", "at the top left"),
    ("top", "centre"): ("at the top", "at the top of the picture"),
    ("top", "right"): ("in the top right corner", "at the top right"),
    ("middle", "left"): ("on the left", "on the left side"),
    ("middle", "centre"): ("in the middle", "in the centre"),
    ("middle", "right"): ("on the right", "on the right side"),
    ("bottom", "left"): ("in the bottom left corner", "at the bottom left"),
    ("bottom", "centre"): ("at the bottom", "at the bottom of the picture"),
    ("bottom", "right"): ("in the bottom right corner", "at the bottom right"),
}
PLACE_MARGIN = 0.05  # a centre this close (fraction of the side) to a third's border has no clear place


def pick(rng: np.random.Generator, options):
    """One element, always consuming exactly one draw."""
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


def with_article(words: list[str], article: str) -> list[str]:
    """Prefix ``a``/``an``/``the`` (``a`` becomes ``an`` before a vowel)."""
    if article == "a" and words and words[0][0] in "aeiou":
        article = "an"
    return [article] + words if article else words


def noun_phrase(obj: SceneObject, rng: np.random.Generator, p_size: float, p_colour: float, article: str = "a") -> str:
    """``a small red circle``; size and colour are each kept with their probability (4 draws)."""
    keep_size = rng.random() < p_size
    keep_colour = rng.random() < p_colour
    shape = pick(rng, SHAPE_WORDS[obj.shape])
    size = pick(rng, SIZE_WORDS[obj.size])
    words = ([size] if keep_size else []) + ([obj.colour] if keep_colour else []) + [shape]
    return " ".join(with_article(words, article))


def place(obj: SceneObject, image_size: int) -> tuple[str, str] | None:
    """(row, column) third of the image holding the object's centre, None near a border."""
    x, y = (c / image_size for c in obj.centre)

    def third(v: float, names: tuple[str, str, str]) -> str | None:
        if min(abs(v - 1 / 3), abs(v - 2 / 3)) < PLACE_MARGIN:
            return None
        return names[0] if v < 1 / 3 else names[1] if v < 2 / 3 else names[2]

    row, col = third(y, ("top", "middle", "bottom")), third(x, ("left", "centre", "right"))
    return None if row is None or col is None else (row, col)


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def background_phrase(scene: Scene, rng: np.random.Generator) -> str:
    bg = pick(rng, BACKGROUND_WORDS[scene.background])
    frame = pick(rng, ("on a {} background", "against a {} backdrop", "on a {} background"))
    return frame.format(bg)


def relation_phrase(scene: Scene, a: int, b: int, rng: np.random.Generator, allow_next: bool = True) -> str:
    """The phrase for object ``a``'s relation to ``b`` (the pair must have one); 2 draws.
    ``allow_next=False`` keeps the direction (``next to`` is true of both orders)."""
    rel = relation(scene.objects[a], scene.objects[b], scene.image_size)
    use_next = rng.random() < 0.25 and allow_next and is_next_to(scene.objects[a], scene.objects[b], scene.image_size)
    phrase = pick(rng, RELATION_PHRASES["next" if use_next else rel])
    return phrase


def related_pairs(scene: Scene, order: list[int]) -> list[tuple[int, int]]:
    """Ordered pairs (a, b) in ``order`` with a clear relation."""
    return [(a, b) for a in order for b in order if a != b and relation(scene.objects[a], scene.objects[b], scene.image_size)]


def frame_relation(scene: Scene, rng: np.random.Generator, order: list[int], pair=None):
    pairs = [pair] if pair is not None else related_pairs(scene, order)
    if not pairs:
        return None
    a, b = pick(rng, pairs)
    np_a = noun_phrase(scene.objects[a], rng, 0.5, 0.9, article="")
    np_b = noun_phrase(scene.objects[b], rng, 0.5, 0.9, article="")
    rel = relation_phrase(scene, a, b, rng)
    variant = pick(rng, ("{A} {R} {B}", "the {a} is {R} the {b}", "there is {A} {R} {B}", "a picture of {A} {R} {B}", "{A} {R} {B}"))
    text = variant.format(
        A=" ".join(with_article(np_a.split(), "a")), B=" ".join(with_article(np_b.split(), "a")), a=np_a, b=np_b, R=rel
    )
    if rng.random() < 0.3:
        text += " " + background_phrase(scene, rng)
    return text, [a, b]


def frame_count_list(scene: Scene, rng: np.random.Generator, order: list[int], pair=None):
    n = len(scene.objects)
    opener = pick(rng, ("{n} shapes {bg}:", "{n} objects {bg}:", "{n} shapes {bg} -"))
    opener = opener.format(n=COUNT_WORDS[n], bg=background_phrase(scene, rng))
    pairs = related_pairs(scene, order[:2])
    phrases = [noun_phrase(scene.objects[i], rng, 0.5, 0.9) for i in order]
    if pairs and pairs[0] == (order[0], order[1]):
        head = f"{phrases[0]} {relation_phrase(scene, order[0], order[1], rng)} {phrases[1]}"
        text = f"{opener} {join_list([head] + phrases[2:])}"
    else:
        text = f"{opener} {join_list(phrases)}"
    return text, list(order)


def frame_all(scene: Scene, rng: np.random.Generator, order: list[int], pair=None):
    prefix = pick(rng, ("", "an image of ", "a picture showing ", "a drawing with ", "a simple drawing of "))
    phrases = [noun_phrase(scene.objects[i], rng, 0.6, 0.95) for i in order]
    text = prefix + join_list(phrases)
    if rng.random() < 0.4:
        text += " " + background_phrase(scene, rng)
    return text, list(order)


def frame_partial(scene: Scene, rng: np.random.Generator, order: list[int], pair=None):
    first = noun_phrase(scene.objects[order[0]], rng, 0.4, 0.8)
    second = noun_phrase(scene.objects[order[1]], rng, 0.4, 0.8)
    variant = pick(rng, ("there is {x} in the picture", "{x} and some other shapes", "{x} and {y}", "{x} among other shapes", "{x} {bg}"))
    bg = background_phrase(scene, rng)
    text = variant.format(x=first, y=second, bg=bg)
    return text, [order[0], order[1]] if "{y}" in variant else [order[0]]


def frame_count_shapes(scene: Scene, rng: np.random.Generator, order: list[int], pair=None):
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(scene.objects[i].shape, []).append(i)
    if len(groups) == len(order):
        return None  # all shapes differ: nothing to count
    items = []
    for shape, members in groups.items():
        word = pick(rng, SHAPE_WORDS[shape])
        if len(members) == 1:
            items.append(noun_phrase(scene.objects[members[0]], rng, 0.3, 0.6))
        else:
            items.append(f"{COUNT_WORDS[len(members)]} {PLURAL[word]}")
    text = join_list(items)
    if rng.random() < 0.5:
        text += " " + background_phrase(scene, rng)
    return text, list(order)


def frame_place(scene: Scene, rng: np.random.Generator, order: list[int], pair=None):
    placed = [i for i in order if place(scene.objects[i], scene.image_size) is not None]
    if not placed:
        return None
    parts = []
    for i in placed[:2]:
        phrase = pick(rng, PLACE_PHRASES[place(scene.objects[i], scene.image_size)])
        parts.append(f"{noun_phrase(scene.objects[i], rng, 0.4, 0.9)} {phrase}")
    keep_two = len(parts) == 2 and rng.random() < 0.5
    return (join_list(parts) if keep_two else parts[0]), placed[: 2 if keep_two else 1]


def frame_focus(scene: Scene, rng: np.random.Generator, order: list[int], pair):
    """Both objects of the hard-negative swap, with every attribute stated (and, for a place swap,
    their relation: the one thing that tells the two pictures apart)."""
    a, b = pair
    place_swap = scene.swap is not None and scene.swap["kind"] == "relation"
    related = relation(scene.objects[a], scene.objects[b], scene.image_size) is not None
    if related and (rng.random() < 0.7 or place_swap):
        np_a = noun_phrase(scene.objects[a], rng, 1.0, 1.0)
        np_b = noun_phrase(scene.objects[b], rng, 1.0, 1.0)
        # a place swap is told apart only by the direction, so never "next to" here
        return f"{np_a} {relation_phrase(scene, a, b, rng, allow_next=False)} {np_b}", [a, b]
    np_a = noun_phrase(scene.objects[a], rng, 1.0, 1.0)
    np_b = noun_phrase(scene.objects[b], rng, 1.0, 1.0)
    return f"{np_a} and {np_b}", [a, b]


FRAMES = (
    (frame_relation, 3.0),
    (frame_count_list, 1.5),
    (frame_all, 1.5),
    (frame_partial, 1.0),
    (frame_count_shapes, 1.0),
    (frame_place, 1.5),
)


def finish(text: str, rng: np.random.Generator) -> str:
    """Human-caption surface: about a third start with a capital and end with a full stop."""
    if rng.random() < 0.35:
        return text[0].upper() + text[1:] + "."
    return text


def focus_caption_slot(rng: np.random.Generator, n_captions: int = 5) -> int:
    """The position of the caption that states both swapped objects of a hard-negative pair.

    It is the first draw of the scene's caption generator, so
    ``focus_caption_slot(np.random.default_rng(scene.caption_seed))`` finds it again from
    ``scenes.json`` without rebuilding anything (the fine-grained diagnostics use that).
    """
    return int(rng.random() * n_captions)


def scene_captions(scene: Scene, n_captions: int = 5) -> tuple[list[str], list[list[int]]]:
    """``n_captions`` distinct captions of ``scene`` and, for each, the objects it mentions.

    Draws only from ``np.random.default_rng(scene.caption_seed)``. With a hard-negative ``swap``,
    one caption (at a random position) states both swapped objects in full.
    """
    rng = np.random.default_rng(scene.caption_seed)
    frames, base_weights = zip(*FRAMES)
    weights = np.array(base_weights, dtype=np.float64)
    captions: list[str] = []
    mentions: list[list[int]] = []
    focus_slot = focus_caption_slot(rng, n_captions) if scene.swap else -1
    attempts = 0
    while len(captions) < n_captions:
        attempts += 1
        if attempts > 200:
            raise RuntimeError(f"scene {scene.image_id}: could not write {n_captions} distinct captions")
        order = [int(i) for i in np.argsort(rng.random(len(scene.objects)), kind="stable")]
        if len(captions) == focus_slot:
            made = frame_focus(scene, rng, order, tuple(scene.swap["objects"]))
        else:
            cumulative = np.cumsum(weights) / weights.sum()
            chosen = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(frames) - 1)
            made = frames[chosen](scene, rng, order)
            # a used frame becomes rarer: five captions should read like five different people
            weights[chosen] *= 0.2
        if made is None:
            continue
        text = finish(made[0], rng)
        if text.lower().rstrip(".") in {c.lower().rstrip(".") for c in captions}:
            continue
        captions.append(text)
        mentions.append(sorted(set(made[1])))
    return captions, mentions
