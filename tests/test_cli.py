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
    # the value stays text: the field's type reads it (itmkit.config_checks.parse_value)
    assert parse_override("train.epochs=3") == ("train.epochs", "3")
    assert parse_override("train.lr_decay_epochs=[2, 4]") == ("train.lr_decay_epochs", "[2, 4]")
    assert parse_override("text.kind=hf") == ("text.kind", "hf")
    assert parse_override("data.dev_max_captions=null") == ("data.dev_max_captions", "null")
    assert parse_override("data.data_dir=/a=b") == ("data.data_dir", "/a=b")
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


def test_testall_is_reported_both_coco_ways_by_default(tmp_path, capsys, coco_sized_as):
    """A COCO-like folder: ``train`` with ``data.test_split=testall`` and ``eval --split testall``,
    neither given a protocol, report the 5-fold 1K setting (5 folds + mean) and the 5K one."""
    from itmkit.evaluate.metrics import recall_metrics

    data = write_synthetic_precomp(tmp_path / "coco", {"train": 20, "dev": 10, "testall": 20})
    coco_sized_as(20)  # COCO testall stands in at 20 images
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


# --- issue 14: a user's mistake gets one line naming it, and nothing is written ------------------
def one_error_line(capsys, rc, expected_rc=1) -> str:
    """The single stderr line of a refused command (asserting the exit code and no traceback)."""
    err = capsys.readouterr().err
    assert rc == expected_rc, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("training ")]  # progress note
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def argparse_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return one_error_line(capsys, stop.value.code, expected_rc=2)


SETTING_CASES = {
    "train.epochs=abc": "--set train.epochs=abc: train.epochs: expected an integer >= 1, found 'abc'",
    "train.epochs=0": "--set train.epochs=0: train.epochs: expected an integer >= 1, found '0'",
    "train.epochs=2.5": "--set train.epochs=2.5: train.epochs: expected an integer >= 1, found '2.5'",
    "train.max_violation=maybe": "--set train.max_violation=maybe: train.max_violation: expected true or false "
                                 "(also 1/0, yes/no), found 'maybe'",
    "train.batch_size=0": "--set train.batch_size=0: train.batch_size: expected an integer >= 2 (the hinge loss "
                          "needs a negative pair in the batch), found '0'",
    "model.embed_size=-3": "--set model.embed_size=-3: model.embed_size: expected an integer >= 1, found '-3'",
    "train.lr=1000x": "--set train.lr=1000x: train.lr: expected a finite number >= 0, found '1000x'",
    "data.region_drop=1.5": "--set data.region_drop=1.5: data.region_drop: expected a finite number >= 0 and < 1, "
                            "found '1.5'",
}  # fmt: skip


@pytest.mark.parametrize("setting", sorted(SETTING_CASES))
def test_bad_settings_are_refused_by_name_before_anything_is_written(setting, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--method", "vse_infty", "--preset", "smoke", "--data", str(data_dir), "--out", str(out),
               "--set", setting, "--quiet"])  # fmt: skip
    assert one_error_line(capsys, rc) == f"itmkit train: error: {SETTING_CASES[setting]}"
    assert not out.exists()


def test_flags_are_checked_and_named(data_dir, tmp_path, capsys):
    base = ["train", "--method", "vse_infty", "--preset", "smoke", "--out", str(tmp_path / "run"), "--quiet"]
    line = one_error_line(capsys, main([*base, "--data", str(tmp_path / "nowhere")]))
    assert "nowhere" in line and "data.data_dir" in line and "no such folder" in line
    line = one_error_line(capsys, main([*base, "--device", "gpu"]))
    assert line == "itmkit train: error: --device gpu: train.device: expected auto, cpu, cuda, cuda:N or mps, found 'gpu'"
    line = argparse_error_line(capsys, [*base, "--seed", "-1"])
    assert "--seed" in line and "expected an integer >= 0, found '-1'" in line
    line = argparse_error_line(capsys, [*base, "--max-steps", "0"])
    assert "argument --max-steps: expected an integer >= 1, found '0'" in line and "--help" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_error_line(capsys, main(["train", "--method", "vse_infty", "--preset", "smoke", "--data", str(data_dir),
                                        "--out", str(out), "--device", "cuda", "--quiet"]))  # fmt: skip
    assert "device 'cuda'" in line and "built without CUDA" in line and "use device cpu" in line
    assert not out.exists()
    # the same from a real process: exit status 1, one line, no traceback
    done = subprocess.run([sys.executable, "-m", "itmkit", "eval", str(tmp_path / "x.pt"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_hf_folders_without_tokenizer_or_anything(data_dir, tmp_path, capsys):
    from itmkit.data.text import default_hf_path

    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text((default_hf_path() / "config.json").read_text())
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, missing in ((only_config, "tokenizer"), (empty, "config.json")):
        out = tmp_path / f"run_{folder.name}"
        rc = main(["train", "--method", "vse_infty", "--preset", "smoke", "--data", str(data_dir), "--out", str(out),
                   "--set", "text.kind=hf", "--set", f"text.hf_path={folder}", "--quiet"])  # fmt: skip
        line = one_error_line(capsys, rc)
        assert line.startswith(f"itmkit train: error: {folder}: {missing}: expected ") and "huggingface-cli" in line
        assert not out.exists()


def test_resume_refused_for_a_changed_setting_names_the_cli_flags(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "vse_infty", "--preset", "smoke", "--data", str(data_dir), "--out", str(out), *TINY]
    assert main([*args, "--max-steps", "1"]) == 0
    capsys.readouterr()
    line = one_error_line(capsys, main([*args, "--set", "train.lr=0.01"]))
    assert "differing fields: train.lr: 0.0005 -> 0.01." in line
    assert "--no-resume" in line and "--out" in line and "resume=False" not in line
    assert main([*args, "--set", "train.lr=0.01", "--no-resume", "--max-steps", "1"]) == 0


def test_eval_batch_size_and_protocol_size(data_dir, tmp_path, capsys):
    line = argparse_error_line(capsys, ["eval", str(tmp_path / "run"), "--batch-size", "0"])
    assert "argument --batch-size: expected an integer >= 1, found '0'" in line
    line = argparse_error_line(capsys, ["eval", str(tmp_path / "run"), "--max-captions", "-5"])
    assert "--max-captions" in line
    # a 10-image matrix is not COCO 5K
    sims = tmp_path / "sims.npy"
    np.save(sims, np.random.default_rng(0).normal(size=(10, 50)).astype(np.float32))
    line = one_error_line(capsys, main(["ensemble", str(sims), str(sims), "--protocol", "coco-5k"]))
    assert "protocol 'coco-5k'" in line and "expected 5000 images x 25000 captions, found 10 images" in line
    assert "'test'" in line


@pytest.mark.parametrize("content, problem", [
    (b"not a numpy file at all", "header"),
    (None, "data"),  # a real header, the data cut short
])  # fmt: skip
def test_corrupt_similarity_file_is_named(tmp_path, capsys, content, problem):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 10), dtype=np.float32))
    bad = tmp_path / "bad.npy"
    bad.write_bytes(content if content is not None else good.read_bytes()[:-17])
    line = one_error_line(capsys, main(["ensemble", str(good), str(bad)]))
    assert line.startswith(f"itmkit ensemble: error: {bad}: {problem}: expected a .npy similarity matrix")
    nan_weight = one_error_line(capsys, main(["ensemble", str(good), str(good), "--weights", "1", "nan"]))
    assert "finite non-negative" in nan_weight


def test_threads_flag_and_environment(tmp_path, capsys, monkeypatch):
    import torch

    before = torch.get_num_threads()
    sims = tmp_path / "sims.npy"
    np.save(sims, np.eye(2, 10, dtype=np.float32))
    try:
        monkeypatch.setenv("ITMKIT_THREADS", "abc")
        line = one_error_line(capsys, main(["ensemble", str(sims), str(sims)]))
        assert "environment variable ITMKIT_THREADS: expected a positive integer" in line and "'abc'" in line
        monkeypatch.setenv("ITMKIT_THREADS", "1")
        torch.set_num_threads(2)
        assert main(["ensemble", str(sims), str(sims)]) == 0 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main(["ensemble", str(sims), str(sims), "--threads", "1"]) == 0 and torch.get_num_threads() == 1
        line = argparse_error_line(capsys, ["ensemble", str(sims), str(sims), "--threads", "0"])
        assert "--threads: expected an integer >= 1, found '0'" in line
    finally:
        torch.set_num_threads(before)
