"""Open a trained run: ``load_run(run_dir or checkpoint) -> (model, run_cfg, pipeline)``.

A checkpoint written by :mod:`itmkit.train` carries its config and text pipeline, so a
``model_best.pt`` copied anywhere evaluates alone (``itmkit eval model_best.pt --data DIR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from itmkit.config import RunConfig, config_from_dict
from itmkit.methods.registry import get_method
from itmkit.models.base import MatchingModel
from itmkit.runtime import pick_device
from itmkit.train.checkpoint import load_checkpoint, load_model_weights
from itmkit.train.pipeline_state import pipeline_from_description


def config_from_run_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Rebuild a :class:`RunConfig` from ``run_cfg.to_dict()`` output; the model part through the
    registered method's ``config_cls``."""
    if not isinstance(data, dict) or "method" not in data or "model" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{source}: field 'config': expected a RunConfig dict with 'method' and 'model', found {found}")
    spec = get_method(data["method"])
    model_cfg = config_from_dict(spec.config_cls, data["model"])
    rest = {key: value for key, value in data.items() if key != "model"}
    run_cfg = config_from_dict(RunConfig, {**rest, "model": None})
    run_cfg.model = model_cfg
    return run_cfg


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
    ckpt_path = resolve_checkpoint(path_or_ckpt)
    ckpt = load_checkpoint(ckpt_path)
    for key in ("config", "text_pipeline", "model"):
        if key not in ckpt:
            raise ValueError(f"{ckpt_path}: field {key!r}: expected in an itmkit checkpoint, found keys {sorted(ckpt)}")
    run_cfg = config_from_run_dict(ckpt["config"], str(ckpt_path))
    pipeline = pipeline_from_description(ckpt["text_pipeline"], str(ckpt_path))
    model = get_method(run_cfg.method).build(run_cfg, pipeline.vocab_size)
    load_model_weights(model, ckpt["model"], ckpt_path)
    target = pick_device("auto" if device is None else str(device))
    return model.to(target).eval(), run_cfg, pipeline
