"""What a course notebook calls: its parameters into a run configuration, comparison runs, and
its outputs into ``metrics.json`` (the file the runner's summary reads).

Every notebook's parameters cell holds ``data_dir``, ``preset``, ``epochs``, ``device``, ``seed``
and ``out_dir`` (``../shared/COURSE.md``, ``docs/notebooks_howto.md``); these helpers turn them
into what the package needs, so the notebooks themselves define no logic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# notebook preset -> embedded data-set preset, for notebooks that use data but no method
EMBEDDED_PRESET_OF = {"smoke": "tiny", "course": "course"}


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents) and return it as a :class:`Path`."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_preset_for(preset: str, fallback: str | None = None) -> str:
    """The embedded data-set preset a notebook preset reads: ``smoke`` -> ``tiny``, ``course`` ->
    ``course``. ``paper`` has no embedded set (it needs real precomp data, ``data_dir``): it
    raises, unless ``fallback`` names the embedded preset to show instead (notebooks that only
    demonstrate a step on the embedded set, like ``01_features``)."""
    if preset not in EMBEDDED_PRESET_OF and fallback is not None:
        return fallback
    if preset not in EMBEDDED_PRESET_OF:
        raise ValueError(
            f"notebook parameter 'preset': expected one of {sorted(EMBEDDED_PRESET_OF)} for the "
            f"embedded data set, found {preset!r} (the paper preset needs data_dir=<precomp folder>)"
        )
    return EMBEDDED_PRESET_OF[preset]


def notebook_run_config(
    method: str,
    preset: str,
    *,
    data_dir: str | Path | None = None,
    epochs: int | None = None,
    device: str = "auto",
    seed: int = 0,
):
    """The :class:`~itmkit.config.RunConfig` a notebook trains with, from its parameters cell.

    The notebook preset is the method preset (``get_method(method).preset(preset)``: ``smoke``
    reads the embedded ``tiny`` set, ``course`` the embedded ``course`` set, ``paper`` the paper's
    recipe and needs ``data_dir``); then ``data_dir``, ``epochs`` (when not None), ``device`` and
    ``seed`` override ``data.data_dir``, ``train.epochs``, ``train.device``, ``train.seed``.
    """
    from itmkit.config import replace_nested
    from itmkit.methods.registry import get_method

    cfg = get_method(method).preset(preset)
    if preset.startswith("paper") and data_dir is None and cfg.data.data_dir is None:
        raise ValueError(
            f"notebook parameter 'data_dir': expected a precomp folder for preset {preset!r}, "
            "found None (the paper recipe runs on real features; use smoke or course for the "
            "embedded set)"
        )
    overrides: dict[str, Any] = {"train.device": device, "train.seed": int(seed)}
    if data_dir is not None:
        overrides["data.data_dir"] = str(data_dir)
    if epochs is not None:
        if int(epochs) < 1:
            raise ValueError(f"notebook parameter 'epochs': expected a positive integer, found {epochs!r}")
        overrides["train.epochs"] = int(epochs)
    return replace_nested(cfg, overrides)


def shared_runs_dir(out_dir: str | Path) -> Path:
    """Where a course run keeps runs that several notebooks share: ``<out_dir>/../_shared_runs``."""
    return Path(out_dir).resolve().parent / "_shared_runs"


def comparison_run(
    method: str,
    preset: str,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    epochs: int | None = None,
    device: str = "auto",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    variant: str | None = None,
    progress: bool = False,
):
    """Train (or reuse) a run a notebook shows or compares against, e.g. VSE∞ beside SCAN.

    Runs live in :func:`shared_runs_dir` under :func:`itmkit.runs.shared_run_dir`'s name
    (method, variant, preset, seed and a hash of the whole config), so in one course run the first
    notebook that needs VSE∞ trains it and the later ones reuse the finished run (the trainer
    returns a finished run without training, and resumes an unfinished one). A notebook run on
    its own simply trains it: nothing depends on what another notebook left behind, and the hash
    keeps runs of different settings apart. ``preset`` may be a method variant preset such as
    ``course-t2i-avg``; ``paper-*`` variants of another method fall back to that method's
    ``paper`` preset. ``variant`` names one of the method's registered variants
    (``get_method(method).variants``, e.g. SGRAF's ``"saf"``), whose settings are applied first;
    ``overrides`` are further dotted settings (``{"model.module": "SAF"}``) applied after it.
    Returns the trainer's :class:`~itmkit.train.trainer.RunResult`.
    """
    from itmkit.config import replace_nested
    from itmkit.methods.registry import get_method
    from itmkit.runs import shared_run_dir
    from itmkit.train.trainer import train

    spec = get_method(method)
    if preset not in spec.presets:
        preset = preset.split("-")[0]  # a variant of another method: the base recipe of this one
    cfg = notebook_run_config(method, preset, data_dir=data_dir, epochs=epochs, device=device, seed=seed)
    settings: dict[str, Any] = {}
    if variant is not None:
        if variant not in spec.variants:
            raise KeyError(f"method {method!r}: no variant {variant!r}; available: {sorted(spec.variants)}")
        settings.update(spec.variants[variant])
    settings.update(overrides or {})
    if settings:
        cfg = replace_nested(cfg, settings)
    return train(cfg, shared_run_dir(shared_runs_dir(out_dir), method, cfg, variant), resume=True, progress=progress)


def _scalar(key: str, value: Any, path: Path) -> Any:
    """A JSON scalar for ``metrics.json``; numpy/torch scalars are unwrapped, nesting refused."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(
        f"{path}: field {key!r}: expected a scalar (number, string, bool or None) so the course "
        f"summary can tabulate it, found {type(value).__name__}"
    )


def write_metrics(out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write a flat ``metrics.json`` into ``out_dir`` (keys sorted) and return its path.

    Nested values raise ``TypeError`` naming the key: the batch summary reads only flat scalars.
    Non-finite floats are stored as ``null`` (JSON has no NaN).
    """
    path = prepare_out_dir(out_dir) / "metrics.json"
    flat = {str(k): _scalar(str(k), v, path) for k, v in metrics.items()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a half-written metrics.json never reaches the summary
    return path


def read_metrics(out_dir: str | Path) -> dict[str, Any]:
    """The flat metrics a notebook wrote to ``out_dir/metrics.json`` ({} when it wrote none)."""
    path = Path(out_dir) / "metrics.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, found {type(data).__name__}")
    return data
