"""Run checkpoints: written atomically, readable with ``torch.load(weights_only=True)``.

Two files per run directory:

- ``checkpoint.pt``: everything to continue a run exactly (model, optimizer, scheduler, AMP
  scaler, epoch, step within the epoch, best rsum, history, RNG states) plus the config and the
  text pipeline, written at each epoch end and every ``checkpoint_every_steps`` steps.
- ``model_best.pt``: the weights with the best dev rsum, the config and the text pipeline,
  so ``itmkit eval model_best.pt`` needs nothing else.

Only tensors, numbers, strings, lists and dicts are stored (RNG states are converted), so
loading never unpickles arbitrary objects (baselines.md §F.2: resume restores everything).

Integrity (format version 2): :func:`save_checkpoint` stores under ``"integrity"`` the sha256 of
every tensor (its dtype, shape and bytes, by its path in the payload, e.g.
``model/image.fc.weight``) and one of everything else; :func:`load_checkpoint` recomputes them
and raises :class:`CorruptCheckpointError` naming the file and the damaged tensor. torch's zip
container checks nothing of the kind: flipped bytes inside a tensor loaded silently before.
Version-1 files (written before the check existed) load without it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from itmkit.config import config_from_run_dict
from itmkit.checkpoints import compare_state_dicts
from itmkit.evaluate.atomic_write import atomic_path
from itmkit.methods.registry import get_method
from itmkit.runtime import pick_device
from itmkit.train.pipeline_state import pipeline_from_description

CHECKPOINT_FORMAT = "itmkit-run-checkpoint"
FORMAT_VERSION = 2
INTEGRITY_KEY = "integrity"


class CorruptCheckpointError(ValueError):
    """A checkpoint's contents no longer match the digests stored when it was saved."""


def _tensor_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


def _walk(value: Any, path: str, tensors: dict[str, str], rest: "hashlib._Hash") -> None:
    """Hash each tensor into ``tensors[path]`` and the layout and plain values into ``rest``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = _tensor_digest(value)
        rest.update(f"<tensor {path}>".encode())
    elif isinstance(value, Mapping):
        rest.update(f"{{{type(value).__name__}:{len(value)}".encode())
        for key, item in value.items():
            rest.update(f"{key!r}=".encode())
            _walk(item, f"{path}/{key}" if path else str(key), tensors, rest)
        rest.update(b"}")
    elif isinstance(value, (list, tuple)):
        rest.update(f"[{type(value).__name__}:{len(value)}".encode())
        for index, item in enumerate(value):
            _walk(item, f"{path}/{index}" if path else str(index), tensors, rest)
        rest.update(b"]")
    else:
        rest.update(f"{type(value).__name__}:{value!r};".encode())


def integrity_digests(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``{"algorithm": "sha256", "tensors": {path: hex}, "rest": hex}`` of a checkpoint payload
    (its ``"integrity"`` entry excluded)."""
    tensors: dict[str, str] = {}
    rest = hashlib.sha256()
    _walk({k: v for k, v in payload.items() if k != INTEGRITY_KEY}, "", tensors, rest)
    return {"algorithm": "sha256", "tensors": tensors, "rest": rest.hexdigest()}


def verify_integrity(payload: Mapping[str, Any], path: str | Path) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` and the damaged parts when the
    payload does not match its stored digests."""
    stored = payload.get(INTEGRITY_KEY)
    if not isinstance(stored, Mapping) or stored.get("algorithm") != "sha256":
        raise CorruptCheckpointError(
            f"{path}: field {INTEGRITY_KEY!r}: expected the sha256 digests a version-{FORMAT_VERSION} checkpoint "
            f"carries, found {type(stored).__name__ if not isinstance(stored, Mapping) else dict(stored).get('algorithm')!r}: "
            "the file is corrupt or was not written by itmkit"
        )
    found = integrity_digests(payload)
    want = dict(stored.get("tensors", {}))
    damaged = sorted(k for k in set(want) | set(found["tensors"]) if want.get(k) != found["tensors"].get(k))
    if damaged:
        shown = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        raise CorruptCheckpointError(
            f"{path}: integrity check failed: tensor {shown} does not match the sha256 stored when the file was "
            "saved: the file is corrupt (damaged on disk or in a copy). Use another copy; a run folder's "
            "checkpoint.pt and model_best.pt are written anew by training again (a new folder or --no-resume)"
        )
    if found["rest"] != stored.get("rest"):
        raise CorruptCheckpointError(
            f"{path}: integrity check failed: the non-tensor contents (config, text pipeline, training state) "
            "do not match the sha256 stored when the file was saved: the file is corrupt. Use another copy"
        )


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temp file beside ``path``, then ``os.replace`` (never half-written);
    the payload gets ``format``, ``version`` and its integrity digests."""
    payload = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, **payload}
    payload[INTEGRITY_KEY] = integrity_digests(payload)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying its integrity (version 2);
    other or damaged files raise naming the file and the field."""
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
    if payload.get("version", 1) >= 2:
        verify_integrity(payload, path)
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
    load_model_weights(model, ckpt["model"], path)
    target = pick_device("auto" if device is None else str(device))
    return model.to(target).eval(), run_cfg, pipeline


def load_model_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load a checkpoint's ``model`` state into ``model``: every key and shape must match and
    every floating tensor must be finite, else ``ValueError`` naming ``source``, the key, the
    expected and the found shape (or the non-finite count). Nothing is loaded then."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: field 'model': expected a state dict, found {type(state).__name__}")
    report = compare_state_dicts(model.state_dict(), state)
    if not report.ok:
        raise ValueError(f"{source}: field 'model': the weights do not fit the {type(model).__name__} that the "
                         f"checkpoint's config builds:\n{report}")  # fmt: skip
    check_finite_weights(state, source)
    model.load_state_dict(dict(state), strict=True)


def check_finite_weights(state: Mapping[str, torch.Tensor], source: str | Path, field: str = "model") -> None:
    """``ValueError`` naming the first floating tensor of ``state`` that holds NaN or Inf."""
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(tensor).sum())
                raise ValueError(
                    f"{source}: field '{field}.{key}': expected finite weights, found {n_nan} NaN and "
                    f"{int((~finite).sum()) - n_nan} infinite of {tensor.numel()} values: the model diverged "
                    "before this was saved; it cannot score anything"
                )


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


def weight_difference(a: str | Path | dict[str, Any], b: str | Path | dict[str, Any]) -> float:
    """The largest absolute difference between two models' floating-point weights: two run
    checkpoints (``checkpoint.pt`` / ``model_best.pt``) or two state dicts with the same keys."""
    states = []
    for source in (a, b):
        if isinstance(source, (str, Path)):
            source = torch.load(source, map_location="cpu", weights_only=False)["model"]
        states.append(source)
    first, second = states
    if first.keys() != second.keys():
        raise KeyError(f"weight_difference: the models differ in their weights' names: "
                       f"{sorted(set(first) ^ set(second))[:5]}")  # fmt: skip
    return max((float((first[k].float() - second[k].float()).abs().max()) for k in first
                if first[k].is_floating_point()), default=0.0)  # fmt: skip
