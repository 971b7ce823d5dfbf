"""Open a trained run: ``load_run(run_dir or checkpoint) -> (model, run_cfg, pipeline)``.

A checkpoint written by :mod:`itmkit.train` carries its config and text pipeline, so a
``model_best.pt`` copied anywhere evaluates alone (``itmkit eval model_best.pt --data DIR``).
This module sits above the trainer: the trainer itself reads its checkpoints through
:func:`itmkit.train.checkpoint.model_from_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
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
    config (:func:`itmkit.config.identity_json`), so two callers asking for the same settings land in the same
    folder (the trainer then returns the finished run, or resumes an unfinished one) and any
    difference in settings, however small, gives a new folder. ``variant`` only makes the name
    readable (``sgraf-saf-course-seed0-...``); the settings that make the variant are in the hash.
    """
    import hashlib

    from itmkit.config import identity_json

    digest = hashlib.sha1(identity_json(cfg).encode()).hexdigest()[:8]
    label = f"{method}-{variant}" if variant else method
    return Path(root).resolve() / f"{label}-{cfg.preset}-seed{cfg.train.seed}-{digest}"


def run_table(runs: Mapping[str, Any], seconds: Mapping[str, float] | None = None) -> "pd.DataFrame":
    """One row per trainer result (``label -> RunResult``): the six test recalls, rsum, training
    seconds (from ``seconds`` when given, else the run's own) and best epoch."""
    import pandas as pd

    from itmkit.evaluate.protocols import summary_rows

    names = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    rows = []
    for label, result in runs.items():
        row = {"run": label, **summary_rows(result.test_metrics).iloc[0][names].astype(float).to_dict()}
        row["train_seconds"] = float(seconds[label]) if seconds and label in seconds else float(result.seconds)
        row["best_epoch"] = int(result.best_epoch)
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
