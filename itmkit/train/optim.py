"""Optimiser and learning-rate schedule of a run (baselines.md §B.6)."""

from __future__ import annotations

import torch

from itmkit.config import TrainConfig
from itmkit.models.base import MatchingModel


def build_optimizer(model: MatchingModel, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or Adam) over ``model.param_groups``: a pretrained text ``backbone`` trains at
    ``lr * backbone_lr_scale`` (VSE∞ BERT: x0.1), everything else at ``lr``."""
    groups = model.param_groups(train_cfg.lr, train_cfg.backbone_lr_scale)
    if not any(group["params"] for group in groups):
        raise ValueError(f"{type(model).__name__}: no trainable parameters")
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    raise ValueError(f"TrainConfig.optimizer: expected 'adamw' or 'adam', found {train_cfg.optimizer!r}")


def lr_factor(epoch: int, train_cfg: TrainConfig) -> float:
    """LR multiplier of 0-based ``epoch``: ``decay_factor ** (#decay epochs <= epoch)``.

    VSE∞ multiplies every group's LR by 0.1 from epoch 15 on (``lr_update``); with several
    decay epochs the factors compound.
    """
    return train_cfg.lr_decay_factor ** sum(epoch >= boundary for boundary in train_cfg.lr_decay_epochs)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Step decay, stepped once per epoch end. A ``LambdaLR`` keeps its state plain data (epoch
    count and base LRs), so it saves and resumes exactly (the reference re-applied its decay only
    at ``epoch == lr_update`` and lost it on resume, §F.2)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, train_cfg))
