"""Strict state-dict import: read reference checkpoints, rename keys, load, report by name.

The references load with ``strict=False``; with DataParallel's ``module.`` prefix that loads
nothing and evaluates a random model without a word (baselines.md §D, §F.1). Everything here
fails loudly instead, naming each missing, unexpected or misshaped key.
"""

from __future__ import annotations

import os
import pickle
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit a model; ``report`` lists the offending keys."""

    def __init__(self, source: str, report: "LoadReport") -> None:
        self.source = source
        self.report = report
        super().__init__(f"{source}: state dict does not match the model:\n{report}")


@dataclass
class LoadReport:
    """Keys the model expects but the state dict lacks, keys it does not know, and shape clashes
    (``name -> (expected shape, found shape)``). :func:`load_similarity_part` also lists the
    state's keys it left aside (``skipped``: the encoders')."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors"]
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for name, (expected, found) in self.misshaped.items():
            lines.append(f"misshaped: {name}: expected {list(expected)}, found {list(found)}")
        if self.skipped:
            lines.append(f"skipped ({len(self.skipped)}): " + ", ".join(self.skipped))
        return "\n".join(lines)


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> StateDict:
    """Remove ``prefix`` from every key that starts with it (DataParallel's ``module.``)."""
    return {(key[len(prefix) :] if key.startswith(prefix) else key): value for key, value in state.items()}


def rename_keys(state: Mapping[str, Tensor], rules: list[tuple[str, str]]) -> StateDict:
    """Rename keys by their first matching prefix rule ``(old_prefix, new_prefix)``; keys no rule
    matches are kept as they are, so a strict load reports them by name."""
    renamed: StateDict = {}
    for key, value in state.items():
        new_key = key
        for old, new in rules:
            if key.startswith(old):
                new_key = new + key[len(old) :]
                break
        if new_key in renamed:
            raise ValueError(f"rename_keys: two source keys map to {new_key!r} (second: {key!r})")
        renamed[new_key] = value
    return renamed


def add_missing_batch_counters(state: Mapping[str, Tensor]) -> StateDict:
    """``state`` with ``num_batches_tracked = 0`` added beside every BatchNorm ``running_mean``
    that lacks it: files written by PyTorch 0.4.0 have no counter (0.4.1 added it); it only
    matters for ``momentum=None``, which no reference uses."""
    filled = dict(state)
    for key in state:
        if key.endswith(".running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            filled.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return filled


def compare_state_dicts(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> LoadReport:
    """Report how ``found`` differs from ``expected`` (a model's ``state_dict()``)."""
    report = LoadReport()
    report.missing = sorted(set(expected) - set(found))
    report.unexpected = sorted(set(found) - set(expected))
    for name in sorted(set(expected) & set(found)):
        want, have = tuple(expected[name].shape), tuple(found[name].shape)
        if want != have:
            report.misshaped[name] = (want, have)
    report.loaded = len(set(expected) & set(found)) - len(report.misshaped)
    return report


def load_strict(module: nn.Module, state: Mapping[str, Tensor], source: str = "state dict") -> LoadReport:
    """Load ``state`` into ``module`` only if every key and shape matches; otherwise raise
    :class:`CheckpointMismatchError` naming the keys (nothing is loaded then)."""
    report = compare_state_dicts(module.state_dict(), state)
    if not report.ok:
        raise CheckpointMismatchError(source, report)
    module.load_state_dict(dict(state), strict=True)
    return report


def check_converted(model: nn.Module, state: Mapping[str, Tensor], source: str, method: str) -> LoadReport:
    """A converter's sanity check: ``state`` (converted from a reference checkpoint) has exactly
    the keys and shapes of ``model``, else ``ValueError`` naming ``source`` and the offending keys
    (no silent partial load). ``model`` is a freshly built instance of the target configuration."""
    report = compare_state_dicts(model.state_dict(), state)
    if not report.ok:
        raise ValueError(f"{source}: converted {method} state dict does not fit the model:\n{report}")
    return report


#: HF BERT's ``position_ids``: a fixed ``arange`` buffer that some transformers versions keep in
#: the state dict and others do not; converters drop it and :func:`load_converted` restores it.
BERT_POSITION_IDS = "text.backbone.embeddings.position_ids"


def load_converted(model: nn.Module, state: dict[str, Tensor], source: str) -> LoadReport:
    """Load a converter's ``state`` into ``model`` strictly (:func:`load_strict`), after giving it
    the model's own :data:`BERT_POSITION_IDS` buffer when the installed transformers keeps one."""
    expected = model.state_dict()
    if BERT_POSITION_IDS in expected and BERT_POSITION_IDS not in state:
        state[BERT_POSITION_IDS] = expected[BERT_POSITION_IDS]
    return load_strict(model, state, source=source)


class MissingClassStub:
    """Stands in for a class a pickle names but this environment cannot import (e.g. a
    reference repository's ``lib.vocab.Vocabulary`` inside a saved ``opt``). Keeps the state."""

    _stub_origin = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stub_args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.stub_state = state

    def __repr__(self) -> str:
        return f"<missing class {self._stub_origin}>"


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (MissingClassStub,), {"__module__": module, "_stub_origin": f"{module}.{name}"})


# torch.load subclasses ``pickle_module.Unpickler``, so a namespace with a tolerant Unpickler
# makes it resolve unknown classes to stubs instead of failing.
_TOLERANT_PICKLE = types.SimpleNamespace(
    Unpickler=_TolerantUnpickler,
    load=lambda file, **kwargs: _TolerantUnpickler(file, **kwargs).load(),
    __name__="itmkit_tolerant_pickle",
)


def read_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a reference ``.pth`` on the CPU, tolerating classes that cannot be imported.

    Reference checkpoints pickle an ``argparse.Namespace`` (``opt``), so ``weights_only=False``
    is required: only open checkpoints from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TOLERANT_PICKLE)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(checkpoint).__name__}")
    return checkpoint


def checkpoint_label(source: Any) -> str:
    """How messages name a checkpoint: its path, or ``"checkpoint dict"`` for an in-memory one."""
    return str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint dict"


def open_reference_checkpoint(source: "str | os.PathLike | Mapping[str, Any]") -> tuple[str, dict[str, Any]]:
    """``(label, checkpoint)`` for a converter: a path is read with
    :func:`read_reference_checkpoint` (tolerant unpickling), a mapping is taken as it is (a
    shallow copy); ``label`` is :func:`checkpoint_label`, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source), read_reference_checkpoint(source)
    if not isinstance(source, Mapping):
        raise TypeError(f"reference checkpoint: expected a path or a dict, found {type(source).__name__}")
    return checkpoint_label(source), dict(source)


def reference_dataset(opt: Any) -> str:
    """``"coco"`` or ``"f30k"``, from a reference run's ``opt.data_name`` (``f30k_precomp`` when
    the option is absent, as in the reference defaults)."""
    return "coco" if str(opt_value(opt, "data_name", "f30k_precomp")).startswith("coco") else "f30k"


def opt_value(opt: Any, name: str, default: Any = None) -> Any:
    """Attribute ``name`` of a saved ``opt`` (Namespace, stub or dict), or ``default``."""
    if isinstance(opt, Mapping):
        return opt.get(name, default)
    return getattr(opt, name, default)



def apply_reference_recipe(train: Any, opt: Any, recipe: Mapping[str, tuple[str, Any]]) -> None:
    """Copy the training settings a reference checkpoint stored in ``opt`` onto ``train``.

    ``recipe`` maps our :class:`~itmkit.config.TrainConfig` field to ``(reference opt name, cast)``;
    names the checkpoint lacks keep our value. ``lr_update`` (the one step decay) becomes
    ``lr_decay_epochs``.
    """
    for ours, (theirs, cast) in recipe.items():
        value = opt_value(opt, theirs)
        if value is not None:
            setattr(train, ours, cast(value))
    if opt_value(opt, "lr_update") is not None:
        train.lr_decay_epochs = (int(opt_value(opt, "lr_update")),)


def load_similarity_part(model: nn.Module, state: Mapping[str, Tensor], source: str = "state dict") -> LoadReport:
    """Load only the similarity part of ``model`` (its ``similarity_prefixes``, e.g. SGRAF's
    ``sim.*``) from ``state``, for scoring features you hold
    (:func:`itmkit.similarity.scoring.score_sets`) without the encoders the checkpoint was
    trained with.

    Strict inside the part: a similarity key missing, misshaped or unknown to the model raises
    :class:`CheckpointMismatchError` naming it (nothing is loaded then). Outside it nothing is
    loaded and nothing is refused: the report lists the model's keys left as built (``missing``:
    the encoders) and the state's keys left aside (``skipped``), by name.
    """
    prefixes = tuple(getattr(model, "similarity_prefixes", ()))
    in_part = lambda key: key.startswith(prefixes) if prefixes else False  # noqa: E731
    expected = model.state_dict()
    part = {k: v for k, v in state.items() if in_part(k)}
    report = compare_state_dicts({k: v for k, v in expected.items() if in_part(k)}, part)
    report.unexpected += sorted(k for k in state if not in_part(k) and k not in expected)
    if not report.ok:
        raise CheckpointMismatchError(source, report)
    model.load_state_dict(part, strict=False)  # exactly the part's keys, checked above
    report.missing = sorted(k for k in expected if not in_part(k))
    report.skipped = sorted(k for k in state if not in_part(k))
    return report

