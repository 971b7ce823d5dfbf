"""The trainer (baselines.md §B.5-§B.6, §F.2): run-dir files, model selection, exact resume.

A toy embedding model (mean-pooled regions / words, one linear layer each) is registered as a
method for these tests, and the data is a synthetic precomp folder written with NumPy.
"""

import json
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


def _chance_rsum_quantile(n_img, q=99, draws=2000, seed=0):
    """The ``q``-th percentile of the rsum of random ``[n_img, 5 n_img]`` score matrices: what an
    untrained ranker reaches by luck, measured with the same metric code as the dev evaluation."""
    from itmkit.evaluate.metrics import recall_metrics

    rng = np.random.default_rng(seed)
    sums = [recall_metrics(rng.standard_normal((n_img, 5 * n_img)))["rsum"] for _ in range(draws)]
    return float(np.percentile(sums, q))


def test_learns_above_chance(toy_method, data_dir, tmp_path):
    """Learning = beating the same model, seed and steps at lr 0, and beating luck: the loss of the
    last epoch (same hardest-negative mode in both runs) and the dev rsum."""
    from itmkit.losses import ScoreCollapseWarning

    overrides = {"train.epochs": 4, "train.lr_decay_epochs": (3,)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScoreCollapseWarning)  # a model that learns never trips it
        result = train(toy_config(data_dir, **overrides), tmp_path / "run", progress=False)
    frozen = train(toy_config(data_dir, **overrides, **{"train.lr": 0.0}), tmp_path / "frozen", progress=False)
    # lr 0 leaves the weights as built: every epoch evaluates the same model
    assert frozen.log["rsum"].nunique() == 1
    assert result.log["max_violation"].tolist() == frozen.log["max_violation"].tolist() == [False, True, True, True]

    chance = _chance_rsum_quantile(n_img=12)  # 12 dev images x 60 captions: about 327
    assert 300 < chance < 360
    assert result.best_rsum > chance, f"dev rsum {result.best_rsum:.1f} is within luck (99th percentile {chance:.1f})"
    assert result.best_rsum > frozen.best_rsum + 100, (result.best_rsum, frozen.best_rsum)
    # same epoch, same loss mode: training must at least halve the untrained model's loss
    last, untrained = result.log["loss"].iloc[-1], frozen.log["loss"].iloc[-1]
    assert last < 0.5 * untrained, f"last-epoch loss {last:.2f} vs {untrained:.2f} at lr 0"


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


# ------------------------------------------------------ the optimiser recipe reaches the steps
class _TextWithBackbone(nn.Module):
    """A stand-in for an HF text encoder: the pretrained part sits at ``text.backbone``."""

    def __init__(self, d):
        super().__init__()
        self.backbone = nn.Linear(d, d)
        self.linear = nn.Linear(d, d)

    def forward(self, x):
        return self.linear(self.backbone(x))


class BackboneToyModel(ToyModel):
    def __init__(self, cfg: ToyConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.text = _TextWithBackbone(cfg.embed_size)


@pytest.fixture
def built_models(monkeypatch):
    """Registers method ``toy_bb`` (the toy with a text backbone) and returns the list of models
    the trainer builds, so a test can look at the model inside a running ``train``."""
    models = []

    def build(run_cfg, vocab_size):
        models.append(BackboneToyModel(run_cfg.model, vocab_size))
        return models[-1]

    module = types.ModuleType("itmkit_test_toy_bb_method")
    module.METHOD = MethodSpec("toy_bb", ToyConfig, build, {"smoke": toy_preset}, spec="tests")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.METHOD_MODULES, "toy_bb", module.__name__)
    return models


def _grad_norm(model):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))


def test_gradient_clipping_bounds_every_step_to_the_configured_norm(built_models, data_dir, tmp_path):
    norms = {}
    for clip in (0.05, 0.0):  # 0 turns clipping off: shows the bound is the clip's doing
        cfg = toy_config(data_dir, **{"method": "toy_bb", "train.epochs": 1, "train.grad_clip": clip})
        seen = norms[clip] = []
        train(cfg, tmp_path / f"clip{clip}", progress=False, max_steps=5,
              on_step=lambda state, seen=seen: seen.append(_grad_norm(built_models[-1])))  # fmt: skip
    assert len(norms[0.05]) == len(norms[0.0]) == 5
    assert min(norms[0.0]) > 0.05, norms[0.0]  # unclipped gradients are larger than the bound...
    # ...and clipped ones are rescaled onto it (clip_grad_norm_ scales by max_norm / (norm + 1e-6))
    assert norms[0.05] == pytest.approx([0.05] * 5, rel=1e-4), norms[0.05]


def test_optimizer_kind_weight_decay_and_group_lrs_by_hand():
    """One step with zero loss gradients isolates the weight decay: AdamW shrinks each weight by
    ``lr_g * wd`` (decoupled), Adam adds ``wd * p`` to the gradient, so its first normalised step
    is ``lr_g * g / (|g| + eps)`` with ``g = wd * p``. ``lr_g`` is the group's LR (backbone: x scale)."""
    from itmkit.train.optim import build_optimizer

    torch.manual_seed(0)
    model = BackboneToyModel(ToyConfig(), vocab_size=10)
    lr, wd, scale, eps = 0.01, 0.1, 0.5, 1e-8
    for kind, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        optimizer = build_optimizer(model, TrainConfig(optimizer=kind, lr=lr, weight_decay=wd, backbone_lr_scale=scale))
        assert type(optimizer) is cls  # AdamW subclasses Adam: isinstance would not tell them apart
        assert [g["lr"] for g in optimizer.param_groups] == [lr, lr * scale]
        assert [g["weight_decay"] for g in optimizer.param_groups] == [wd, wd]
        backbone = {id(p) for p in model.text.backbone.parameters()}
        assert {id(p) for p in optimizer.param_groups[1]["params"]} == backbone
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for name, p in model.named_parameters():
            p0, group_lr = before[name], lr * scale if ".backbone." in f".{name}" else lr
            if kind == "adamw":
                expected = p0 * (1 - group_lr * wd)
            else:
                g = wd * p0
                expected = p0 - group_lr * g / (g.abs() + eps)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=f"{kind}: {name}")
            with torch.no_grad():
                p.copy_(p0)


def test_backbone_lr_decays_with_the_other_groups(built_models, data_dir, tmp_path):
    from itmkit.train.optim import build_optimizer, build_scheduler

    model = BackboneToyModel(ToyConfig(), vocab_size=10)
    cfg = TrainConfig(lr=0.02, backbone_lr_scale=0.1, lr_decay_epochs=(2, 4), lr_decay_factor=0.5)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = [[0.02 * f, 0.002 * f] for f in (1, 1, 0.5, 0.5, 0.25, 0.25)]
    assert np.allclose(seen, expected), seen

    # the trainer's own optimiser, as checkpointed after epoch 2 (decay at epoch 1: x 0.1)
    train(toy_config(data_dir, **{"method": "toy_bb", "train.backbone_lr_scale": 0.1}), tmp_path / "run",
          progress=False)  # fmt: skip
    groups = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([5e-4, 5e-5])
    assert [g["initial_lr"] for g in groups] == pytest.approx([5e-3, 5e-4])
