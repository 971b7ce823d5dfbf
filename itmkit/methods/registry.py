"""Method registry: a method joins the kit with one file plus one line here.

Each method module defines ``METHOD = MethodSpec(...)``. Modules are imported lazily, so
importing the registry costs nothing and a broken method file only breaks its own name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from itmkit.config import RunConfig
    from itmkit.models.base import MatchingModel

# name -> module holding ``METHOD``. Adding a method: one new file + one line here.
METHOD_MODULES: dict[str, str] = {
    "vse_infty": "itmkit.methods.vse_infty",
    "scan": "itmkit.methods.scan",
    "sgraf": "itmkit.methods.sgraf",
    "chan": "itmkit.methods.chan",
    "esl": "itmkit.methods.esl",
    "hrem": "itmkit.methods.hrem",
    "lhsc": "itmkit.methods.lhsc",
    "cefg": "itmkit.methods.cefg",
    "aahr": "itmkit.methods.aahr",
}


@dataclass(frozen=True)
class MethodSpec:
    """What the spine needs to know about a method.

    Attributes:
        name: registry name (``"vse_infty"``).
        config_cls: the method's model-config dataclass (stored in ``RunConfig.model``).
        build: ``build(run_config, vocab_size) -> MatchingModel``; ``vocab_size`` is the text
            pipeline's id count (including any ``<mask>`` token), ``None`` for HF text.
        presets: preset name -> zero-argument function returning a fresh :class:`RunConfig`.
        spec: the specification file and section (``"baselines.md §B"``).
        convert_checkpoint: optional ``f(path_or_state) -> (RunConfig, state_dict)`` importer for
            the reference repository's released checkpoints.
    """

    name: str
    config_cls: type
    build: Callable[["RunConfig", "int | None"], "MatchingModel"]
    presets: dict[str, Callable[[], "RunConfig"]]
    spec: str = ""
    description: str = ""
    convert_checkpoint: Callable[..., Any] | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def preset(self, name: str) -> "RunConfig":
        if name not in self.presets:
            raise KeyError(f"method {self.name!r}: no preset {name!r}; available: {sorted(self.presets)}")
        cfg = self.presets[name]()
        cfg.preset = name
        return cfg


def available_methods() -> list[str]:
    return sorted(METHOD_MODULES)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name`` (``KeyError`` lists the known names)."""
    if name not in METHOD_MODULES:
        raise KeyError(f"unknown method {name!r}; registered: {available_methods()}")
    module = importlib.import_module(METHOD_MODULES[name])
    spec = getattr(module, "METHOD", None)
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"{METHOD_MODULES[name]} must define METHOD = MethodSpec(...)")
    return spec
