"""The embedded data set: layout, determinism, atomic builds, hard negatives, captions, features."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit.data.embedded import PRESETS, EmbeddedPreset, build_embedded, embedded_dataset, is_complete
from itmkit.data.embedded import build as build_module
from itmkit.data.embedded.captions import scene_captions
from itmkit.data.embedded.scenes import Scene, SceneObject, relation
from itmkit.data.precomp import PrecompSplit
from itmkit.data.region_features import CNNRoIExtractor
from itmkit.data.vocab import Vocabulary

SPLITS = ("train", "dev", "test")


def colour_extractor() -> CNNRoIExtractor:
    """Mean colour of 16 px cells: a fast stand-in for the CNN that still reads the pixels."""
    return CNNRoIExtractor(torch.nn.AvgPool2d(16), input_size=224, mean=(0, 0, 0), std=(1, 1, 1), name="cell-mean")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_embedded("tiny", seed=0, out_dir=tmp_path_factory.mktemp("a") / "tiny", extractor=colour_extractor(), progress=False)


def read_scenes(root: Path) -> dict[int, dict]:
    return {s["image_id"]: s for s in json.loads((root / "scenes.json").read_text())["images"]}


# ---------------------------------------------------------------------------- layout and counts
def test_layout_counts_and_the_precomp_reader(tiny):
    preset = PRESETS["tiny"]
    meta = json.loads((tiny / "meta.json").read_text())
    scenes = read_scenes(tiny)
    seen_ids = []
    for split, n in preset.split_sizes().items():
        data = PrecompSplit.open(tiny, split)
        assert (data.n_images, data.n_captions, data.n_regions, data.feature_dim) == (n, 5 * n, 12, 3)
        assert data.boxes is not None and data.boxes.shape == (n, 12, 4)
        lines = (tiny / f"{split}_caps.txt").read_text().split("\n")
        assert lines[-1] == "" and all(line.strip() for line in lines[:-1]) and len(lines) == 5 * n + 1
        ids = [int(i) for i in (tiny / f"{split}_ids.txt").read_text().split()]
        assert len(ids) == n and all((tiny / "images" / f"{i}.png").is_file() for i in ids)
        assert all(scenes[i]["split"] == split for i in ids)
        np.testing.assert_array_equal(data.boxes, np.load(tiny / f"{split}_boxes.npy"))
        assert meta["counts"][split]["images"] == n
        seen_ids += ids
    assert len(set(seen_ids)) == len(seen_ids) == sum(preset.split_sizes().values())
    vocab = Vocabulary.from_json(tiny / "vocab.json")
    assert {"red", "circle", "left", "above", "background"} <= set(vocab.idx2word)
    assert meta["extractor"]["name"] == "cell-mean" and meta["feature_dim"] == 3 and meta["seed"] == 0
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_object_regions_are_the_scene_boxes_and_features_come_from_pixels(tiny):
    scenes = read_scenes(tiny)
    ids = [int(i) for i in (tiny / "train_ids.txt").read_text().split()]
    boxes = np.load(tiny / "train_boxes.npy")
    feats = np.load(tiny / "train_ims.npy")
    for row, image_id in enumerate(ids):
        scene = scenes[image_id]
        kinds, owners = scene["regions"]["kind"], scene["regions"]["object"]
        assert kinds.count("object") == len(scene["objects"]) and kinds.count("image") == 1
        assert len(scene["caption_objects"]) == 5
        assert all(m and set(m) <= set(range(len(scene["objects"]))) for m in scene["caption_objects"])
        assert (boxes[row, :, 2] > boxes[row, :, 0]).all() and (boxes[row, :, 3] > boxes[row, :, 1]).all()
        assert boxes.min() >= 0 and boxes.max() <= 224
        for k, (kind, owner) in enumerate(zip(kinds, owners)):
            if kind == "object":
                np.testing.assert_allclose(boxes[row, k], scene["objects"][owner]["box"], atol=0.01)
        # the whole-image region's mean colour is the rendered image's mean colour
        whole = kinds.index("image")
        from PIL import Image

        pixels = np.asarray(Image.open(tiny / "images" / f"{image_id}.png"), dtype=np.float64)
        np.testing.assert_allclose(feats[row, whole], pixels.reshape(-1, 3).mean(0), atol=1e-2)


# ---------------------------------------------------------------------------- determinism, cache
def test_same_seed_gives_identical_bytes_and_another_seed_differs(tiny, tmp_path):
    again = build_embedded("tiny", seed=0, out_dir=tmp_path / "again", extractor=colour_extractor(), progress=False)
    files = [f"{s}_{k}" for s in SPLITS for k in ("caps.txt", "ids.txt", "boxes.npy", "ims.npy")]
    files += ["scenes.json", "vocab.json", "images/0.png", "images/79.png"]
    for name in files:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    small = dataclasses.replace(PRESETS["tiny"], n_train=6, n_dev=2, n_test=2)
    build_embedded(small, seed=1, out_dir=other, extractor=colour_extractor(), progress=False)
    assert (other / "train_caps.txt").read_text().split("\n")[:30] != (tiny / "train_caps.txt").read_text().split("\n")[:30]


def test_cache_reuse_force_and_interrupted_builds(tmp_path, monkeypatch):
    small = dataclasses.replace(PRESETS["tiny"], n_train=4, n_dev=2, n_test=2)
    folder = embedded_dataset(small, seed=3, root=tmp_path, progress=False, extractor=colour_extractor())
    assert folder.parent == tmp_path and folder.name.startswith("tiny-") and folder.name.endswith("-seed3-cell-mean-12x3")
    assert is_complete(folder)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished folder must be reused, not rebuilt")

    monkeypatch.setattr(build_module, "extract_region_features", refuse)
    assert embedded_dataset(small, seed=3, root=tmp_path, progress=False, extractor=colour_extractor()) == folder
    # an interrupted (here: failing) rebuild leaves the finished folder alone and no debris
    with pytest.raises(AssertionError):
        embedded_dataset(small, seed=3, root=tmp_path, force=True, progress=False, extractor=colour_extractor())
    assert is_complete(folder)
    assert entries(tmp_path) == [folder.name]
    # and a fresh build that fails leaves nothing that looks finished
    with pytest.raises(AssertionError):
        embedded_dataset(small, seed=4, root=tmp_path, progress=False, extractor=colour_extractor())
    assert entries(tmp_path) == [folder.name]


def entries(root: Path) -> list[str]:
    """Folder contents apart from the (empty, persistent) build-lock files."""
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_concurrent_requests_build_once(tmp_path, monkeypatch):
    # two workers ask for the same set at once: the lock makes the second wait and reuse it
    import threading
    import time

    calls = []

    def slow_build(preset, seed, out_dir, **kwargs):
        calls.append(out_dir)
        time.sleep(0.3)
        out_dir.mkdir()
        (out_dir / "meta.json").write_text(json.dumps({"generator_version": build_module.GENERATOR_VERSION}))
        return out_dir

    monkeypatch.setattr(build_module, "build_embedded", slow_build)
    results = []
    workers = [
        threading.Thread(target=lambda: results.append(
            embedded_dataset("tiny", seed=5, root=tmp_path, progress=False, extractor=colour_extractor())))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1] == calls[0]
    assert is_complete(results[0])


def test_a_foreign_folder_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="expected a missing, empty or embedded-data folder"):
        build_embedded("tiny", out_dir=tmp_path, extractor=colour_extractor(), force=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_presets_validate_and_name_custom_variants():
    with pytest.raises(ValueError, match="n_regions >= max_objects \\+ 1 = 5, found 4"):
        build_module.resolve_preset(EmbeddedPreset("bad", 4, 2, 2, n_regions=4))
    with pytest.raises(ValueError, match="expected a preset in \\['course', 'tiny'\\]"):
        build_module.resolve_preset("huge")
    assert build_module.folder_name(PRESETS["tiny"], 0, "x", 1360) == "tiny-seed0-x-12x1360"
    custom = dataclasses.replace(PRESETS["tiny"], n_regions=36)
    assert re.fullmatch(r"tiny-[0-9a-f]{8}-seed0-x-36x2048", build_module.folder_name(custom, 0, "x", 2048))


# ---------------------------------------------------------------------------- hard negatives
SWAPPED_FIELDS = {"colour": ("colour", "rgb"), "relation": ("centre",), "size": ("size", "radius")}


def test_hard_negative_partners_differ_only_by_the_swap(tiny):
    scenes = read_scenes(tiny)
    paired = [s for s in scenes.values() if s["partner"] is not None]
    assert len(paired) >= 0.3 * len(scenes)
    kinds = set()
    for scene in paired:
        other = scenes[scene["partner"]]
        assert other["partner"] == scene["image_id"] and other["split"] == scene["split"]
        assert other["swap"] == scene["swap"] and other["caption_seed"] == scene["caption_seed"]
        assert other["background"] == scene["background"]
        kind, (i, j) = scene["swap"]["kind"], scene["swap"]["objects"]
        kinds.add(kind)
        fields = SWAPPED_FIELDS[kind]
        for k, (mine, theirs) in enumerate(zip(scene["objects"], other["objects"])):
            for key in mine:
                if key == "box" or (k in (i, j) and key in fields):
                    continue
                assert mine[key] == theirs[key], (scene["image_id"], k, key)
        for key in fields:
            assert scene["objects"][i][key] == other["objects"][j][key] and scene["objects"][j][key] == other["objects"][i][key]
            assert scene["objects"][i][key] != scene["objects"][j][key]
        if kind == "colour":
            assert scene["objects"][i]["shape"] != scene["objects"][j]["shape"]
        captions = set((tiny / f"{scene['split']}_caps.txt").read_text().split("\n"))
        assert captions  # the two images of a pair never share all five captions:
        assert caption_block(tiny, scene) != caption_block(tiny, other)
    assert kinds >= {"colour", "relation"}


def caption_block(root: Path, scene: dict) -> list[str]:
    ids = [int(i) for i in (root / f"{scene['split']}_ids.txt").read_text().split()]
    row = ids.index(scene["image_id"])
    return (root / f"{scene['split']}_caps.txt").read_text().split("\n")[5 * row : 5 * row + 5]


def test_colour_swapped_partners_get_the_same_sentences_with_the_colours_exchanged(tiny):
    scenes = read_scenes(tiny)
    checked = 0
    for scene in scenes.values():
        if scene["partner"] is None or scene["swap"]["kind"] != "colour" or scene["image_id"] > scene["partner"]:
            continue
        i, j = scene["swap"]["objects"]
        a, b = scene["objects"][i]["colour"], scene["objects"][j]["colour"]
        exchanged = [
            re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(1) == a else a, c, flags=re.IGNORECASE)
            for c in caption_block(tiny, scene)
        ]
        partner = caption_block(tiny, scenes[scene["partner"]])

        def article_free(texts):
            return [re.sub(r"\b(an?)\b", "a", t, flags=re.IGNORECASE) for t in texts]

        assert article_free(exchanged) == article_free(partner)
        checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------- captions parse back
# The test's own reading of the grammar, kept apart from the generator's tables.
SHAPE_OF = {"circle": "circle", "disc": "circle", "square": "square", "box": "square", "triangle": "triangle",
            "star": "star", "diamond": "diamond", "rhombus": "diamond", "hexagon": "hexagon", "cross": "cross"}  # fmt: skip
PLURAL_OF = {"circles": "circle", "discs": "circle", "squares": "square", "boxes": "square", "triangles": "triangle",
             "stars": "star", "diamonds": "diamond", "rhombuses": "diamond", "hexagons": "hexagon", "crosses": "cross"}  # fmt: skip
SIZE_OF = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
COLOUR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange", "pink", "brown"}
BACKGROUND_OF = {"white": "white", "grey": "grey", "gray": "grey", "black": "black", "dark": "black"}
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = [("to the left of", "left"), ("on the left of", "left"), ("left of", "left"), ("to the right of", "right"),
             ("on the right of", "right"), ("right of", "right"), ("above", "above"), ("over", "above"),
             ("below", "below"), ("under", "below"), ("beneath", "below"), ("next to", "next"), ("beside", "next")]  # fmt: skip


def words_of(caption: str) -> list[str]:
    text = caption.lower().replace("plus signs", "crosses").replace("plus sign", "cross")
    return re.sub(r"[.,:\-]", " ", text).split()


def noun_phrase_at(tokens: list[str], end: int) -> dict:
    """Attributes of the noun phrase whose shape word is ``tokens[end]``."""
    spec = {"shape": SHAPE_OF[tokens[end]]}
    k = end - 1
    while k >= 0 and (tokens[k] in COLOUR_WORDS or tokens[k] in SIZE_OF):
        if tokens[k] in COLOUR_WORDS:
            spec["colour"] = tokens[k]
        else:
            spec["size"] = SIZE_OF[tokens[k]]
        k -= 1
    return spec


def matches(obj: dict, spec: dict) -> bool:
    return all(obj[key] == value for key, value in spec.items())


def holds(a: dict, b: dict, rel: str) -> bool:
    """A looser reading than the generator's: the dominant axis and its sign."""
    dx, dy = b["centre"][0] - a["centre"][0], b["centre"][1] - a["centre"][1]
    return {"left": dx > abs(dy), "right": -dx > abs(dy), "above": dy > abs(dx), "below": -dy > abs(dx), "next": abs(dx) > abs(dy)}[rel]


def in_place(obj: dict, words: list[str], size: int) -> bool:
    """"at the top left" -> first row and column of thirds; "at the top" -> first row (any column)."""
    column, row = int(3 * obj["centre"][0] / size), int(3 * obj["centre"][1] / size)
    wanted = {"top": ("row", 0), "bottom": ("row", 2), "left": ("column", 0), "right": ("column", 2)}
    if words[0] in ("middle", "centre"):
        return (row, column) == (1, 1)
    got = {"row": row, "column": column}
    return all(got[wanted[w][0]] == wanted[w][1] for w in words)


def check_caption(caption: str, scene: dict) -> int:
    """Assert every claim the caption makes about the scene; returns how many claims were checked."""
    objects, size = scene["objects"], scene["image_size"]
    tokens = words_of(caption)
    claims = 0
    shape_ends = [k for k, t in enumerate(tokens) if t in SHAPE_OF]
    assert shape_ends or set(tokens) & set(PLURAL_OF), f"caption names no object: {caption!r}"
    for end in shape_ends:
        spec = noun_phrase_at(tokens, end)
        assert any(matches(o, spec) for o in objects), f"{caption!r}: no object {spec} in {objects}"
        claims += 1
        rest = tokens[end + 1 :]
        rest = rest[1:] if rest[:1] == ["is"] else rest
        joined = " ".join(rest) + " "
        place = None
        for phrase, rel in RELATIONS:
            if joined.startswith(phrase + " "):
                after = rest[len(phrase.split()) :]
                second = next(k for k, t in enumerate(after) if t in SHAPE_OF)
                spec_b = noun_phrase_at(after, second)
                assert any(
                    holds(a, b, rel) for a in objects for b in objects if a is not b and matches(a, spec) and matches(b, spec_b)
                ), f"{caption!r}: relation {rel} does not hold"
                claims += 1
                break
        else:
            place = re.match(r"(in|at|on) the (top|bottom|middle|centre|left|right)( (left|right))?( |$)", joined)
        if place:
            words = [w for w in (place.group(2), place.group(4)) if w]
            assert any(in_place(o, words, size) for o in objects if matches(o, spec)), f"{caption!r}: {spec} not at {words}"
            claims += 1
    for k, token in enumerate(tokens[:-1]):
        following = tokens[k + 1]
        if token in NUMBERS and following in ("shapes", "objects"):
            assert NUMBERS[token] == len(objects), caption
            claims += 1
        elif token in NUMBERS and following in PLURAL_OF:
            assert NUMBERS[token] == sum(o["shape"] == PLURAL_OF[following] for o in objects), caption
            claims += 1
        if following in ("background", "backdrop") and token in BACKGROUND_OF:
            assert BACKGROUND_OF[token] == scene["background"], caption
            claims += 1
    return claims


def test_every_caption_is_true_of_its_scene(tiny):
    scenes = read_scenes(tiny)
    claims = 0
    relation_captions = 0
    for split in SPLITS:
        ids = [int(i) for i in (tiny / f"{split}_ids.txt").read_text().split()]
        captions = (tiny / f"{split}_caps.txt").read_text().split("\n")
        for row, image_id in enumerate(ids):
            block = captions[5 * row : 5 * row + 5]
            assert len(set(c.lower().rstrip(".") for c in block)) == 5  # five different captions
            for caption in block:
                claims += check_caption(caption, scenes[image_id])
                relation_captions += any(f" {p} " in f" {caption.lower()} " for p, _ in RELATIONS)
    assert claims > 5 * 80 * 2 and relation_captions > 80


def test_every_paired_image_has_a_caption_that_is_false_for_its_partner(tiny):
    """The hard negative is hard but decidable: some caption tells the two pictures apart."""
    scenes = read_scenes(tiny)
    paired = [s for s in scenes.values() if s["partner"] is not None]
    for scene in paired:
        partner = scenes[scene["partner"]]
        false_for_partner = 0
        for caption in caption_block(tiny, scene):
            check_caption(caption, scene)
            try:
                check_caption(caption, partner)
            except AssertionError:
                false_for_partner += 1
        assert false_for_partner >= 1, (scene["image_id"], scene["swap"], caption_block(tiny, scene))


def test_caption_variety_and_seeded_determinism(tiny):
    captions = (tiny / "train_caps.txt").read_text().split("\n")[:-1]
    assert len(set(captions)) > 0.95 * len(captions)
    text = " ".join(captions).lower()
    for word in ("left", "above", "two", "background", "corner", "little", "big", "disc", "box"):
        assert re.search(rf"\b{word}\b", text), word
    assert any(c[0].isupper() and c.endswith(".") for c in captions) and any(c[0].islower() for c in captions)
    scene = Scene(0, "train", 100, "grey", (150, 150, 150), [
        SceneObject("circle", "red", "small", (20.0, 50.0), 8.0, 0.0, (214, 39, 40)),
        SceneObject("square", "blue", "large", (75.0, 52.0), 12.0, 0.0, (31, 90, 220)),
    ], caption_seed=5)  # fmt: skip
    assert relation(scene.objects[0], scene.objects[1], 100) == "left"
    assert relation(scene.objects[1], scene.objects[0], 100) == "right"
    first = scene_captions(scene)
    assert first == scene_captions(scene) and len(first[0]) == 5
    for caption in first[0]:
        check_caption(caption, dataclasses.asdict(scene))
    assert scene_captions(dataclasses.replace(scene, caption_seed=6))[0] != first[0]


# ---------------------------------------------------------------------------- the real CNN
@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory) -> Path:
    """The tiny preset exactly as the course builds it (EfficientNet-Lite0 features)."""
    return embedded_dataset("tiny", seed=0, root=tmp_path_factory.mktemp("cnn"), progress=False)


def object_features(root: Path, splits) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    scenes = read_scenes(root)
    feats, labels = [], {"colour": [], "shape": [], "size": []}
    for split in splits:
        ids = [int(i) for i in (root / f"{split}_ids.txt").read_text().split()]
        ims = np.load(root / f"{split}_ims.npy")
        for row, image_id in enumerate(ids):
            scene = scenes[image_id]
            for k, (kind, owner) in enumerate(zip(scene["regions"]["kind"], scene["regions"]["object"])):
                if kind == "object":
                    feats.append(ims[row, k])
                    for key in labels:
                        labels[key].append(scene["objects"][owner][key])
    return np.array(feats), {k: np.array(v) for k, v in labels.items()}


def test_cnn_region_features_carry_colour_shape_and_size(tiny_cnn):
    """Nearest-centroid (cosine) probe: centroids from train objects, accuracy on dev + test."""
    meta = json.loads((tiny_cnn / "meta.json").read_text())
    assert meta["feature_dim"] == 1360 and meta["extractor"]["name"] == "efficientnet-lite0-224px-avg"
    x_train, y_train = object_features(tiny_cnn, ["train"])
    x_test, y_test = object_features(tiny_cnn, ["dev", "test"])

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    # measured on seed 0: colour 0.70 (chance 0.12), shape 0.99 (0.14), size 0.88 (0.5)
    for attribute, floor in {"colour": 0.45, "shape": 0.7, "size": 0.7}.items():
        labels = sorted(set(y_train[attribute]))
        centroids = unit(np.stack([unit(x_train[y_train[attribute] == lab]).mean(0) for lab in labels]))
        predicted = np.array(labels)[np.argmax(unit(x_test) @ centroids.T, axis=1)]
        accuracy = float(np.mean(predicted == y_test[attribute]))
        chance = 1 / len(labels)
        assert accuracy >= floor, f"{attribute}: accuracy {accuracy:.2f}, chance {chance:.2f}"


def test_36_regions_of_2048_dims_work(tmp_path):
    preset = EmbeddedPreset("mini", n_train=4, n_dev=2, n_test=2, n_regions=36, feature_dim=2048)
    folder = embedded_dataset(preset, seed=0, root=tmp_path, progress=False)
    assert folder.name.endswith("-proj0-36x2048")
    data = PrecompSplit.open(folder, "train")
    assert (data.n_images, data.n_regions, data.feature_dim) == (4, 36, 2048)
    assert np.isfinite(np.asarray(data.images)).all()
