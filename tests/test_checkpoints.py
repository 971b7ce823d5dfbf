"""Strict state-dict import helpers (baselines.md §D, §F.1): names in every error, nothing half-loaded."""

import argparse
import sys
import types

import pytest
import torch
from torch import nn

from itmkit.checkpoints import (
    CheckpointMismatchError,
    MissingClassStub,
    BERT_POSITION_IDS,
    check_converted,
    checkpoint_label,
    open_reference_checkpoint,
    reference_dataset,
    compare_state_dicts,
    load_converted,
    load_strict,
    read_reference_checkpoint,
    rename_keys,
    strip_prefix,
)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_strip_prefix_and_rename_keys():
    state = {"module.fc.weight": 1, "module.gpool.linear.weight": 2, "other": 3}
    stripped = strip_prefix(state)
    assert stripped == {"fc.weight": 1, "gpool.linear.weight": 2, "other": 3}
    renamed = rename_keys(stripped, [("fc.", "image.fc."), ("gpool.", "image_pool.")])
    assert renamed == {"image.fc.weight": 1, "image_pool.linear.weight": 2, "other": 3}
    with pytest.raises(ValueError, match="two source keys map to 'a.x'"):
        rename_keys({"b.x": 1, "c.x": 2}, [("b.", "a."), ("c.", "a.")])


def test_load_strict_loads_a_matching_state():
    source, target = small_model(), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    report = load_strict(target, source.state_dict())
    assert report.ok and report.loaded == len(source.state_dict())
    assert torch.equal(target[0].weight, source[0].weight)


def test_mismatches_are_reported_by_name_and_nothing_is_loaded():
    target = small_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = {k: torch.zeros_like(v) for k, v in target.state_dict().items()}
    del state["1.running_var"]  # missing
    state["1.extra"] = torch.zeros(1)  # unexpected
    state["0.weight"] = torch.zeros(4, 5)  # misshaped
    with pytest.raises(CheckpointMismatchError) as error:
        load_strict(target, state, source="ckpt.pth")
    message = str(error.value)
    assert message.startswith("ckpt.pth:")
    assert "missing (1): 1.running_var" in message and "unexpected (1): 1.extra" in message
    assert "misshaped: 0.weight: expected [4, 3], found [4, 5]" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    report = compare_state_dicts(target.state_dict(), state)
    assert report.missing == ["1.running_var"] and report.unexpected == ["1.extra"] and not report.ok


def test_a_prefixed_state_is_not_silently_ignored():
    target = small_model()
    prefixed = {f"module.{k}": v for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="module.0.weight"):
        load_strict(target, prefixed)
    assert load_strict(target, strip_prefix(prefixed)).ok


def test_read_reference_checkpoint_with_missing_classes(tmp_path, monkeypatch):
    fake = types.ModuleType("reference_lib_vocab")

    class Vocabulary:
        def __init__(self):
            self.word2idx = {"<pad>": 0, "dog": 4}

    Vocabulary.__module__ = "reference_lib_vocab"
    Vocabulary.__qualname__ = "Vocabulary"
    fake.Vocabulary = Vocabulary
    monkeypatch.setitem(sys.modules, "reference_lib_vocab", fake)
    opt = argparse.Namespace(embed_size=16, vocab=Vocabulary(), data_name="f30k_precomp")
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 3, "model": [{"module.fc.weight": torch.ones(2, 2)}, {}], "opt": opt}, path)
    monkeypatch.delitem(sys.modules, "reference_lib_vocab")  # the class can no longer be imported

    checkpoint = read_reference_checkpoint(path)
    assert checkpoint["epoch"] == 3 and checkpoint["opt"].embed_size == 16
    stub = checkpoint["opt"].vocab
    assert isinstance(stub, MissingClassStub) and stub.word2idx == {"<pad>": 0, "dog": 4}
    assert "reference_lib_vocab.Vocabulary" in repr(stub)
    assert torch.equal(checkpoint["model"][0]["module.fc.weight"], torch.ones(2, 2))


def test_read_reference_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_reference_checkpoint(tmp_path / "nope.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth: expected a checkpoint dict, found list"):
        read_reference_checkpoint(tmp_path / "list.pth")


def test_check_converted_names_the_file_the_method_and_the_keys():
    model = small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert check_converted(model, state, "ckpt.pth.tar", "SCAN").ok
    first = next(iter(state))
    state[first] = torch.zeros(3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"ckpt.pth.tar: converted SCAN state dict does not fit(.|\n)*unexpected \(1\): extra.weight(.|\n)*misshaped: " + first):
        check_converted(model, state, "ckpt.pth.tar", "SCAN")


def test_open_reference_checkpoint_reads_paths_and_takes_dicts(tmp_path):
    checkpoint = {"model": [small_model().state_dict()], "opt": argparse.Namespace(data_name="coco_precomp")}
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)
    for source, label in [(path, str(path)), (str(path), str(path)), (checkpoint, "checkpoint dict")]:
        name, opened = open_reference_checkpoint(source)
        assert name == label == checkpoint_label(source)
        assert reference_dataset(opened["opt"]) == "coco"
        assert torch.equal(opened["model"][0]["0.weight"], checkpoint["model"][0]["0.weight"])
    with pytest.raises(TypeError, match="expected a path or a dict, found int"):
        open_reference_checkpoint(3)
    assert reference_dataset(argparse.Namespace(data_name="f30k_precomp")) == "f30k"
    assert reference_dataset(None) == "f30k"  # no opt: the reference default


def test_load_converted_restores_the_bert_position_ids_buffer_only():
    def bert_like():
        model = nn.Module()
        model.text = nn.Module()
        model.text.backbone = nn.Module()
        model.text.backbone.embeddings = nn.Linear(2, 2)
        model.text.backbone.embeddings.register_buffer("position_ids", torch.arange(5)[None])
        return model

    source, target = bert_like(), bert_like()
    state = {k: v.clone() for k, v in source.state_dict().items() if k != BERT_POSITION_IDS}
    with torch.no_grad():
        target.text.backbone.embeddings.weight.zero_()
    assert load_converted(target, state, "ckpt").ok
    assert torch.equal(target.text.backbone.embeddings.weight, source.text.backbone.embeddings.weight)
    assert torch.equal(target.state_dict()[BERT_POSITION_IDS], torch.arange(5)[None])
    # anything else missing still fails, by name
    del state["text.backbone.embeddings.bias"]
    state.pop(BERT_POSITION_IDS)
    with pytest.raises(CheckpointMismatchError, match=r"ckpt: state dict does not match(.|\n)*missing \(1\): text.backbone.embeddings.bias"):
        load_converted(target, state, "ckpt")


def test_reference_max_violation_reads_the_flag_only_where_the_reference_did_not_set_it():
    from itmkit.checkpoints import reference_max_violation

    def opt(flag, warmup=1):
        return argparse.Namespace(max_violation=flag, **({} if warmup is None else {"vse_mean_warmup_epochs": warmup}))

    assert reference_max_violation({"epoch": 1}, opt(True)) is True  # saved during the warm-up: the user's flag
    assert reference_max_violation({"epoch": 2}, opt(True)) is False  # train.py set it at epoch 1
    assert reference_max_violation({"epoch": 2}, opt(True, warmup=2)) is True
    assert reference_max_violation({}, opt(True)) is False  # no epoch: cannot tell, the scripts' default
    assert reference_max_violation({"epoch": 9}, opt(False)) is False
    assert reference_max_violation({"epoch": 9}, opt(True, warmup=None)) is True  # no warm-up option: no switch
    assert reference_max_violation({"epoch": 9}, None) is False
