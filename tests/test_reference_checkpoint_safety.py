"""Reading a reference checkpoint runs nothing it pickled (issue 14 §9): an allowlist unpickler,
inert stubs for every other global, and an explicit opt-out for trusted files."""

from __future__ import annotations

import argparse
import builtins
import collections
import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch

from itmkit.checkpoints import MissingClassStub, read_reference_checkpoint

CONVERTERS = ["vse_infty", "scan", "sgraf", "chan", "esl"]


class RunsShell:
    """Pickles as ``os.system("touch MARKER")``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecsPython:
    """Pickles as ``exec("open(MARKER, 'w').write('ran')")``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class OpensForWriting:
    """Pickles as ``open(MARKER, "w")``: creates the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


PAYLOADS = [RunsShell, ExecsPython, OpensForWriting]


def crafted_checkpoint(path, payload):
    """A .pth whose ``opt`` carries the payload, as a poisoned download would."""
    opt = argparse.Namespace(data_name="f30k_precomp", embed_size=16, hook=payload)
    torch.save({"epoch": 3, "model": [{"fc.weight": torch.ones(2, 2)}], "opt": opt}, path)
    return path


@pytest.mark.parametrize("payload_cls", PAYLOADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", CONVERTERS)
def test_no_converter_runs_what_a_crafted_checkpoint_pickled(tmp_path, method, payload_cls):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "model_best.pth", payload_cls(marker))
    convert = importlib.import_module(f"itmkit.methods.{method}").convert_checkpoint
    with pytest.raises(ValueError):  # the converter's own complaint about the layout, and nothing else
        convert(path)
    assert not marker.exists(), f"{method}: reading the checkpoint ran its payload"


@pytest.mark.parametrize("payload_cls", PAYLOADS, ids=lambda c: c.__name__)
def test_blocked_globals_become_inert_stubs_and_the_opt_out_runs_them(tmp_path, payload_cls):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "model_best.pth", payload_cls(marker))
    checkpoint = read_reference_checkpoint(path)
    hook = checkpoint["opt"].hook
    assert isinstance(hook, MissingClassStub) and repr(hook).startswith("<blocked global ")
    assert str(marker) in str(hook.stub_args)  # the call was recorded, not made
    assert checkpoint["opt"].embed_size == 16 and torch.equal(checkpoint["model"][0]["fc.weight"], torch.ones(2, 2))
    assert not marker.exists()
    # the crafted file is live: the documented opt-out for trusted files does run it
    read_reference_checkpoint(path, trusted=True)
    assert marker.exists()


def test_what_reference_checkpoints_hold_still_loads_as_itself(tmp_path, monkeypatch):
    fake = types.ModuleType("reference_lib_vocab")

    class Vocabulary:
        def __init__(self):
            self.word2idx = {"<pad>": 0, "dog": 4}

    Vocabulary.__module__, Vocabulary.__qualname__ = "reference_lib_vocab", "Vocabulary"
    fake.Vocabulary = Vocabulary
    monkeypatch.setitem(sys.modules, "reference_lib_vocab", fake)
    param = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    opt = argparse.Namespace(data_name="coco_precomp", lr_update=[15], vocab=Vocabulary(), dtype=torch.float16,
                             device=torch.device("cpu"), shape=torch.Size([2, 3]), ids={1, 2}, frozen=frozenset("ab"),
                             span=slice(1, 5), weight=np.float64(0.25), count=np.int64(7), table=np.arange(4.0),
                             half=torch.zeros(2, dtype=torch.bfloat16))  # fmt: skip
    checkpoint = {"model": collections.OrderedDict(w=param, b=torch.ones(3, dtype=torch.int64)), "opt": opt,
                  "counts": collections.Counter(a=2), "best_rsum": 512.5, "raw": bytearray(b"xy")}  # fmt: skip
    path = tmp_path / "model_best.pth"
    torch.save(checkpoint, path)
    monkeypatch.delitem(sys.modules, "reference_lib_vocab")  # the reference code is not installed here
    loaded = read_reference_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], param.detach()) and isinstance(loaded["model"], collections.OrderedDict)
    assert loaded["model"]["b"].dtype == torch.int64 and loaded["counts"] == collections.Counter(a=2)
    got = loaded["opt"]
    assert isinstance(got, argparse.Namespace) and got.lr_update == [15] and got.dtype is torch.float16
    assert got.device == torch.device("cpu") and got.shape == torch.Size([2, 3]) and got.ids == {1, 2}
    assert got.frozen == frozenset("ab") and got.span == slice(1, 5) and got.half.dtype == torch.bfloat16
    assert got.weight == np.float64(0.25) and got.count == 7 and np.array_equal(got.table, np.arange(4.0))
    assert isinstance(got.vocab, MissingClassStub) and got.vocab.word2idx == {"<pad>": 0, "dog": 4}
    # not on the allowlist: never imported (an import can run code), whatever is installed
    assert repr(got.vocab) == "<blocked global reference_lib_vocab.Vocabulary>"
    assert loaded["best_rsum"] == 512.5 and loaded["raw"] == bytearray(b"xy")


def test_a_global_outside_the_allowlist_is_never_imported(tmp_path, monkeypatch):
    # importing a module runs its top level: a file naming an installed module must not import it
    marker = tmp_path / "imported"
    fake = types.ModuleType("itmkit_test_side_effect")

    class Thing:
        pass

    Thing.__module__, Thing.__qualname__ = fake.__name__, "Thing"
    fake.Thing = Thing
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    path = tmp_path / "model_best.pth"
    torch.save({"model": {}, "opt": argparse.Namespace(thing=Thing())}, path)
    monkeypatch.delitem(sys.modules, fake.__name__)
    (tmp_path / f"{fake.__name__}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(read_reference_checkpoint(path)["opt"].thing, MissingClassStub)
    assert not marker.exists()
    read_reference_checkpoint(path, trusted=True)
    assert marker.exists()
    monkeypatch.delitem(sys.modules, fake.__name__, raising=False)
