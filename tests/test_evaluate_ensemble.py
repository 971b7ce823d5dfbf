"""Ensembles (baselines.md §C.3) and the saved-similarity format."""

import json

import numpy as np
import pandas as pd
import pytest

from itmkit.evaluate.ensemble import average_similarities, evaluate_ensemble
from itmkit.evaluate.metrics import recall_metrics
from itmkit.evaluate.protocols import Protocol, evaluate_protocol
from itmkit.evaluate.similarity_file import load_similarity, save_similarity


FIVE_FOLD = Protocol("5-fold", n_folds=5)  # coco-5fold-1k's slicing without its 5,000-image size


def random_sims(seed, n_img=10, cpi=5):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n_img, n_img * cpi)).astype(np.float32)
    S[np.arange(n_img * cpi) // cpi, np.arange(n_img * cpi)] += 0.8
    return S


def test_equal_and_weighted_average_by_hand():
    a = np.array([[1.0, 3.0, 5.0, 7.0, 9.0]], dtype=np.float32)
    b = np.array([[3.0, 1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    assert average_similarities([a, b]).tolist() == [[2.0, 2.0, 3.0, 4.0, 5.0]]
    # weights 3:1 -> 0.75 a + 0.25 b
    assert average_similarities([a, b], weights=[3, 1]).tolist() == [[1.5, 2.5, 4.0, 5.5, 7.0]]


def test_ensemble_from_files_matches_manual_average(tmp_path):
    mats = [random_sims(s) for s in range(3)]
    paths = [save_similarity(tmp_path / f"m{i}" / "sims.npy", S) for i, S in enumerate(mats)]
    result = evaluate_ensemble(paths, protocols=["test", FIVE_FOLD], out_dir=tmp_path / "ens")
    manual = (mats[0].astype(np.float64) + mats[1] + mats[2]) / 3
    np.testing.assert_allclose(result.sims, manual, rtol=1e-6)
    whole = result.metrics[result.metrics["protocol"] == "test"].iloc[0]
    assert whole["rsum"] == pytest.approx(recall_metrics(manual)["rsum"])
    # 5-fold slices the averaged matrix, not the members' metrics
    folds = evaluate_protocol(manual, FIVE_FOLD)
    assert result.metric("rsum", "5-fold") == pytest.approx(folds.iloc[-1]["rsum"])
    saved = pd.read_csv(tmp_path / "ens" / "metrics.csv")
    assert len(saved) == 7
    flat = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert flat["metrics"]["test/rsum"] == pytest.approx(whole["rsum"])
    np.testing.assert_allclose(load_similarity(tmp_path / "ens" / "sims.npy"), result.sims)


def test_reference_pickled_dict_needs_allow_pickle(tmp_path):
    S = random_sims(5)
    path = tmp_path / "ref_sims.npy"
    np.save(path, {"npts": 10, "sims": S}, allow_pickle=True)  # the references' layout
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_similarity(path)
    np.testing.assert_array_equal(load_similarity(path, allow_pickle=True), S)
    bad = tmp_path / "bad.npy"
    np.save(bad, {"npts": 11, "sims": S}, allow_pickle=True)
    with pytest.raises(ValueError, match="field 'npts'"):
        load_similarity(bad, allow_pickle=True)


def test_shape_and_weight_errors(tmp_path):
    a, b = random_sims(0), random_sims(1, n_img=5)
    with pytest.raises(ValueError, match=r"matrix #1: expected shape \(10, 50\).*found \(5, 25\)"):
        average_similarities([a, b])
    with pytest.raises(ValueError, match="two or more"):
        average_similarities([a])
    with pytest.raises(ValueError, match="one weight per matrix"):
        average_similarities([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        average_similarities([a, a], weights=[1.0, -1.0])
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_similarity(tmp_path / "missing.npy")
    np.save(tmp_path / "vec.npy", np.zeros(5))
    with pytest.raises(ValueError, match="expected a 2-D"):
        load_similarity(tmp_path / "vec.npy")


def test_non_finite_inputs_are_named_and_constant_ensembles_refused(tmp_path):
    from itmkit.cli import main
    from itmkit.evaluate.collapse import CollapsedScoresError
    from itmkit.evaluate.metrics import NonFiniteScoresError

    good = save_similarity(tmp_path / "a" / "sims.npy", random_sims(0))
    S = random_sims(1)
    S[4, 17] = np.nan
    bad = save_similarity(tmp_path / "b" / "sims.npy", S)
    with pytest.raises(NonFiniteScoresError, match=r"b/sims\.npy: expected finite scores, found 1 non-finite.*image 4, caption 17"):
        evaluate_ensemble([good, bad])
    with pytest.raises(NonFiniteScoresError, match=r"matrix #1: expected finite"):
        average_similarities([random_sims(0), np.full((10, 50), np.inf, dtype=np.float32)])
    # the CLI prints it on one line and fails, instead of scoring the ensemble
    assert main(["ensemble", str(good), str(bad)]) == 1
    flat = [save_similarity(tmp_path / f"c{i}" / "sims.npy", np.full((10, 50), 0.2, np.float32)) for i in range(2)]
    with pytest.raises(CollapsedScoresError, match=r"ensemble of .*c0/sims\.npy, .*c1/sims\.npy: expected scores that differ"):
        evaluate_ensemble(flat)


def test_float64_inputs_stay_float64(tmp_path):
    a, b = random_sims(0).astype(np.float64), random_sims(1).astype(np.float64)
    a[0, 0] += 1e-12  # below float32 resolution
    mean = average_similarities([a, b])
    assert mean.dtype == np.float64 and mean[0, 0] == pytest.approx((a[0, 0] + b[0, 0]) / 2, abs=1e-15)
    path = save_similarity(tmp_path / "sims.npy", mean)
    assert load_similarity(path).dtype == np.float64
    assert average_similarities([random_sims(0), random_sims(1)]).dtype == np.float32
