"""Fine-grained hard-negative diagnostics: hand-made matrices and the real tiny embedded set."""

import json

import numpy as np
import pandas as pd
import pytest

from itmkit.data.embedded import embedded_dataset
from itmkit.data.embedded.scenes import COLOURS
from itmkit.data.precomp import PrecompSplit
from itmkit.evaluate.hard_negatives import (
    CHANCE,
    bag_of_words_similarity,
    swap_pairs,
    swap_scores,
    swap_table,
)


def _pairs(rows):
    return pd.DataFrame(rows, columns=["image_a", "image_b", "caption_a", "caption_b", "kind"])


def test_scores_by_hand_with_ties_counted_as_failures():
    # two pictures, 5 captions each; focus captions 2 (picture 0) and 6 (picture 1)
    S = np.zeros((2, 10))
    S[0, 2], S[0, 6], S[1, 2], S[1, 6] = 0.9, 0.5, 0.4, 0.8  # all four right
    pairs = _pairs([(0, 1, 2, 6, "colour")])
    row = swap_scores(S, pairs).iloc[0]
    assert row["text"] and row["image"] and row["group"]
    S[1, 2], S[1, 6] = 0.95, 0.99  # caption 2 now prefers picture 1: image test fails, text test holds
    row = swap_scores(S, pairs).iloc[0]
    assert row["text"] and not row["image"] and not row["group"]
    S[:] = 0.3  # a model that cannot tell them apart: ties fail everything
    row = swap_scores(S, pairs).iloc[0]
    assert not (row["text"] or row["image"] or row["group"])


def test_non_finite_scores_are_an_error():
    S = np.ones((2, 10))
    S[1, 6] = np.nan
    with pytest.raises(ValueError, match="non-finite score for the pair of images 0 and 1"):
        swap_scores(S, _pairs([(0, 1, 2, 6, "colour")]), source="run/sims.npy")


def test_table_per_kind_counts_and_chance():
    S = np.zeros((4, 20))
    # pair 0/1 (colour) perfect; pair 2/3 (relation) text right, image wrong
    S[0, 0], S[0, 5], S[1, 0], S[1, 5] = 1, 0, 0, 1
    S[2, 10], S[2, 15], S[3, 10], S[3, 15] = 0.9, 0.1, 0.95, 0.99
    table = swap_table(S, _pairs([(0, 1, 0, 5, "colour"), (2, 3, 10, 15, "relation")])).set_index("kind")
    assert table.loc["colour", ["text", "image", "group"]].tolist() == [100.0, 100.0, 100.0]
    assert table.loc["relation", ["text", "image", "group"]].tolist() == [100.0, 0.0, 0.0]
    assert table.loc["all", "pairs"] == 2 and table.loc["all", "group"] == 50.0
    assert "size" not in table.index
    assert table.loc["all", "chance_group"] == pytest.approx(100 / 6) == CHANCE["group"]


def test_random_scores_land_near_chance():
    rng = np.random.default_rng(0)
    n = 3000  # one caption per picture keeps the matrix small; the scores only index it
    pairs = _pairs([(2 * i, 2 * i + 1, 2 * i, 2 * i + 1, "colour") for i in range(n)])
    table = swap_table(rng.normal(size=(2 * n, 2 * n)).astype(np.float32), pairs).set_index("kind")
    for test in ("text", "image", "group"):
        assert abs(table.loc["all", test] - CHANCE[test]) < 2.5, (test, table.loc["all", test])


@pytest.fixture(scope="module")
def tiny():
    root = embedded_dataset("tiny")
    return root, PrecompSplit.open(root, "test"), swap_pairs(root, "test")


def test_swap_pairs_find_the_focus_captions(tiny):
    root, split, pairs = tiny
    scenes = {s["image_id"]: s for s in json.loads((root / "scenes.json").read_text())["images"]}
    assert len(pairs) > 0 and set(pairs["kind"]) <= {"colour", "relation", "size"}
    for r in pairs.itertuples():
        a, b = scenes[r.image_id_a], scenes[r.image_id_b]
        assert a["partner"] == r.image_id_b and split.image_ids[r.image_a] == r.image_id_a
        assert r.caption_a // 5 == r.image_a and r.caption_b // 5 == r.image_b
        # the focus caption mentions exactly the two swapped objects
        assert a["caption_objects"][r.caption_a % 5] == sorted(a["swap"]["objects"])
        assert b["caption_objects"][r.caption_b % 5] == sorted(b["swap"]["objects"])
        if r.kind == "colour":  # same sentence, two colour words exchanged
            words_a = split.captions[r.caption_a].lower().split()
            words_b = split.captions[r.caption_b].lower().split()
            assert sorted(words_a) == sorted(words_b) and words_a != words_b


def test_perfect_model_scores_everything(tiny):
    _, split, pairs = tiny
    owner = np.arange(split.n_captions) // 5
    perfect = (owner[None, :] == np.arange(split.n_images)[:, None]).astype(np.float32)
    table = swap_table(perfect, pairs).set_index("kind")
    assert (table[["text", "image", "group"]] == 100.0).all().all()


def test_bag_of_words_fails_colour_swaps_by_construction(tiny):
    _, split, pairs = tiny
    bow = bag_of_words_similarity(split.captions)
    table = swap_table(bow, pairs).set_index("kind")
    assert table.loc["colour", ["text", "image", "group"]].tolist() == [0.0, 0.0, 0.0]
    # ...yet it is a real retrieval model: its own picture's words beat the others' on average
    owner = np.arange(split.n_captions) // 5
    assert bow[owner, np.arange(split.n_captions)].mean() > bow.mean() + 0.1


def test_a_model_blind_to_colour_ties_on_colour_swaps():
    captions = [f"a {c} circle and a {d} square" for c, d in [("red", "blue")] * 5 + [("blue", "red")] * 5]
    blind = bag_of_words_similarity(captions, ignore=list(COLOURS))
    pairs = _pairs([(0, 1, 0, 5, "colour")])
    assert swap_scores(blind, pairs)[["text", "image", "group"]].to_numpy().sum() == 0
    assert blind[0, 0] == blind[0, 5] == blind[1, 0]


def test_not_an_embedded_set_is_a_clear_error(tmp_path):
    (tmp_path / "test_ids.txt").write_text("1\n")
    with pytest.raises(ValueError, match="scenes.json"):
        swap_pairs(tmp_path, "test")
