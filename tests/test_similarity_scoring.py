"""Scoring sets you hold (itmkit.similarity.scoring.score_sets) and loading a similarity alone
(itmkit.checkpoints.load_similarity_part)."""

import pytest
import torch

from itmkit.checkpoints import CheckpointMismatchError, load_similarity_part
from itmkit.config import replace_nested
from itmkit.encoded import Encoded
from itmkit.methods.registry import get_method
from itmkit.similarity.scoring import score_sets

IMG_DIM, K, L, VOCAB = 24, 6, 8, 40
METHODS = ["vse_infty", "scan", "sgraf", "chan", "esl"]


def build(method: str, seed: int = 0):
    cfg = replace_nested(get_method(method).preset("smoke"), {"model.img_dim": IMG_DIM})
    if method == "sgraf":
        cfg = replace_nested(cfg, {"model.num_regions": K})
    torch.manual_seed(seed)
    return get_method(method).build(cfg, VOCAB).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    img_lengths = torch.tensor([K, 4, 5])
    feats = torch.randn(3, K, IMG_DIM, generator=g) * (torch.arange(K)[None] < img_lengths[:, None])[..., None]
    cap_lengths = torch.tensor([L, 5, 3, 6])
    tokens = torch.randint(4, VOCAB, (4, L), generator=g) * (torch.arange(L)[None] < cap_lengths[:, None])
    return feats, img_lengths, tokens, cap_lengths


@pytest.mark.parametrize("method", METHODS)
def test_encoder_outputs_score_like_the_whole_model(method):
    model = build(method)
    feats, img_lengths, tokens, cap_lengths = inputs()
    with torch.no_grad():
        expected = model.similarity(model.encode_images(feats, img_lengths), model.encode_captions(tokens, cap_lengths))
        regions, words = model.image(feats, img_lengths), model.text(tokens, cap_lengths)
    # garbage beyond the lengths (e.g. fc.bias of padded regions) is ignored
    padded = ~(torch.arange(K)[None] < img_lengths[:, None])[..., None]
    regions = regions.masked_fill(padded, 7.0)
    held = score_sets(model, regions, words, img_lengths, cap_lengths)
    torch.testing.assert_close(held, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        images, captions = model.encode_images(feats, img_lengths), model.encode_captions(tokens, cap_lengths)
    torch.testing.assert_close(score_sets(model, images, captions), expected, rtol=0, atol=0)
    assert not model.training


def test_pooled_vectors_and_bad_input():
    vse = build("vse_infty")
    images, captions = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1), torch.randn(5, 32)
    torch.testing.assert_close(score_sets(vse, images, captions), images @ captions.t())
    scan = build("scan")
    with pytest.raises(ValueError, match="expected \\[n, T, d\\] sets for the pairwise method 'scan'"):
        score_sets(scan, images, captions)
    with pytest.raises(ValueError, match=r"images_lengths: expected 3 lengths in \[1, 6\], found \[6, 0, 6\]"):
        score_sets(scan, torch.randn(3, K, 32), torch.randn(2, L, 32), torch.tensor([6, 0, 6]))
    with pytest.raises(ValueError, match="an Encoded carries its own lengths"):
        score_sets(scan, Encoded(torch.randn(1, 2, 32), torch.tensor([2])), torch.randn(1, 2, 32), torch.tensor([2]))


def test_load_similarity_part_loads_the_part_and_names_the_rest():
    source, target = build("sgraf", seed=0), build("sgraf", seed=1)
    encoder_before = target.image.fc.weight.clone()
    state = {k: v.clone() for k, v in source.state_dict().items() if k.startswith("sim.")}
    report = load_similarity_part(target, state, "sim.pth")
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(target.image.fc.weight, encoder_before)  # the encoders are left as built
    assert "image.fc.weight" in report.missing and "text.embed.weight" in report.missing
    assert not any(k.startswith("sim.") for k in report.missing) and report.loaded == len(state) and not report.skipped
    # a full state: the encoder keys are left aside, by name
    report = load_similarity_part(target, source.state_dict())
    assert "image.fc.weight" in report.skipped and "skipped" in str(report)
    # strict inside the part: missing, misshaped or unknown keys raise, naming them, and load nothing
    for broken, message in (
        ({k: v for k, v in state.items() if k != "sim.sim_eval_w.bias"}, "missing \\(1\\): sim.sim_eval_w.bias"),
        ({**state, "sim.sim_eval_w.bias": torch.zeros(3)}, "misshaped: sim.sim_eval_w.bias: expected \\[1\\], found \\[3\\]"),
        ({**state, "module.sim.extra": torch.zeros(1)}, "unexpected \\(1\\): module.sim.extra"),
    ):
        fresh = build("sgraf", seed=2)
        before = fresh.sim.sim_eval_w.weight.clone()
        with pytest.raises(CheckpointMismatchError, match=message):
            load_similarity_part(fresh, broken, "sim.pth")
        assert torch.equal(fresh.sim.sim_eval_w.weight, before)
