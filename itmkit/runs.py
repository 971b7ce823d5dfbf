"""Open a trained run: ``load_run(run_dir or checkpoint) -> (model, run_cfg, pipeline)``.

A checkpoint written by :mod:`itmkit.train` carries its config and text pipeline, so a
``model_best.pt`` copied anywhere evaluates alone (``itmkit eval model_best.pt --data DIR``).
This module sits above the trainer: the trainer itself reads its checkpoints through
:func:`itmkit.train.checkpoint.model_from_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from itmkit.config import RunConfig
from itmkit.models.base import MatchingModel
from itmkit.train.checkpoint import model_from_checkpoint


def resolve_checkpoint(path_or_ckpt: str | Path) -> Path:
    """A run directory -> its ``model_best.pt`` (else ``checkpoint.pt``); a file -> itself."""
    path = Path(path_or_ckpt)
    if path.is_dir():
        for name in ("model_best.pt", "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: a run directory needs model_best.pt or checkpoint.pt; neither is there")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such run directory or checkpoint file")
    return path


def load_run(path_or_ckpt: str | Path, device: str | torch.device | None = None) -> tuple[MatchingModel, RunConfig, Any]:
    """``(model in eval mode on device, run_cfg, text pipeline)`` from a run dir or checkpoint.

    ``device=None`` picks cuda / mps / cpu. Weights load strictly: a checkpoint that does not
    fit the model its config builds raises ``ValueError`` naming each missing, unexpected or
    misshaped key (with the expected and the found shape); NaN or Inf weights raise naming the
    tensor; a damaged file fails its integrity check (:func:`~itmkit.train.checkpoint.load_checkpoint`).
    """
    return model_from_checkpoint(resolve_checkpoint(path_or_ckpt), device)


def shared_run_dir(root: str | Path, method: str, cfg: RunConfig, variant: str | None = None) -> Path:
    """The folder of a run that several notebooks or studies share: ``<root>/<name>``.

    ``name`` is ``<method>[-<variant>]-<preset>-seed<seed>-<hash>``, the hash taken over the whole
    config (``cfg.to_json()``), so two callers asking for the same settings land in the same
    folder (the trainer then returns the finished run, or resumes an unfinished one) and any
    difference in settings, however small, gives a new folder. ``variant`` only makes the name
    readable (``sgraf-saf-course-seed0-...``); the settings that make the variant are in the hash.
    """
    import hashlib

    digest = hashlib.sha1(cfg.to_json().encode()).hexdigest()[:8]
    label = f"{method}-{variant}" if variant else method
    return Path(root).resolve() / f"{label}-{cfg.preset}-seed{cfg.train.seed}-{digest}"

