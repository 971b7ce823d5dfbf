"""The ``itmkit`` command: train -> eval -> ensemble end to end on a synthetic precomp folder."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from itmkit.cli import main, parse_override
from itmkit.evaluate.synthetic_precomp import write_synthetic_precomp

TINY = ["--set", "model.img_dim=8", "--set", "model.embed_size=16", "--set", "text.word_dim=8",
        "--set", "train.epochs=1", "--set", "train.batch_size=32", "--device", "cpu", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_precomp(tmp_path_factory.mktemp("precomp"), {"train": 20, "dev": 10, "test": 10})


def test_parse_override():
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("train.lr_decay_epochs=[2, 4]") == ("train.lr_decay_epochs", [2, 4])
    assert parse_override("text.kind=hf") == ("text.kind", "hf")
    assert parse_override("data.dev_max_captions=null") == ("data.dev_max_captions", None)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("train.epochs")


def test_methods_and_presets(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "vse_infty" in out and "course" in out
    assert main(["presets", "vse_infty", "smoke"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "vse_infty"


def test_train_eval_ensemble(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--method", "vse_infty", "--preset", "smoke", "--data", str(data_dir), "--out", str(run), *TINY]
    assert main(args) == 0
    assert "best dev rsum" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["embed_size"] == 16 and config["data"]["data_dir"] == str(data_dir)

    # eval with the checkpoint alone (config + vocabulary inside), into a chosen folder
    assert main(["eval", str(run / "model_best.pt"), "--data", str(data_dir), "--out", str(tmp_path / "ev"),
                 "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    metrics = pd.read_csv(tmp_path / "ev" / "metrics.csv")
    test_metrics = pd.read_csv(run / "test_metrics.csv")
    assert metrics["rsum"].iloc[0] == pytest.approx(test_metrics["rsum"].iloc[0])

    # ensemble of the model with itself = the model
    sims = str(tmp_path / "ev" / "sims.npy")
    assert main(["ensemble", sims, sims, "--protocol", "test", "--out", str(tmp_path / "ens")]) == 0
    ens = pd.read_csv(tmp_path / "ens" / "metrics.csv")
    assert ens["rsum"].iloc[0] == pytest.approx(metrics["rsum"].iloc[0])
    np.testing.assert_allclose(np.load(tmp_path / "ens" / "sims.npy"), np.load(sims), rtol=1e-6)

    # --float64: the references' precision; the saved matrix is float64, close to the float32 one
    assert main(["eval", str(run / "model_best.pt"), "--data", str(data_dir), "--out", str(tmp_path / "ev64"),
                 "--device", "cpu", "--quiet", "--float64"]) == 0  # fmt: skip
    sims64 = np.load(tmp_path / "ev64" / "sims.npy")
    assert sims64.dtype == np.float64 and np.load(sims).dtype == np.float32
    np.testing.assert_allclose(sims64, np.load(sims), atol=1e-6)

    # re-running the same train command does not retrain
    stamp = (run / "model_best.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert (run / "model_best.pt").stat().st_mtime_ns == stamp


def test_clear_errors(data_dir, tmp_path, capsys):
    assert main(["train", "--method", "vse_infty", "--preset", "smoke", "--set", "train.nope=1"]) == 1
    assert "train.nope" in capsys.readouterr().err
    assert main(["train", "--method", "no_such_method"]) == 1
    assert "registered" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err
    a = tmp_path / "a.npy"
    np.save(a, np.zeros((2, 10), dtype=np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 15), dtype=np.float32))
    assert main(["ensemble", str(a), str(tmp_path / "b.npy")]) == 1
    assert "expected shape (2, 10)" in capsys.readouterr().err


def test_data_verify(data_dir, tmp_path, capsys):
    assert main(["data", "verify", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "ok" in out
    broken = tmp_path / "broken"
    broken.mkdir()
    np.save(broken / "test_ims.npy", np.zeros((2, 3, 4), dtype=np.float32))
    (broken / "test_caps.txt").write_text("a\nb\nc\n")
    assert main(["data", "verify", str(broken)]) == 1
    assert "error" in capsys.readouterr().out


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "itmkit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("train", "eval", "ensemble", "methods", "data"):
        assert command in done.stdout


def test_testall_is_reported_both_coco_ways_by_default(tmp_path, capsys):
    """A COCO-like folder: ``train`` with ``data.test_split=testall`` and ``eval --split testall``,
    neither given a protocol, report the 5-fold 1K setting (5 folds + mean) and the 5K one."""
    from itmkit.evaluate.metrics import recall_metrics

    data = write_synthetic_precomp(tmp_path / "coco", {"train": 20, "dev": 10, "testall": 20})
    run = tmp_path / "run"
    assert main(["train", "--method", "vse_infty", "--preset", "smoke", "--data", str(data), "--out", str(run),
                 "--set", "data.test_split=testall", *TINY]) == 0  # fmt: skip
    expected = {"protocol": ["coco-5fold-1k"] * 6 + ["coco-5k"], "fold": ["0", "1", "2", "3", "4", "mean", "all"]}
    trained = pd.read_csv(run / "test_metrics.csv", dtype={"fold": str})
    assert {k: trained[k].tolist() for k in expected} == expected

    capsys.readouterr()
    assert main(["eval", str(run), "--split", "testall", "--out", str(tmp_path / "ev"), "--device", "cpu",
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "coco-5fold-1k" in printed and "coco-5k" in printed
    table = pd.read_csv(tmp_path / "ev" / "metrics.csv", dtype={"fold": str})
    assert {k: table[k].tolist() for k in expected} == expected
    sims = np.load(tmp_path / "ev" / "sims.npy")
    assert sims.shape == (20, 100)
    whole = table[table["protocol"] == "coco-5k"].iloc[0]
    assert whole["rsum"] == pytest.approx(recall_metrics(sims)["rsum"])
    fold_rsums = [recall_metrics(sims[4 * f:4 * f + 4, 20 * f:20 * f + 20])["rsum"] for f in range(5)]
    assert table["rsum"].iloc[:5].tolist() == pytest.approx(fold_rsums)
    assert table["rsum"].iloc[5] == pytest.approx(np.mean(fold_rsums))
    np.testing.assert_allclose(table["rsum"], trained["rsum"], rtol=1e-6)  # the same best model


def test_data_verify_finds_a_nan_region(data_dir, tmp_path, capsys):
    import shutil

    poisoned = tmp_path / "poisoned"
    shutil.copytree(data_dir, poisoned)
    feats = np.load(poisoned / "test_ims.npy")
    feats[2, 0, 5] = np.nan
    np.save(poisoned / "test_ims.npy", feats)
    assert main(["data", "verify", str(poisoned)]) == 1
    assert "test_ims.npy: row 2, region 0, dim 5: expected finite region features, found nan" in capsys.readouterr().out


def test_a_huge_learning_rate_no_longer_reports_a_perfect_model(tmp_path, capsys):
    # the probe's case: `itmkit train --method vse_infty --preset smoke --set train.lr=1000` (embedded
    # tiny set) collapsed every score to 0 in epoch 1 and reported "best dev rsum 600.00"
    from itmkit.evaluate.collapse import ScoreCollapseWarning

    run = tmp_path / "run"
    with pytest.warns(ScoreCollapseWarning, match="epoch 1: the dev scores have collapsed"):
        code = main(["train", "--method", "vse_infty", "--preset", "smoke", "--set", "train.lr=1000",
                     "--out", str(run), "--device", "cpu", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    log = pd.read_csv(run / "log.csv")
    assert code == 0 and log["collapsed"].tolist() == [True, False]
    assert log["rsum"].max() < 300 and "best dev rsum 600" not in out
    assert f"at epoch 2; model: {run / 'model_best.pt'}" in out
