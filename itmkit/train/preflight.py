"""What :func:`itmkit.train.trainer.train` checks before it writes anything (issue 14 §3-§4).

A run folder that gets a ``config.json`` should hold a run that can start: every setting has
been checked by name, type and range, the method exists and its model config is its own, the
device exists, and the files the config names are there. Each problem raises a ``ValueError``
(or ``KeyError`` for an unknown method) naming the setting or file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from itmkit.config import ConfigError, RunConfig, check_config
from itmkit.data.errors import DataFormatError
from itmkit.data.text import check_hf_folder
from itmkit.methods.registry import get_method
from itmkit.runtime import pick_device


def check_max_steps(max_steps: int | None) -> None:
    """``None`` or an integer >= 1 (0 would train one step before; now it is refused)."""
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps: expected an integer >= 1 or None, found {max_steps!r}")


def preflight(run_cfg: RunConfig, device: str | torch.device | None = None) -> torch.device:
    """Check ``run_cfg`` and what it names; return the device the run will use.

    Checks: every field (:func:`itmkit.config.check_config`), the method is registered and
    ``run_cfg.model`` is its config class, the device (``device`` or ``train.device``) exists,
    ``data.data_dir`` is a folder, ``text.vocab_path`` a file, ``text.hf_path`` (or the default
    MiniLM) a complete Hugging Face folder when ``text.kind == "hf"``.
    """
    check_config(run_cfg)
    spec = get_method(run_cfg.method)
    if not isinstance(run_cfg.model, spec.config_cls):
        raise ConfigError("model", f"a {spec.config_cls.__name__} (method {run_cfg.method!r})",
                          type(run_cfg.model).__name__)  # fmt: skip
    chosen = pick_device(str(device) if device is not None else run_cfg.train.device)
    if run_cfg.data.data_dir is not None and not Path(run_cfg.data.data_dir).is_dir():
        raise DataFormatError(run_cfg.data.data_dir, "data.data_dir", "a precomp folder", "no such folder")
    text = run_cfg.text
    if text.kind == "bigru" and text.vocab_path is not None and not Path(text.vocab_path).is_file():
        raise DataFormatError(text.vocab_path, "text.vocab_path", "a vocabulary JSON file", "no such file")
    if text.kind == "hf":
        check_hf_folder(text.hf_path, weights=True)
    return chosen
