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
    from itmkit.evaluate.collapse import ScoreCollapseWarning

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


def test_a_collapsed_epoch_warns_and_is_never_selected(toy_method, data_dir, tmp_path, monkeypatch):
    from itmkit.evaluate.collapse import ScoreCollapseWarning

    # the dev scores of epoch 2 are all 0 (a constant matrix used to score rsum 600 and win);
    # training itself is unchanged
    collapse = {"on": False}
    original = ToyModel.similarity
    def similarity(self, images, captions, **kw):
        dev = not self.training and len(images) == 12  # the dev split, not the test split's 10 images
        return original(self, images, captions, **kw) * (0.0 if collapse["on"] and dev else 1.0)

    monkeypatch.setattr(ToyModel, "similarity", similarity)

    def on_step(state):
        collapse["on"] = state.epoch == 1

    cfg = toy_config(data_dir, **{"train.epochs": 2, "train.sum_warmup_epochs": 1})
    with pytest.warns(ScoreCollapseWarning, match=r"epoch 2: the dev scores have collapsed \(std 0 .*not a candidate"):
        result = train(cfg, tmp_path / "run", progress=False, on_step=on_step)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert log["collapsed"].tolist() == [False, True]
    assert result.best_epoch == 1 and load_checkpoint(tmp_path / "run" / "model_best.pt")["epoch"] == 1
    assert log["rsum"].iloc[1] < 600  # ties count against the query


def test_a_run_whose_every_epoch_collapses_ends_with_an_error(toy_method, data_dir, tmp_path, monkeypatch):
    from itmkit.evaluate.collapse import ScoreCollapseWarning
    from itmkit.train.trainer import NoUsableEpochError

    original = ToyModel.similarity
    monkeypatch.setattr(ToyModel, "similarity", lambda self, i, c, **kw: original(self, i, c, **kw) * 0.0)
    cfg = toy_config(data_dir, **{"train.epochs": 2})
    with pytest.warns(ScoreCollapseWarning), pytest.raises(NoUsableEpochError, match=r"run: no epoch gave a usable "
                                                             r"model: the dev scores collapsed .* after epochs 1, 2"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model_best.pt").exists() and not (tmp_path / "run" / "result.json").exists()
    assert pd.read_csv(tmp_path / "run" / "log.csv")["collapsed"].tolist() == [True, True]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(toy_method, data_dir, tmp_path, monkeypatch):
    from itmkit.train.trainer import TrainingDivergedError

    poisoned = {"on": False}
    original = ToyModel.similarity
    monkeypatch.setattr(ToyModel, "similarity",
                        lambda self, i, c, **kw: original(self, i, c, **kw) * (float("nan") if poisoned["on"] else 1.0))

    def on_step(state):
        poisoned["on"] = state.global_step >= 9  # epoch 2 (7 steps per epoch), after the step-8 checkpoint

    cfg = toy_config(data_dir, **{"train.epochs": 3, "train.checkpoint_every_steps": 4})
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"run: epoch 2, step 10: the training loss is nan; training "
                       r"stopped .* checkpoint\.pt keeps the last good state \(epoch 2, step 8\)\. Lower train\.lr"):
        train(cfg, out, progress=False, on_step=on_step)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["state"]["global_step"] == 8
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert load_checkpoint(out / "model_best.pt")["epoch"] == 1
    assert len(pd.read_csv(out / "log.csv")) == 1


def test_train_step_refuses_a_non_finite_gradient_without_touching_the_weights(toy_method, data_dir):
    from itmkit.data.loaders import PairDataset, train_batches
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import build_text_pipeline
    from itmkit.train.trainer import NonFiniteLossError, train_step

    split = PrecompSplit.open(data_dir, "train")
    pipeline = build_text_pipeline(TextConfig(kind="bigru", vocab_threshold=1), split.captions, data_dir)
    model = ToyModel(ToyConfig(), pipeline.vocab_size)
    batch = next(train_batches(PairDataset(split, pipeline, train=False), 8, seed=0, epoch=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.image.weight.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="the gradient norm is"):
        train_step(model, batch, optimizer, scaler, 0.2, True, grad_clip=2.0, use_amp=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_dev_scores_stop_the_run_naming_the_epoch(toy_method, data_dir, tmp_path, monkeypatch):
    from itmkit.train.trainer import TrainingDivergedError

    original = ToyModel.similarity
    monkeypatch.setattr(ToyModel, "similarity",
                        lambda self, i, c, **kw: original(self, i, c, **kw) * (1.0 if self.training else float("nan")))
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 8: the dev scores are not finite \(scores of "
                       r"ToyModel on .*/dev: expected finite scores"):
        train(toy_config(data_dir, **{"train.epochs": 1}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model_best.pt").exists()


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


@pytest.mark.parametrize("log_name", ["log.csv", "steps.csv"])
def test_a_kill_between_checkpoint_and_log_loses_no_row(toy_method, data_dir, tmp_path, monkeypatch, log_name):
    import itmkit.train.trainer as trainer

    cfg = toy_config(data_dir)  # 2 epochs
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    # the final epoch's checkpoint.pt has been replaced; the process dies before the log is written
    real_write_csv = trainer.write_csv
    writes = {"n": 0}

    def dying_write_csv(path, frame):
        if path.name == log_name:
            writes["n"] += 1
            if writes["n"] == 2:
                assert load_checkpoint(path.parent / "checkpoint.pt")["state"]["epoch"] == 2
                raise Killed(f"killed before writing {log_name}")
        real_write_csv(path, frame)

    monkeypatch.setattr(trainer, "write_csv", dying_write_csv)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        train(cfg, killed, progress=False)
    monkeypatch.setattr(trainer, "write_csv", real_write_csv)
    train(cfg, killed, progress=False)
    again = train(cfg, killed, progress=False)  # a finished run read back from its files
    cols = ["epoch", "step", "loss", "lr", "max_violation", "rsum", "collapsed"]
    pd.testing.assert_frame_equal(pd.read_csv(full / "log.csv")[cols], pd.read_csv(killed / "log.csv")[cols])
    pd.testing.assert_frame_equal(pd.read_csv(full / "steps.csv"), pd.read_csv(killed / "steps.csv"))
    assert again.log["epoch"].tolist() == [1, 2]


def test_stale_temporary_files_are_cleaned_up(toy_method, data_dir, tmp_path):
    out = tmp_path / "run"
    train(toy_config(data_dir, **{"train.epochs": 1}), out, progress=False, max_steps=2)
    # what a kill during torch.save / write_csv leaves (atomic_path's names)
    stale = [out / ".checkpoint.pt.x1y2z3w4.tmp", out / ".log.csv.a_b_c_d1.tmp", out / ".model_best.pt.qwertyui.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    mine = out / "notes.txt"
    mine.write_text("kept")
    train(toy_config(data_dir, **{"train.epochs": 1}), out, progress=False)
    assert not any(p.exists() for p in stale) and mine.exists()
    assert not list(out.glob(".*tmp*"))


def _flip_bytes_inside_largest_tensor(path, count=64):
    """XOR ``count`` bytes in the middle of the largest tensor record of a torch zip file."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - count // 2
    raw[start : start + count] = bytes(b ^ 0xFF for b in raw[start : start + count])
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as patch:
        module = types.ModuleType("itmkit_test_toy_method")
        module.METHOD = MethodSpec("toy", ToyConfig, toy_build, {"smoke": toy_preset}, spec="tests")
        patch.setitem(sys.modules, module.__name__, module)
        patch.setitem(registry.METHOD_MODULES, "toy", module.__name__)
        train(toy_config(data_dir, **{"train.epochs": 1}), out, progress=False)
    return out


def test_flipped_bytes_in_a_checkpoint_are_an_error_naming_file_and_tensor(toy_method, finished_run, tmp_path):
    import shutil

    from itmkit.cli import main
    from itmkit.train.checkpoint import CorruptCheckpointError

    path = tmp_path / "model_best.pt"
    shutil.copy(finished_run / "model_best.pt", path)
    before = torch.load(path, weights_only=True)["model"]
    _flip_bytes_inside_largest_tensor(path)
    after = torch.load(path, weights_only=True)["model"]  # torch itself loads the damaged file silently
    damaged = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(damaged) == 1
    with pytest.raises(CorruptCheckpointError, match=rf"model_best\.pt: integrity check failed: tensor "
                       rf"model/{damaged[0]} does not match the sha256 stored when the file was saved"):
        load_run(path, device="cpu")
    assert main(["eval", str(path), "--quiet"]) == 1


def test_misshaped_or_non_finite_weights_name_the_key(toy_method, finished_run, tmp_path, capsys):
    from itmkit.cli import main
    from itmkit.train.checkpoint import save_checkpoint

    ckpt = load_checkpoint(finished_run / "model_best.pt")
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "version", "integrity")}
    misshaped = dict(payload, model={**payload["model"], "image.weight": torch.zeros(16, 9)})
    save_checkpoint(tmp_path / "misshaped.pt", misshaped)
    with pytest.raises(ValueError, match=r"misshaped\.pt: field 'model': the weights do not fit the ToyModel .*\n"
                                         r"(.|\n)*misshaped: image\.weight: expected \[16, 8\], found \[16, 9\]"):
        load_run(tmp_path / "misshaped.pt", device="cpu")
    assert main(["eval", str(tmp_path / "misshaped.pt"), "--quiet"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    weights = {k: v.clone() for k, v in payload["model"].items()}
    weights["text.weight"][3, 1] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", dict(payload, model=weights))
    with pytest.raises(ValueError, match=r"nan\.pt: field 'model\.text\.weight': expected finite weights, found 1 NaN"):
        load_run(tmp_path / "nan.pt", device="cpu")


def test_version_1_checkpoints_load_without_the_integrity_check(toy_method, finished_run, tmp_path):
    ckpt = load_checkpoint(finished_run / "model_best.pt")
    legacy = {k: v for k, v in ckpt.items() if k != "integrity"}
    legacy["version"] = 1
    torch.save(legacy, tmp_path / "old.pt")
    model, _, _ = load_run(tmp_path / "old.pt", device="cpu")
    assert torch.equal(model.state_dict()["image.weight"], ckpt["model"]["image.weight"])
    no_digest = dict(legacy, version=2)
    torch.save(no_digest, tmp_path / "stripped.pt")
    with pytest.raises(ValueError, match=r"stripped\.pt: field 'integrity': expected the sha256 digests"):
        load_checkpoint(tmp_path / "stripped.pt")


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_nan_region_in_the_features_stops_training_naming_file_and_row(toy_method, data_dir, tmp_path, split):
    import shutil

    from itmkit.data.errors import DataFormatError

    poisoned = tmp_path / "data"
    shutil.copytree(data_dir, poisoned)
    feats = np.load(poisoned / f"{split}_ims.npy")
    feats[3, 1, 0] = np.nan  # one region of one image (used to give dev and test rsum 600)
    np.save(poisoned / f"{split}_ims.npy", feats)
    cfg = toy_config(poisoned, **{"train.epochs": 1})
    with pytest.raises(DataFormatError, match=rf"{split}_ims\.npy: row 3, region 1, dim 0: expected finite region "
                                              "features, found nan"):
        train(cfg, tmp_path / "run", progress=False)


def test_nearly_collapsed_epochs_warn_but_stay_candidates(toy_method, data_dir, tmp_path, monkeypatch):
    from itmkit.evaluate.collapse import ScoreCollapseWarning

    original = ToyModel.similarity

    def squeezed(self, images, captions, **kw):  # dev scores squeezed around 0.5, order kept
        scores = original(self, images, captions, **kw)
        return 0.5 + 2e-4 * scores if (not self.training and len(images) == 12) else scores

    monkeypatch.setattr(ToyModel, "similarity", squeezed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(toy_config(data_dir), tmp_path / "run", progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, ScoreCollapseWarning)]
    assert len(messages) == 2 and all("the dev scores have nearly collapsed (std" in m for m in messages)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert not log["collapsed"].any() and (log["score_spread"] < 1e-3).all() and (log["score_spread"] > 1e-5).all()
    assert result.finished and result.best_epoch == int(log["rsum"].idxmax()) + 1
