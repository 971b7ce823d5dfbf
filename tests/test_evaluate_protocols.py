"""Protocols (baselines.md §C.2): fold slicing on a 10 x 50 toy."""

import numpy as np
import pytest

from itmkit.evaluate.metrics import METRIC_NAMES, i2t_ranks, recall_metrics
from itmkit.evaluate.protocols import Protocol, evaluate_protocol, evaluate_protocols, fold_slices, summary_rows

# The COCO protocols are defined for 5,000 images and refuse other sizes; their slicing is
# tested on the toy through protocols of the same shape and no size.
FIVE_FOLD = Protocol("5-fold", n_folds=5, description="5 diagonal blocks, any size")
WHOLE = Protocol("whole", n_folds=1, description="the whole matrix, as coco-5k")


def toy_matrix(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(10, 50)).astype(np.float32)
    S[np.arange(50) // 5, np.arange(50)] += 1.0
    return S


def test_fold_slices_are_the_diagonal_blocks():
    slices = fold_slices(10, 5, 5)
    assert [(s.start, s.stop, c.start, c.stop) for s, c in slices] == [
        (0, 2, 0, 10), (2, 4, 10, 20), (4, 6, 20, 30), (6, 8, 30, 40), (8, 10, 40, 50),
    ]  # fmt: skip


def test_five_fold_metrics_per_fold_and_mean():
    S = toy_matrix()
    df = evaluate_protocol(S, FIVE_FOLD)
    assert df["fold"].tolist() == ["0", "1", "2", "3", "4", "mean"]
    for f in range(5):
        rows = list(range(2 * f, 2 * f + 2))
        cols = list(range(10 * f, 10 * f + 10))
        expected = recall_metrics(S[np.ix_(rows, cols)])
        got = df[df["fold"] == str(f)].iloc[0]
        for name in METRIC_NAMES:
            assert got[name] == pytest.approx(expected[name])
        assert got["n_images"] == 2 and got["n_captions"] == 10
    mean = df[df["fold"] == "mean"].iloc[0]
    folds = df[df["fold"] != "mean"]
    for name in METRIC_NAMES:
        assert mean[name] == pytest.approx(folds[name].mean())
    six = sum(mean[f"{s}_r{k}"] for s in ("i2t", "t2i") for k in (1, 5, 10))
    assert mean["rsum"] == pytest.approx(six)  # rsum of the means = mean of the rsums


def test_off_diagonal_blocks_matter_only_to_the_whole_matrix():
    S = toy_matrix()
    spoiled = S.copy()
    spoiled[0:2, 10:50] = 100.0  # foreign captions beat image 0 and 1 everywhere outside their fold
    assert evaluate_protocol(S, FIVE_FOLD).equals(evaluate_protocol(spoiled, FIVE_FOLD))
    whole = evaluate_protocol(spoiled, WHOLE).iloc[0]
    assert whole["fold"] == "all" and whole["n_images"] == 10
    # images 0 and 1 now rank 40 foreign captions first: their i2t ranks become 40
    clean = evaluate_protocol(S, WHOLE).iloc[0]
    r0, r1 = i2t_ranks(S)[:2]
    assert whole["i2t_meanr"] == pytest.approx(clean["i2t_meanr"] + (80 - r0 - r1) / 10)


def test_several_protocols_and_summary():
    df = evaluate_protocols(toy_matrix(), ["test", FIVE_FOLD])
    assert len(df) == 1 + 6
    summary = summary_rows(df)
    assert summary["protocol"].tolist() == ["test", "5-fold"]
    assert summary["fold"].tolist() == ["all", "mean"]


def test_bad_protocol_and_fold_count():
    with pytest.raises(KeyError, match="coco-5fold-1k"):
        evaluate_protocol(toy_matrix(), "coco-1k-typo")
    with pytest.raises(ValueError, match="divisible by 5, found 12"):
        evaluate_protocol(np.zeros((12, 60)), FIVE_FOLD)


@pytest.mark.parametrize("name, n_img", [("coco-5k", 16), ("coco-5fold-1k", 10), ("f30k-1k", 999), ("coco-5k", 5005)])
def test_sized_protocols_refuse_another_size(name, n_img):
    S = np.zeros((n_img, 5 * n_img), dtype=np.float32)
    with pytest.raises(ValueError, match=rf"protocol '{name}'.*expected \d+ images x \d+ captions, found {n_img} images.*'test'"):
        evaluate_protocol(S, name)
    with pytest.raises(ValueError, match=name):  # also when listed after a protocol that fits
        evaluate_protocols(S, ["test", name])
    assert evaluate_protocol(S, "test").iloc[0]["n_images"] == n_img  # any size: the whole matrix


def test_default_protocols_follow_the_split_size():
    from itmkit.evaluate.protocols import default_protocols

    assert default_protocols("testall", 5000) == ["coco-5fold-1k", "coco-5k"]
    assert default_protocols("testall", 16) == ["test"]
    assert default_protocols("test", 1000) == ["test"]
