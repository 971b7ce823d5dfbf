"""The trainer's ``training_loss`` hook: a model that defines it supplies the loss of every step from
the batch's training-mode encodings, with the right step / epoch / hinge settings; resume keeps
the step count; models without it keep the hinge loss."""

import sys
import types
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig, replace_nested
from itmkit.encoded import Encoded
from itmkit.evaluate.synthetic_precomp import write_synthetic_precomp
from itmkit.losses import hinge_triplet_loss
from itmkit.methods import registry
from itmkit.methods.registry import MethodSpec
from itmkit.models.base import MatchingModel
from itmkit.train.trainer import train, train_step


@dataclass
class HookConfig:
    img_dim: int = 8
    embed_size: int = 8


class HookModel(MatchingModel):
    """Mean-pooled toy encoders; its loss is a plain function of the scores so it can be recomputed."""

    pairwise = False

    def __init__(self, cfg: HookConfig, vocab_size: int):
        super().__init__()
        self.image = nn.Linear(cfg.img_dim, cfg.embed_size)
        self.embed = nn.Embedding(vocab_size, cfg.embed_size)
        self.calls: list[dict] = []

    def encode_images(self, images, lengths):
        return Encoded(nn.functional.normalize(self.image(images.sum(1) / lengths[:, None]), dim=-1),
                       extras={"training": torch.full((len(images),), float(self.training))})  # fmt: skip

    def encode_captions(self, tokens, lengths):
        return Encoded(nn.functional.normalize(self.embed(tokens).sum(1) / lengths[:, None], dim=-1))

    def training_loss(self, images, captions, batch, *, step, epoch, margin, max_violation):
        self.calls.append({"step": step, "epoch": epoch, "margin": margin, "max_violation": max_violation,
                           "training": bool(images.extras["training"].all()), "batch": len(batch)})  # fmt: skip
        scores = images.feats @ captions.feats.t()
        return (1.0 - scores.diagonal()).sum() * (step + 1)


def hook_preset():
    return RunConfig(method="hook", model=HookConfig(), text=TextConfig(kind="bigru"),
                     data=DataConfig(region_drop=0.0, caption_augment=False),
                     train=TrainConfig(epochs=2, batch_size=16, lr=1e-3, lr_decay_epochs=(), device="cpu",
                                       margin=0.3, sum_warmup_epochs=1, log_every_steps=1, eval_batch_size=64))  # fmt: skip


@pytest.fixture
def hook_method(monkeypatch):
    module = types.ModuleType("itmkit_test_hook_method")
    module.METHOD = MethodSpec("hook", HookConfig, lambda cfg, vocab: HookModel(cfg.model, vocab), {"smoke": hook_preset})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.METHOD_MODULES, "hook", module.__name__)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_precomp(tmp_path_factory.mktemp("precomp"), {"train": 8, "dev": 4, "test": 4})


def test_trainer_uses_the_models_loss_with_step_and_epoch(hook_method, data_dir, tmp_path):
    cfg = replace_nested(hook_preset(), {"data.data_dir": str(data_dir)})
    result = train(cfg, tmp_path / "run", progress=False)
    calls = result.model.calls
    steps_per_epoch = -(-40 // 16)  # 8 images x 5 captions in batches of 16
    assert [c["step"] for c in calls] == list(range(2 * steps_per_epoch))
    assert [c["epoch"] for c in calls] == [0] * steps_per_epoch + [1] * steps_per_epoch
    assert all(c["training"] and c["margin"] == 0.3 for c in calls)
    assert [c["max_violation"] for c in calls] == [False] * steps_per_epoch + [True] * steps_per_epoch
    # the logged per-step loss is the hook's value (it grows with the step factor)
    steps = pd.read_csv(tmp_path / "run" / "steps.csv")
    assert len(steps) == 2 * steps_per_epoch and steps["loss"].iloc[-1] > steps["loss"].iloc[0]


def test_resume_continues_the_step_count(hook_method, data_dir, tmp_path):
    cfg = replace_nested(hook_preset(), {"data.data_dir": str(data_dir)})
    first = train(cfg, tmp_path / "run", progress=False, max_steps=4)
    assert [c["step"] for c in first.model.calls] == [0, 1, 2, 3]
    rest = train(cfg, tmp_path / "run", progress=False)
    assert [c["step"] for c in rest.model.calls] == [4, 5]


def test_train_step_returns_the_hook_loss_and_plain_models_keep_the_hinge():
    torch.manual_seed(0)
    from itmkit.data.loaders import Batch

    batch = Batch(torch.randn(4, 3, 8), torch.tensor([3, 3, 2, 1]), torch.randint(1, 9, (4, 5)),
                  torch.tensor([5, 4, 3, 2]), torch.arange(4), torch.arange(4))  # fmt: skip
    model = HookModel(HookConfig(), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with torch.no_grad():
        images, captions = model.encode_images(batch.images, batch.img_lengths), model.encode_captions(batch.tokens, batch.cap_lengths)
        expected = float((1.0 - (images.feats * captions.feats).sum(1)).sum() * 8)
    assert train_step(model, batch, optimizer, scaler, 0.2, True, 0.0, False, step=7) == pytest.approx(expected, rel=1e-6)

    plain = HookModel(HookConfig(), 10)
    plain.training_loss = None  # no hook: the trainer's hinge
    with torch.no_grad():
        scores = plain.encode_images(batch.images, batch.img_lengths).feats @ plain.encode_captions(batch.tokens, batch.cap_lengths).feats.t()
    loss = train_step(plain, batch, optimizer, scaler, 0.2, True, 0.0, False, step=7)
    assert loss == pytest.approx(float(hinge_triplet_loss(scores, 0.2, True)), rel=1e-6)
