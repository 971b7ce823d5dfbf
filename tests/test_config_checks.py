"""Config fields checked by name, type and range (issue 14 §3), for every field of every config.

The generic tests walk the annotations of TrainConfig, DataConfig, TextConfig and every
registered method's config, so a field added later is checked without a new test: each numeric
field must carry a range, and values outside it, of the wrong type, or not a number at all are
refused with the dotted key, the expectation and the value in the message.
"""

import math
import pickle
import typing

import pytest

from itmkit.config import DataConfig, RunConfig, TextConfig, TrainConfig, replace_nested
from itmkit.config_checks import (
    ConfigError,
    Matches,
    OneOf,
    Range,
    _unwrap,
    check_config,
    describe,
    field_hints,
    parse_value,
)
from itmkit.methods.registry import METHOD_MODULES, get_method

SECTIONS = {"train": TrainConfig, "data": DataConfig, "text": TextConfig}


def all_fields():
    """``(method, dotted key, annotation)`` for every field of every section of every method."""
    rows = []
    for method in sorted(METHOD_MODULES):
        classes = {**SECTIONS, "model": get_method(method).config_cls}
        for section, cls in classes.items():
            for name, hint in field_hints(cls).items():
                rows.append((method, f"{section}.{name}", hint))
    return rows


def scalar(hint):
    """``(base type, metadata)`` of a field, through ``X | None``."""
    args = typing.get_args(hint)
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    return _unwrap(hint)


def fields_of(kind):
    return [(m, k, h) for m, k, h in all_fields() if scalar(h)[0] is kind]


NUMERIC = fields_of(int) + fields_of(float)
BOOLS = fields_of(bool)
IDS = lambda rows: [f"{m}:{k}" for m, k, _ in rows]  # noqa: E731


def test_every_field_declares_what_it_accepts():
    for method, key, hint in all_fields():
        base, meta = scalar(hint)
        if base in (int, float):
            assert any(isinstance(m, Range) for m in meta), f"{method} {key}: a number without a Range"
        elif base is str:
            assert any(isinstance(m, (OneOf, Matches)) for m in meta), f"{method} {key}: free text without a form"
        elif typing.get_origin(base) is tuple:
            element = _unwrap(typing.get_args(base)[0])
            assert any(isinstance(m, Range) for m in element[1]), f"{method} {key}: tuple items without a Range"
        else:
            assert base is bool or typing.get_origin(base) is typing.Literal, f"{method} {key}: {base}"


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_every_preset_and_variant_passes_the_checks(name):
    spec = get_method(name)
    for preset in spec.presets:
        check_config(spec.preset(preset))
    for overrides in spec.variants.values():
        replace_nested(spec.preset("smoke"), overrides)


def bad_numbers(base, limits: Range):
    """Values just outside ``limits``, plus values that are no number of this type at all."""
    bad = ["abc", "", "nan", "inf", "true"]
    if limits.low is not None:
        bad.append(str(limits.low if limits.low_open else (limits.low - 1 if base is int else limits.low - 1e-3)))
    if limits.high is not None:
        bad.append(str(limits.high if limits.high_open else (limits.high + 1 if base is int else limits.high * 1.001 + 1e-3)))
    if base is int:
        bad.append("2.5")
    return bad


@pytest.mark.parametrize("method, key, hint", NUMERIC, ids=IDS(NUMERIC))
def test_numeric_fields_refuse_out_of_range_and_non_numbers(method, key, hint):
    cfg = get_method(method).preset("smoke")
    base, meta = scalar(hint)
    limits = next(m for m in meta if isinstance(m, Range))
    for text in bad_numbers(base, limits):
        with pytest.raises(ConfigError) as caught:
            replace_nested(cfg, {key: text})
        message = str(caught.value)
        assert caught.value.key == key and message.startswith(f"{key}: expected ") and repr(text) in message
    # the preset's own value, given as text, reads back as the same number
    section, name = key.split(".")
    current = getattr(getattr(cfg, section), name)
    if current is not None:
        assert getattr(getattr(replace_nested(cfg, {key: str(current)}), section), name) == current


@pytest.mark.parametrize("method, key, hint", BOOLS, ids=IDS(BOOLS))
def test_bool_fields_accept_only_the_six_words(method, key, hint):
    cfg = get_method(method).preset("smoke")
    section, name = key.split(".")
    for text, value in [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("NO", False)]:
        assert getattr(getattr(replace_nested(cfg, {key: text}), section), name) is value
    for text in ["maybe", "2", "", "on", "truee", "-1"]:
        with pytest.raises(ConfigError, match=rf"^{key}: expected true or false.*found '{text}'"):
            replace_nested(cfg, {key: text})


CHOICES = [(m, k, h) for m, k, h in all_fields()
           if typing.get_origin(scalar(h)[0]) is typing.Literal or any(isinstance(x, OneOf) for x in scalar(h)[1])]  # fmt: skip


@pytest.mark.parametrize("method, key, hint", CHOICES, ids=IDS(CHOICES))
def test_named_choices_are_checked(method, key, hint):
    cfg = get_method(method).preset("smoke")
    with pytest.raises(ConfigError, match=rf"^{key}: expected one of .*found 'no-such-choice'"):
        replace_nested(cfg, {key: "no-such-choice"})


def test_the_probe_cases_by_hand():
    cfg = get_method("vse_infty").preset("smoke")
    cases = {
        ("train.epochs", "abc"): "train.epochs: expected an integer >= 1, found 'abc'",
        ("train.epochs", "0"): "train.epochs: expected an integer >= 1, found '0'",
        ("train.epochs", "2.5"): "train.epochs: expected an integer >= 1, found '2.5'",
        ("train.max_violation", "maybe"): "train.max_violation: expected true or false (also 1/0, yes/no), found 'maybe'",
        ("train.batch_size", "0"): "train.batch_size: expected an integer >= 2 (the hinge loss needs a negative pair in the batch), found '0'",
        ("model.embed_size", "-3"): "model.embed_size: expected an integer >= 1, found '-3'",
        ("train.lr", "1e400"): "train.lr: expected a finite number >= 0, found '1e400'",
        ("data.dev_max_captions", "12"): "data.dev_max_captions: expected an integer >= 5, a multiple of 5, or null, found '12'",
        ("train.lr_decay_epochs", "3,x"): "train.lr_decay_epochs[1]: expected an integer >= 0, found 'x'",
        ("train.device", "gpu"): "train.device: expected auto, cpu, cuda, cuda:N or mps, found 'gpu'",
        ("text.kind", "bert"): "text.kind: expected one of 'bigru', 'hf', found 'bert'",
    }
    for (key, text), message in cases.items():
        with pytest.raises(ConfigError) as caught:
            replace_nested(cfg, {key: text})
        assert str(caught.value) == message


def test_text_is_read_by_the_field_type():
    cfg = get_method("vse_infty").preset("smoke")
    new = replace_nested(cfg, {"train.epochs": "3", "train.lr": "1e-3", "train.lr_decay_epochs": "2, 4",
                               "data.dev_max_captions": "null", "text.hf_path": "123", "train.amp": "no"})  # fmt: skip
    assert new.train.epochs == 3 and new.train.lr == 0.001 and new.train.lr_decay_epochs == (2, 4)
    assert new.data.dev_max_captions is None and new.text.hf_path == "123" and new.train.amp is False
    assert replace_nested(cfg, {"train.lr_decay_epochs": "[]"}).train.lr_decay_epochs == ()
    assert replace_nested(cfg, {"train.lr_decay_epochs": "[5, 9]"}).train.lr_decay_epochs == (5, 9)
    # Python values: an int where a float is annotated, a list for a tuple
    assert replace_nested(cfg, {"train.lr": 1, "train.lr_decay_epochs": [3]}).train.lr_decay_epochs == (3,)
    with pytest.raises(ConfigError, match="train.epochs: expected an integer >= 1, found True"):
        replace_nested(cfg, {"train.epochs": True})  # bool is an int subclass; not an epoch count


def test_sections_and_unknown_keys():
    cfg = get_method("chan").preset("smoke")
    with pytest.raises(KeyError, match="did you mean 'train.epochs'"):
        replace_nested(cfg, {"train.epoch": "3"})
    with pytest.raises(KeyError, match="model is a section"):
        replace_nested(cfg, {"model": "3"})
    with pytest.raises(KeyError, match="train.epochs is a value"):
        replace_nested(cfg, {"train.epochs.x": "3"})


def test_overrides_are_judged_together_and_cross_field_rules_name_the_section():
    cfg = replace_nested(get_method("chan").preset("smoke"),
                         {"model.image_encoder": "selfattention", "model.embed_size": "16", "model.attention_heads": "4"})
    # one at a time, embed_size 28 would not fit 4 heads; set with 7 heads at once it does
    both = replace_nested(cfg, {"model.embed_size": "28", "model.attention_heads": "7"})
    assert both.model.embed_size == 28 and both.model.attention_heads == 7
    with pytest.raises(ValueError, match=r"^model: CHANConfig.attention_heads: embed_size 30 must be divisible"):
        replace_nested(cfg, {"model.embed_size": "30"})


def test_check_config_is_strict_about_python_values():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer >= 1, found '3'"):
        check_config(RunConfig("vse_infty", get_method("vse_infty").config_cls(), train=TrainConfig(epochs="3")))
    with pytest.raises(ConfigError, match="train.amp: expected true or false.*found 1"):
        check_config(RunConfig("vse_infty", get_method("vse_infty").config_cls(), train=TrainConfig(amp=1)))
    with pytest.raises(ConfigError, match="data.region_drop: expected a finite number >= 0 and < 1, found nan"):
        check_config(RunConfig("vse_infty", get_method("vse_infty").config_cls(), data=DataConfig(region_drop=math.nan)))


def test_scan_aliases_are_accepted_and_normalised():
    cfg = replace_nested(get_method("scan").preset("smoke"), {"model.raw_feature_norm": "clipped_leaky_l2norm"})
    assert cfg.model.raw_feature_norm == "clipped_l2norm"


def test_config_error_pickles_and_describe_reads_well():
    err = pickle.loads(pickle.dumps(ConfigError("train.epochs", "an integer >= 1", "0")))
    assert str(err) == "train.epochs: expected an integer >= 1, found '0'"
    assert describe(field_hints(TrainConfig)["lr_decay_epochs"]) == "a list of integers >= 0, e.g. [15, 20]"
    assert parse_value("k", "7", int) == 7


def test_a_whole_section_may_be_given_as_its_own_class_and_is_checked():
    cfg = get_method("vse_infty").preset("smoke")
    new = replace_nested(cfg, {"text": TextConfig(kind="hf", max_tokens=32)})
    assert new.text.kind == "hf" and new.text.max_tokens == 32 and cfg.text.kind == "bigru"
    with pytest.raises(ConfigError, match=r"text.max_tokens: expected an integer >= 3 .*found 2"):
        replace_nested(cfg, {"text": TextConfig(max_tokens=2)})
    with pytest.raises(KeyError, match="text is a section"):
        replace_nested(cfg, {"text": DataConfig()})
