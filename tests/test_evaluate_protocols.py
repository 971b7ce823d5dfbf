"""Protocols (baselines.md §C.2): fold slicing on a 10 x 50 toy."""

import numpy as np
import pytest

from itmkit.evaluate.metrics import METRIC_NAMES, i2t_ranks, recall_metrics
from itmkit.evaluate.protocols import evaluate_protocol, evaluate_protocols, fold_slices, summary_rows


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
    df = evaluate_protocol(S, "coco-5fold-1k")
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
    assert evaluate_protocol(S, "coco-5fold-1k").equals(evaluate_protocol(spoiled, "coco-5fold-1k"))
    whole = evaluate_protocol(spoiled, "coco-5k").iloc[0]
    assert whole["fold"] == "all" and whole["n_images"] == 10
    # images 0 and 1 now rank 40 foreign captions first: their i2t ranks become 40
    clean = evaluate_protocol(S, "coco-5k").iloc[0]
    r0, r1 = i2t_ranks(S)[:2]
    assert whole["i2t_meanr"] == pytest.approx(clean["i2t_meanr"] + (80 - r0 - r1) / 10)


def test_several_protocols_and_summary():
    df = evaluate_protocols(toy_matrix(), ["test", "coco-5fold-1k"])
    assert len(df) == 1 + 6
    summary = summary_rows(df)
    assert summary["protocol"].tolist() == ["test", "coco-5fold-1k"]
    assert summary["fold"].tolist() == ["all", "mean"]


def test_bad_protocol_and_fold_count():
    with pytest.raises(KeyError, match="coco-5fold-1k"):
        evaluate_protocol(toy_matrix(), "coco-1k-typo")
    with pytest.raises(ValueError, match="divisible by 5, found 12"):
        evaluate_protocol(np.zeros((12, 60)), "coco-5fold-1k")
