"""The data_prep/ commands end to end: Karpathy JSON -> captions/ids -> BUTD TSV features -> verify."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from itmkit.data.butd_tsv import write_tsv
from itmkit.data.precomp import PrecompSplit
from itmkit.paths import REPO_ROOT

SCRIPTS = REPO_ROOT / "data_prep"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_from_karpathy_json_to_verified_folder(tmp_path, capsys):
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    images = [{"filename": f"{100 + i}.jpg", "imgid": i, "split": s,
               "sentences": [{"raw": f"photo {i} caption {k}"} for k in range(5)]} for i, s in enumerate(splits)]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    out = tmp_path / "f30k_precomp"
    assert load_script("karpathy_to_precomp").main([str(tmp_path / "dataset_flickr30k.json"), str(out)]) == 0
    rng = np.random.default_rng(0)
    rows = [(100 + i, 50, 40, rng.uniform(0, 40, (3, 4)), rng.standard_normal((3, 8))) for i in reversed(range(8))]
    write_tsv(tmp_path / "feats.tsv", rows)
    butd = load_script("butd_tsv_to_precomp")
    assert butd.main([str(out), str(tmp_path / "feats.tsv"), "--num-boxes", "3", "--feature-dim", "8"]) == 0
    dev = PrecompSplit.open(out, "dev")
    np.testing.assert_allclose(dev.image_features(1), rows[8 - 1 - 5][4])  # dev image 1 is file image 5
    verify = load_script("verify")
    capsys.readouterr()
    assert verify.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "all splits ok" in printed and "train" in printed and "dev" in printed
    (out / "test_caps.txt").write_text("one caption\n")
    assert verify.main([str(out)]) == 1
    assert "test_caps.txt" in capsys.readouterr().out


def test_commands_report_data_errors_with_exit_status(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{")
    assert load_script("karpathy_to_precomp").main([str(tmp_path / "broken.json"), str(tmp_path / "out")]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert load_script("butd_tsv_to_precomp").main([str(tmp_path), str(tmp_path / "none.tsv")]) == 2


@pytest.mark.parametrize("name", ["karpathy_to_precomp", "butd_tsv_to_precomp", "verify"])
def test_runs_as_a_script_with_help(name):
    done = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout and "baselines.md" in done.stdout


def test_verify_runs_as_a_script_and_fails_on_an_empty_folder(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "verify.py"), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 1 and "no {split}_caps.txt" in done.stdout, done.stdout + done.stderr
