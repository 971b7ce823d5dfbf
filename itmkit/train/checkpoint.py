"""Run checkpoints: written atomically, readable with ``torch.load(weights_only=True)``.

Two files per run directory:

- ``checkpoint.pt``: everything to continue a run exactly (model, optimizer, scheduler, AMP
  scaler, epoch, step within the epoch, best rsum, history, RNG states) plus the config and the
  text pipeline, written at each epoch end and every ``checkpoint_every_steps`` steps.
- ``model_best.pt``: the weights with the best dev rsum, the config and the text pipeline,
  so ``itmkit eval model_best.pt`` needs nothing else.

Only tensors, numbers, strings, lists and dicts are stored (RNG states are converted), so
loading never unpickles arbitrary objects (baselines.md §F.2: resume restores everything).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmkit.config import config_from_run_dict
from itmkit.evaluate.atomic_write import atomic_path
from itmkit.methods.registry import get_method
from itmkit.runtime import pick_device
from itmkit.train.pipeline_state import pipeline_from_description

CHECKPOINT_FORMAT = "itmkit-run-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temp file beside ``path``, then ``os.replace`` (never half-written)."""
    payload = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; other files raise naming the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign pickles
        raise ValueError(
            f"{path}: expected an itmkit checkpoint (tensors and plain data), found a file torch "
            f"cannot load safely ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Reference checkpoints are imported with the method's convert_checkpoint."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: field 'format': expected {CHECKPOINT_FORMAT!r}, found {found!r}")
    return payload


def model_from_checkpoint(path: str | Path, device: str | torch.device | None = None):
    """``(model in eval mode on device, run_cfg, text pipeline)`` from a checkpoint this trainer
    wrote (``model_best.pt`` or ``checkpoint.pt``): the config and text pipeline it carries build
    the model, whose weights then load strictly (a misfit raises naming the keys). ``device=None``
    picks cuda / mps / cpu. :func:`itmkit.runs.load_run` also takes a run directory."""
    ckpt = load_checkpoint(path)
    for key in ("config", "text_pipeline", "model"):
        if key not in ckpt:
            raise ValueError(f"{path}: field {key!r}: expected in an itmkit checkpoint, found keys {sorted(ckpt)}")
    run_cfg = config_from_run_dict(ckpt["config"], str(path))
    pipeline = pipeline_from_description(ckpt["text_pipeline"], str(path))
    model = get_method(run_cfg.method).build(run_cfg, pipeline.vocab_size)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: field 'model': state dict does not fit {type(model).__name__}; "
                         f"missing keys {list(missing)[:10]}, unexpected keys {list(unexpected)[:10]}")
    target = pick_device("auto" if device is None else str(device))
    return model.to(target).eval(), run_cfg, pipeline


# --- RNG states as plain data ---------------------------------------------------------------
def rng_state_plain() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) generator states as tensors / lists / numbers."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(np.array(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state_plain(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_state_dict(state: Any) -> Any:
    """Recursively turn dict subclasses (``Counter`` in ``MultiStepLR``) into plain dicts,
    which ``weights_only`` loading accepts."""
    if isinstance(state, dict):
        return {key: plain_state_dict(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(plain_state_dict(v) for v in state)
    return state
