"""The trainer (baselines.md §B.5-§B.6, §F.2): run-dir files, model selection, exact resume.

A toy embedding model (mean-pooled regions / words, one linear layer each) is registered as a
method for these tests, and the data is a synthetic precomp folder written with NumPy.
"""

import json
import re
import sys
import types
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig, replace_nested
from itmkit.encoded import Encoded
from itmkit.evaluate.synthetic_precomp import write_synthetic_precomp
from itmkit.methods import registry
from itmkit.methods.registry import MethodSpec
from itmkit.models.base import MatchingModel
from itmkit.runs import load_run
from itmkit.train.checkpoint import load_checkpoint
from itmkit.train.optim import lr_factor
from itmkit.train.trainer import train


@dataclass
class ToyConfig:
    img_dim: int = 8
    embed_size: int = 16


class ToyModel(MatchingModel):
    pairwise = False

    def __init__(self, cfg: ToyConfig, vocab_size: int):
        super().__init__()
        self.image = nn.Linear(cfg.img_dim, cfg.embed_size)
        self.embed = nn.Embedding(vocab_size, cfg.embed_size)
        self.text = nn.Linear(cfg.embed_size, cfg.embed_size)
        self.dropout = nn.Dropout(0.1)  # consumes torch's RNG in training: resume must restore it

    @staticmethod
    def _mean(x, lengths):
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
        return (x * mask[..., None]).sum(1) / lengths[:, None].to(x.dtype)

    def encode_images(self, images, lengths):
        return Encoded(nn.functional.normalize(self.image(self.dropout(self._mean(images, lengths))), dim=-1))

    def encode_captions(self, tokens, lengths):
        return Encoded(nn.functional.normalize(self.text(self._mean(self.embed(tokens), lengths)), dim=-1))


def toy_build(run_cfg, vocab_size):
    return ToyModel(run_cfg.model, vocab_size)


def toy_preset():
    return RunConfig(
        method="toy",
        model=ToyConfig(),
        text=TextConfig(kind="bigru"),
        data=DataConfig(region_drop=0.2, caption_augment=True),
        train=TrainConfig(epochs=2, batch_size=32, lr=5e-3, lr_decay_epochs=(1,), device="cpu",
                          log_every_steps=2, eval_batch_size=64),
    )


@pytest.fixture
def toy_method(monkeypatch):
    module = types.ModuleType("itmkit_test_toy_method")
    module.METHOD = MethodSpec("toy", ToyConfig, toy_build, {"smoke": toy_preset}, spec="tests")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.METHOD_MODULES, "toy", module.__name__)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_precomp(tmp_path_factory.mktemp("precomp"), {"train": 40, "dev": 12, "test": 10})


def toy_config(data_dir, **overrides):
    return replace_nested(toy_preset(), {"data.data_dir": str(data_dir), **overrides})


def test_run_directory_contents_and_no_retrain(toy_method, data_dir, tmp_path):
    out = tmp_path / "run"
    result = train(toy_config(data_dir), out, progress=False)
    assert result.finished
    for name in ("config.json", "checkpoint.pt", "model_best.pt", "log.csv", "steps.csv",
                 "test_metrics.csv", "result.json", "test/metrics.csv", "test/sims.npy"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    log = pd.read_csv(out / "log.csv")
    assert log["epoch"].tolist() == [1, 2]
    steps_per_epoch = -(-200 // 32)
    assert log["step"].tolist() == [steps_per_epoch, 2 * steps_per_epoch]
    # lr_decay_epochs=(1,): epoch 1 at lr, epoch 2 at lr x 0.1
    assert log["lr"].tolist() == pytest.approx([5e-3, 5e-4])
    # warm-up: epoch 1 in sum mode, then hardest negatives
    assert log["max_violation"].tolist() == [False, True]
    six = log[["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]].sum(axis=1)
    assert np.allclose(log["rsum"], six)
    best = int(log["rsum"].idxmax())
    assert result.best_epoch == best + 1 and result.best_rsum == pytest.approx(log["rsum"].max())
    assert load_checkpoint(out / "model_best.pt")["epoch"] == best + 1
    test = pd.read_csv(out / "test_metrics.csv")
    assert test["protocol"].tolist() == ["test"] and test["n_images"].tolist() == [10]
    assert json.loads((out / "config.json").read_text())["method"] == "toy"

    # the test metrics come from the best weights: re-evaluating model_best.pt gives them again
    from itmkit.evaluate.evaluator import evaluate_model

    model, cfg, pipeline = load_run(out, device="cpu")
    again = evaluate_model(model, data_dir, "test", pipeline, progress=False)
    assert again.metrics["rsum"].iloc[0] == pytest.approx(test["rsum"].iloc[0])

    # a finished run re-invoked reads its files instead of training
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    calls = []
    again = train(toy_config(data_dir), out, progress=False, on_step=calls.append)
    assert calls == [] and again.finished and (out / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert again.best_rsum == pytest.approx(result.best_rsum)
    assert again.test_metrics["rsum"].iloc[0] == pytest.approx(test["rsum"].iloc[0])


def test_learns_above_chance(toy_method, data_dir, tmp_path):
    from itmkit.losses import ScoreCollapseWarning

    cfg = toy_config(data_dir, **{"train.epochs": 4, "train.lr_decay_epochs": (3,)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScoreCollapseWarning)  # a model that learns never trips it
        result = train(cfg, tmp_path / "run", progress=False)
    # chance rsum for 12 dev images x 60 captions: i2t ~ 3 x (k*5/60 ...); far below 300
    assert result.best_rsum > 300
    assert result.log["loss"].iloc[-1] < result.log["loss"].iloc[0]


def test_trainer_warns_when_the_scores_collapse(toy_method, data_dir, tmp_path, monkeypatch):
    from itmkit.losses import ScoreCollapseWarning

    # every score 0: the max-violation epoch's loss is exactly the collapsed value
    original = ToyModel.similarity
    monkeypatch.setattr(ToyModel, "similarity", lambda self, i, c, **kw: original(self, i, c, **kw) * 0.0)
    cfg = toy_config(data_dir, **{"train.epochs": 2, "train.sum_warmup_epochs": 1})
    with pytest.warns(ScoreCollapseWarning, match=r"epoch 2: the mean hinge loss .* collapsed"):
        result = train(cfg, tmp_path / "run", progress=False)
    assert result.log["max_violation"].tolist() == [False, True]


class Killed(RuntimeError):
    pass


def _kill_after(step):
    def on_step(state):
        if state.global_step == step:
            raise Killed(f"killed after step {step}")

    return on_step


def _model_tensors(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("kill_step", [3, 10])
def test_exact_resume_after_kill_mid_epoch(toy_method, data_dir, tmp_path, kill_step):
    # checkpoints every 2 steps; a kill at step 3 loses step 3, which the resumed run redoes
    cfg = toy_config(data_dir, **{"train.checkpoint_every_steps": 2})
    full = train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "killed", progress=False, on_step=_kill_after(kill_step))
    ckpt = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert ckpt["state"]["global_step"] == kill_step - kill_step % 2
    resumed = train(cfg, tmp_path / "killed", progress=False)
    assert resumed.finished
    for name in ("model_best.pt", "checkpoint.pt"):
        a, b = _model_tensors(tmp_path / "full" / name), _model_tensors(tmp_path / "killed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
    cols = ["epoch", "step", "loss", "lr", "rsum", "i2t_r1", "t2i_r1"]
    pd.testing.assert_frame_equal(full.log[cols], resumed.log[cols])
    pd.testing.assert_frame_equal(full.test_metrics, resumed.test_metrics)
    steps_full = pd.read_csv(tmp_path / "full" / "steps.csv")
    steps_resumed = pd.read_csv(tmp_path / "killed" / "steps.csv")
    pd.testing.assert_frame_equal(steps_full, steps_resumed)


def test_max_steps_stops_and_resumes_to_the_same_weights(toy_method, data_dir, tmp_path):
    cfg = toy_config(data_dir, **{"train.epochs": 1})
    assert train(cfg, tmp_path / "full", progress=False).finished
    part = train(cfg, tmp_path / "part", progress=False, max_steps=4)
    assert not part.finished and not (tmp_path / "part" / "result.json").exists()
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["state"]["step_in_epoch"] == 4
    done = train(cfg, tmp_path / "part", progress=False)
    assert done.finished
    a, b = _model_tensors(tmp_path / "full" / "checkpoint.pt"), _model_tensors(tmp_path / "part" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_config_names_the_fields(toy_method, data_dir, tmp_path):
    cfg = toy_config(data_dir, **{"train.epochs": 1})
    train(cfg, tmp_path / "run", progress=False, max_steps=1)
    other = replace_nested(cfg, {"train.lr": 1e-2})
    with pytest.raises(ValueError, match=r"train\.lr: 0\.005 -> 0\.01"):
        train(other, tmp_path / "run", progress=False)
    # a setting that does not change the numbers may differ
    train(replace_nested(cfg, {"train.log_every_steps": 3}), tmp_path / "run", progress=False, max_steps=1)
    # resume=False starts over
    fresh = train(other, tmp_path / "run", resume=False, progress=False, max_steps=1)
    assert fresh.log.empty
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 1e-2


@pytest.mark.parametrize("change, message", [
    ({"train": TrainConfig(epochs=0)}, "train.epochs: expected an integer >= 1, found 0"),
    ({"train": TrainConfig(epochs=2.5)}, "train.epochs: expected an integer >= 1, found 2.5"),
    ({"train": TrainConfig(max_violation="maybe")}, "train.max_violation: expected true or false"),
    ({"train": TrainConfig(batch_size=0)}, "train.batch_size: expected an integer >= 2"),
    ({"model": ToyConfig(embed_size="16")}, "model.embed_size: expected an integer, found '16'"),
    ({"data": DataConfig(data_dir="/no/such/precomp")}, "/no/such/precomp: data.data_dir: expected a precomp folder"),
    ({"text": TextConfig(vocab_path="/no/vocab.json")}, "/no/vocab.json: text.vocab_path: expected a vocabulary"),
    ({"method": "no_such_method"}, "unknown method 'no_such_method'"),
])  # fmt: skip
def test_bad_settings_are_refused_before_anything_is_written(toy_method, data_dir, tmp_path, change, message):
    cfg = toy_config(data_dir)
    for name, value in change.items():
        setattr(cfg, name, value)
    with pytest.raises((ValueError, KeyError), match=re.escape(message)):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_max_steps_zero_and_a_missing_device_are_refused(toy_method, data_dir, tmp_path):
    for steps in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"max_steps: expected an integer >= 1 or None, found {steps!r}"):
            train(toy_config(data_dir), tmp_path / "run", progress=False, max_steps=steps)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': this torch .* was built without CUDA"):
            train(toy_config(data_dir, **{"train.device": "cuda"}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_lr_factor_compounds_decays():
    cfg = TrainConfig(lr_decay_epochs=(2, 4), lr_decay_factor=0.5)
    assert [lr_factor(e, cfg) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_checkpoint_is_plain_data_with_everything_for_resume(toy_method, data_dir, tmp_path):
    train(toy_config(data_dir, **{"train.epochs": 1}), tmp_path / "run", progress=False, max_steps=2)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # weights_only=True inside
    for key in ("model", "optimizer", "scheduler", "scaler", "state", "rng", "config", "text_pipeline"):
        assert key in ckpt
    assert ckpt["text_pipeline"]["kind"] == "word_ids"
    assert ckpt["text_pipeline"]["vocab"]["idx2word"]["1"] == "<start>"
    with pytest.raises(ValueError, match="field 'format'"):
        torch.save({"model": {}}, tmp_path / "foreign.pt")
        load_checkpoint(tmp_path / "foreign.pt")
