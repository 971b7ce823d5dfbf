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


def test_every_method_file_is_registered_under_its_own_name():
    """A method module found on disk (``itmkit/methods/<file>.py`` defining ``METHOD``) is listed by
    ``available_methods`` and ``get_method`` returns that same module's spec: a registry line
    dropped, misspelt or pointing at another module fails here."""
    import importlib
    import pkgutil

    import itmkit.methods

    on_disk = {}
    for info in pkgutil.iter_modules(itmkit.methods.__path__):
        module = importlib.import_module(f"itmkit.methods.{info.name}")
        if hasattr(module, "METHOD"):
            on_disk[module.METHOD.name] = module
    assert {"vse_infty", "scan", "sgraf", "chan", "esl"} <= set(on_disk)
    assert available_methods() == sorted(on_disk)
    for name, module in on_disk.items():
        assert get_method(name) is module.METHOD, name
    with pytest.raises(KeyError, match="registered"):
        get_method("no_such_method")


@pytest.mark.parametrize("name", available_methods())
def test_every_registered_method_builds_a_scoring_model_from_its_smoke_preset(name):
    import torch

    import numpy as np

    from itmkit.data.embedded import embedded_dataset, embedded_feature_dim
    from itmkit.data.precomp import PrecompSplit
    from itmkit.models.base import MatchingModel

    spec = get_method(name)
    cfg = spec.preset("smoke")
    vocab_size = None if cfg.text.kind == "hf" else 30
    torch.manual_seed(0)
    model = spec.build(cfg, vocab_size).eval()
    assert isinstance(model, MatchingModel)
    # smoke presets run on the tiny set, read as the method reads it (CEFG appends adjacency rows)
    split, _ = model.prepare_data(PrecompSplit.open(embedded_dataset("tiny"), "test"), None)
    images = torch.as_tensor(np.array(split.images[:3]), dtype=torch.float32)  # a copy: the memmap is read-only
    assert images.shape[-1] >= embedded_feature_dim("tiny")
    low, high = (1000, 2000) if vocab_size is None else (4, vocab_size)
    tokens = torch.randint(low, high, (4, 6))
    with torch.no_grad():
        img = model.encode_images(images, torch.full((3,), images.shape[1]))  # CEFG needs every region
        cap = model.encode_captions(tokens, torch.tensor([6, 4, 5, 3]))
        scores = model.similarity(img, cap)
    assert scores.shape == (3, 4) and torch.isfinite(scores).all()
    assert scores.std() > 0, f"{name}: every pair scores the same"


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
