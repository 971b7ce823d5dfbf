import dataclasses

import pytest

from itmkit.config import RunConfig, TrainConfig, config_from_dict, replace_nested
from itmkit.methods.registry import METHOD_MODULES, available_methods, get_method


@dataclasses.dataclass
class ToyModelConfig:
    embed_size: int = 8


def test_replace_nested_sets_dotted_fields_and_rejects_typos():
    cfg = RunConfig(method="toy", model=ToyModelConfig())
    new = replace_nested(cfg, {"train.epochs": 3, "model.embed_size": 16, "train.lr_decay_epochs": [2]})
    assert new.train.epochs == 3 and new.model.embed_size == 16 and new.train.lr_decay_epochs == (2,)
    assert cfg.train.epochs == TrainConfig().epochs  # original untouched
    with pytest.raises(KeyError, match="train.epoch"):
        replace_nested(cfg, {"train.epoch": 3})


def test_config_round_trips_through_dict():
    cfg = replace_nested(TrainConfig(), {"lr_decay_epochs": (3, 7), "seed": 5})
    back = config_from_dict(TrainConfig, dataclasses.asdict(cfg))
    assert back == cfg
    with pytest.raises(KeyError, match="bogus"):
        config_from_dict(TrainConfig, {"bogus": 1})


def test_registry_names_and_unknown_method():
    assert available_methods() == sorted(METHOD_MODULES)
    with pytest.raises(KeyError, match="registered"):
        get_method("no_such_method")


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_every_registered_method_has_the_standard_presets(name):
    spec = get_method(name)
    assert spec.name == name
    for preset in ("smoke", "course", "paper"):
        cfg = spec.preset(preset)
        assert cfg.method == name and cfg.preset == preset
        assert isinstance(cfg.model, spec.config_cls)


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_a_run_config_round_trips_through_its_json_dict(name):
    import json

    from itmkit.config import config_from_run_dict

    cfg = get_method(name).preset("smoke")
    back = config_from_run_dict(json.loads(cfg.to_json()), "config.json")
    assert back == cfg and type(back.model) is get_method(name).config_cls
    with pytest.raises(ValueError, match="config.json: field 'config': expected a RunConfig dict.*found \\['train'\\]"):
        config_from_run_dict({"train": {}}, "config.json")
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        config_from_run_dict({"method": "nope", "model": {}})
