"""Strict state-dict import: read reference checkpoints, rename keys, load, report by name.

The references load with ``strict=False``; with DataParallel's ``module.`` prefix that loads
nothing and evaluates a random model without a word (baselines.md §D, §F.1). Everything here
fails loudly instead, naming each missing, unexpected or misshaped key.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import types
from collections.abc import Callable, Mapping
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
    suffix = BERT_POSITION_IDS.split("backbone.", 1)[1]  # AAHR nests its BERT deeper (text.fragments.backbone.*)
    for key, value in expected.items():
        if key.endswith(suffix) and ".backbone." in f".{key}" and key not in state:
            state[key] = value
    return load_strict(model, state, source=source)


def build_converted(convert: Callable[..., tuple[Any, dict[str, Tensor]]], build: Callable[[Any, Any], nn.Module],
                    source: Any, vocab_size: int | None = None, **convert_options: Any) -> tuple[nn.Module, Any]:
    """A method's ``load_reference_checkpoint``: ``convert(source, **convert_options)`` ->
    ``(run_cfg, state)``, ``build(run_cfg, vocab_size)``, then :func:`load_converted` (strict:
    a missing, unexpected or misshaped key raises naming it). Returns ``(model in eval mode, run_cfg)``."""
    run_cfg, state = convert(source, **convert_options)
    model = build(run_cfg, vocab_size)
    load_converted(model, state, source=checkpoint_label(source))
    return model.eval(), run_cfg


class MissingClassStub:
    """Stands in for a global a reference pickle names but that is not loaded: a class this
    environment cannot import (e.g. a reference repository's ``lib.vocab.Vocabulary`` inside a
    saved ``opt``), or any global outside the allowlist of :func:`read_reference_checkpoint`
    (``os.system`` included). Calling it, as unpickling does, only records the arguments and
    the state: it runs nothing."""

    _stub_origin = ""
    _stub_blocked = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stub_args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.stub_state = state

    def __repr__(self) -> str:
        return f"<{'blocked global' if self._stub_blocked else 'missing class'} {self._stub_origin}>"


def _stub(module: str, name: str, blocked: bool) -> type:
    return type(name, (MissingClassStub,), {"__module__": module, "_stub_origin": f"{module}.{name}",
                                            "_stub_blocked": blocked})  # fmt: skip


#: The globals a reference checkpoint may resolve to real objects (everything a ``torch.save``
#: of tensors, plain containers, an ``argparse.Namespace`` and NumPy values needs). None of them
#: runs code given its arguments.
SAFE_REFERENCE_GLOBALS = frozenset({
    ("argparse", "Namespace"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "Counter"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("builtins", "range"), ("builtins", "list"), ("builtins", "dict"),
    ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"),
    ("builtins", "str"), ("builtins", "bytes"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch", "Size"), ("torch", "device"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol 2 stores the bytes of NumPy arrays and scalars
})  # fmt: skip


def _safe_by_kind(module: str, name: str) -> bool:
    """torch dtypes / layouts / memory formats / storage types, NumPy scalar and dtype classes."""
    import numpy as np

    if module == "torch":
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return True
        return name.endswith("Storage") and isinstance(value, type)
    if module == "numpy":
        value = getattr(np, name, None)
        return isinstance(value, type) and issubclass(value, np.generic)
    if module == "numpy.dtypes":
        value = getattr(getattr(np, "dtypes", None), name, None)
        return isinstance(value, type) and issubclass(value, np.dtype)
    return False


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles name Python 2 modules (``__builtin__.set``); the default
    ``find_class`` maps them, an override must do it itself."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _AllowlistUnpickler(pickle.Unpickler):
    """Resolves only :data:`SAFE_REFERENCE_GLOBALS` (and the kinds of :func:`_safe_by_kind`);
    any other global becomes an inert :class:`MissingClassStub` subclass."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        if (module, name) in SAFE_REFERENCE_GLOBALS or _safe_by_kind(module, name):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return _stub(module, name, blocked=False)
        return _stub(module, name, blocked=True)


class _TolerantUnpickler(pickle.Unpickler):
    """The trusted-file opt-out: resolves any importable global (runs what the file names)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _stub(module, name, blocked=False)


def _pickle_module(unpickler: type) -> types.SimpleNamespace:
    # torch.load subclasses ``pickle_module.Unpickler`` (keeping its own storage handling), so a
    # namespace with our Unpickler puts our find_class under every global the file names.
    return types.SimpleNamespace(Unpickler=unpickler, load=lambda file, **kwargs: unpickler(file, **kwargs).load(),
                                 __name__=f"itmkit_{unpickler.__name__.strip('_').lower()}")  # fmt: skip


_ALLOWLIST_PICKLE = _pickle_module(_AllowlistUnpickler)
_TOLERANT_PICKLE = _pickle_module(_TolerantUnpickler)


def read_reference_checkpoint(path: str | Path, trusted: bool = False) -> dict[str, Any]:
    """``torch.load`` a reference ``.pth`` on the CPU **without running anything it pickled**.

    Reference checkpoints pickle an ``argparse.Namespace`` (``opt``), sometimes objects of the
    reference code (a vocabulary), so torch's ``weights_only`` loader refuses them. They are
    read with an allowlist instead: tensors and storages, plain containers, ``argparse.Namespace``,
    NumPy scalars and arrays load as themselves (:data:`SAFE_REFERENCE_GLOBALS`); every other
    global the file names (``os.system`` as much as ``lib.vocab.Vocabulary``) becomes an inert
    :class:`MissingClassStub` that keeps its arguments and state and calls nothing.

    ``trusted=True`` is the explicit opt-out for a file you trust that needs real objects of
    other classes: every importable global is then resolved and called as the pickle says, which
    runs whatever code the file names. Converters take the loaded dict:
    ``convert_checkpoint(read_reference_checkpoint(path, trusted=True))``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    pickle_module = _TOLERANT_PICKLE if trusted else _ALLOWLIST_PICKLE
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(checkpoint).__name__}")
    return checkpoint


def checkpoint_label(source: Any) -> str:
    """How messages name a checkpoint: its path, or ``"checkpoint dict"`` for an in-memory one."""
    return str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint dict"


def open_reference_checkpoint(source: "str | os.PathLike | Mapping[str, Any]") -> tuple[str, dict[str, Any]]:
    """``(label, checkpoint)`` for a converter: a path is read with
    :func:`read_reference_checkpoint` (allowlist unpickling: nothing in the file runs), a mapping
    is taken as it is (a shallow copy); ``label`` is :func:`checkpoint_label`, for error messages."""
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



def reference_max_violation(checkpoint: Mapping[str, Any], opt: Any) -> bool:
    """The ``--max_violation`` flag of the VSE∞-style run that saved ``checkpoint`` (§B.5).

    The reference ``train.py`` sets ``opt.max_violation = True`` itself at the start of every
    epoch from ``vse_mean_warmup_epochs`` on, and saves that ``opt`` with ``"epoch": epoch + 1``.
    A saved value therefore shows the command-line flag only when the checkpoint was saved
    during the warm-up (``epoch <= vse_mean_warmup_epochs``) or the run had no warm-up option.
    A ``True`` saved after the warm-up (or with no epoch recorded) cannot be told from the
    reference's own switch; the released scripts leave the flag off, so ``False`` is taken.
    With :func:`itmkit.losses.use_max_violation` (flag or warm-up) both give the reference's
    schedule after the warm-up.
    """
    saved = bool(opt_value(opt, "max_violation", False))
    warmup = opt_value(opt, "vse_mean_warmup_epochs")
    if not saved or warmup is None:
        return saved
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, Mapping) else None
    return epoch is not None and int(epoch) - 1 < int(warmup)


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

