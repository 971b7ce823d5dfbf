"""LHSC (lhsc.md): the region graph and word self-attention blocks against per-region / per-word
loops written from the spec's equations, the encoders and the whole model against a per-pair
reference (the SAF head's reference is SGRAF's, ``tests/test_sgraf.py``), padding (invariant where
the spec says so, the reference's padded-length dependence where it does not), ``explain``, the
evaluator's caption batching, presets and the checkpoint converter."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from test_sgraf import ref_score  # SGRAF-SAF's per-pair reference: LHSC's head is SAF unchanged
from test_sgraf import reference_checkpoint as sgraf_reference_checkpoint  # SGRAF's §7 layout

from itmkit.config import TextConfig
from itmkit.encoded import Encoded
from itmkit.methods.lhsc import LHSC, LHSCConfig, convert_checkpoint
from itmkit.models.lhsc_modules import RegionGraphBlock, WordSelfAttentionBlock

D, S, R, E, IMG_DIM, VOCAB = 8, 6, 5, 6, 10, 30  # embed, sim_dim, regions, word dim, features, ids


# ----------------------------------------------------------------------------------------------
# per-region / per-word references (§3.1, §3.2), plain loops, independent of the vectorised code
# ----------------------------------------------------------------------------------------------
def lin(weight, bias, x):
    return x @ weight.t() + bias


def l2n(x):
    return x / (torch.sqrt((x * x).sum(-1, keepdim=True)) + 1e-8)


def four_convs(weight, bias, x):
    """The reference's ``theta, theta1, theta2, theta3`` (``Conv1d(d, d/4)`` each, outputs
    concatenated along channels) on one region vector ``x [d]``, from the stacked ``[d, d]``."""
    q = weight.shape[0] // 4
    return torch.cat([lin(weight[k * q : (k + 1) * q], bias[k * q : (k + 1) * q], x) for k in range(4)])


def ref_region_block(block: RegionGraphBlock, x, train=False):
    """``x [B, N, d]`` (all regions valid) -> ``(out [B, N, d], graph [B, N, N])``.
    BatchNorm: running stats (eval) or per-channel statistics over every (image, region), biased."""
    B, N, d = x.shape
    graph = torch.zeros(B, N, N, dtype=x.dtype)
    z = torch.zeros(B, N, d, dtype=x.dtype)
    for b in range(B):
        g = [lin(block.g.weight, block.g.bias, x[b, i]) for i in range(N)]
        q = [lin(block.fc1.weight, block.fc1.bias, four_convs(block.theta.weight, block.theta.bias, x[b, i])) for i in range(N)]
        k = [lin(block.fc2.weight, block.fc2.bias, four_convs(block.phi.weight, block.phi.bias, x[b, i])) for i in range(N)]
        for i in range(N):
            for j in range(N):
                graph[b, i, j] = (q[i] * k[j]).sum() / N
            y = sum(graph[b, i, j] * g[j] for j in range(N))
            z[b, i] = lin(block.W.weight, block.W.bias, y)
    bn = block.bn
    out = torch.zeros_like(x)
    for c in range(d):
        values = z[:, :, c]
        if train:
            mean, var = values.mean(), ((values - values.mean()) ** 2).mean()
        else:
            mean, var = bn.running_mean[c], bn.running_var[c]
        out[:, :, c] = x[:, :, c] + (values - mean) / torch.sqrt(var + bn.eps) * bn.weight[c] + bn.bias[c]
    return out, graph


def ref_word_block(block: WordSelfAttentionBlock, x, divisor):
    """One caption ``x [T, e]`` (every position the block sees) -> ``(out [T, e], C [T, T])``."""
    T = x.shape[0]
    lh = [torch.tanh(lin(block.embedding_local.weight, block.embedding_local.bias, x[t])) for t in range(T)]
    gh = [torch.tanh(lin(block.embedding_global.weight, block.embedding_global.bias, x[t])) for t in range(T)]
    vh = [torch.tanh(lin(block.embedding_v.weight, block.embedding_v.bias, x[t])) for t in range(T)]
    c = torch.stack([torch.stack([(lh[t] * gh[u]).sum() / divisor for u in range(T)]) for t in range(T)])
    out = torch.stack([x[t] + sum(c[t, u] * vh[u] for u in range(T)) for t in range(T)])
    return out, c


def ref_image(model: LHSC, feats):
    """One image's features ``[K, img_dim]`` (all valid) -> regions ``[K, d]`` (§3.1)."""
    x = lin(model.image.fc.weight, model.image.fc.bias, feats)[None]
    for block in model.image.graph.blocks:
        x, _ = ref_region_block(block, x)
    return l2n(x[0])


def ref_caption(model: LHSC, tokens, length, padded_to=None):
    """One caption's ids -> words ``[L_j, d]`` (§3.2): the word blocks see ``padded_to`` positions
    (pad id 0 beyond the caption; reference mode) or the valid words only (masked mode)."""
    text = model.text
    seen = length if model.cfg.word_padding == "masked" else padded_to
    ids = torch.zeros(seen, dtype=torch.long)
    ids[:length] = tokens[:length]
    x = text.embed.weight[ids]
    for block in text.word_layers.blocks:
        x, _ = ref_word_block(block, x, seen)
    out, _ = text.rnn(x[None, :length])  # the GRU (torch's) on the valid words only
    out = (out[..., :D] + out[..., D:]) / 2
    return l2n(out[0])


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------
def randomise_batchnorms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial affine BN parameters and running stats, so that BN's axis and mode matter.
    The region blocks' gamma stays small: four cubic blocks with random weights overflow otherwise
    (lhsc.md §8.6)."""
    with torch.no_grad():
        for name, bn in module.named_modules():
            if isinstance(bn, nn.BatchNorm1d):
                small = ".graph." in f".{name}."
                bn.weight.copy_((0.1 if small else 1.0) * (0.5 + torch.rand(bn.weight.shape, generator=generator)))
                bn.bias.copy_(0.3 * torch.randn(bn.bias.shape, generator=generator))
                bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=generator))
                bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=generator))


def make_model(seed=0, **overrides) -> LHSC:
    torch.manual_seed(seed)
    cfg = LHSCConfig(img_dim=IMG_DIM, embed_size=D, sim_dim=S, num_regions=R, **overrides)
    model = LHSC(cfg, TextConfig(kind="bigru", word_dim=E), VOCAB).double()
    randomise_batchnorms(model, torch.Generator().manual_seed(seed + 100))
    return model.eval()


def make_inputs(n_img=4, lengths=(4, 7, 3, 6, 2, 5), seed=2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, R, IMG_DIM, generator=g, dtype=torch.float64)
    L = max(lengths)
    lengths_t = torch.tensor(lengths)
    tokens = torch.randint(4, VOCAB, (len(lengths), L), generator=g)
    tokens = tokens.masked_fill(torch.arange(L)[None] >= lengths_t[:, None], 0)
    return images, torch.full((n_img,), R), tokens, lengths_t


def block_input(B=3, N=R, seed=3):
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# region graph block (§3.1)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_region_block_equals_the_per_region_loop(train):
    torch.manual_seed(0)
    block = RegionGraphBlock(D).double()
    randomise_batchnorms(block, torch.Generator().manual_seed(1))
    x = block_input()
    expected, graph = ref_region_block(block, x, train=train)
    out, got_graph = block.train(train)(x)
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.allclose(got_graph, graph, atol=1e-12)
    assert (graph < 0).any()  # un-normalised affinity: no softmax (§8.3)


def test_region_block_train_mode_updates_running_stats_from_every_region():
    torch.manual_seed(0)
    block = RegionGraphBlock(D).double().train()
    x = block_input()
    block(x)
    # the pre-BN update, recomputed: per channel over (images x regions), momentum 0.1 from (0, 1)
    z = block.W(block.affinity(x) @ block.g(x)).reshape(-1, D)
    assert torch.allclose(block.bn.running_mean, 0.1 * z.mean(0), atol=1e-12)
    assert torch.allclose(block.bn.running_var, 0.9 + 0.1 * z.var(0, unbiased=True), atol=1e-12)


def test_fresh_region_block_is_the_identity_and_keeps_the_default_init():
    torch.manual_seed(0)
    block = RegionGraphBlock(64).double().train()
    x = block_input(N=7).repeat(1, 1, 8)
    out, _ = block(x)
    assert torch.equal(out, x)  # BatchNorm gamma = beta = 0 (§8.4)
    for name in ("g", "theta", "phi", "fc1", "fc2", "W"):
        layer = getattr(block, name)
        bound = 1 / 64**0.5  # PyTorch's default, not Xavier: IM_GCN.init_weights is never called
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound, name
        assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0, name
    with pytest.raises(ValueError, match="multiple of 4.*found 6"):
        RegionGraphBlock(6)


@pytest.mark.parametrize("train", [False, True])
def test_region_block_is_permutation_equivariant(train):
    torch.manual_seed(0)
    block = RegionGraphBlock(D).double().train(train)
    randomise_batchnorms(block, torch.Generator().manual_seed(1))
    x = block_input()
    perm = torch.tensor([3, 0, 4, 1, 2])
    out, graph = block(x)
    out_p, graph_p = block(x[:, perm])
    assert torch.allclose(out_p, out[:, perm], atol=1e-12)
    assert torch.allclose(graph_p, graph[:, perm][:, :, perm], atol=1e-12)


@pytest.mark.parametrize("train", [False, True])
def test_region_block_mask_equals_the_unpadded_images(train):
    """Our design for padded region sets: each image's valid regions alone (keys, values, N,
    and train-mode statistics); padded rows come out 0 whatever they held."""
    torch.manual_seed(0)
    block = RegionGraphBlock(D).double()
    randomise_batchnorms(block, torch.Generator().manual_seed(1))
    x = block_input()
    lengths = torch.tensor([5, 3, 4])
    mask = torch.arange(R)[None] < lengths[:, None]
    garbage = torch.where(mask[..., None], x, 50.0)
    out, graph = block.train(train)(garbage, mask)
    assert torch.all(out[~mask] == 0) and torch.all(graph.masked_select(~mask[:, None, :]) == 0)
    valid = torch.cat([x[b, : lengths[b]] for b in range(3)])  # every valid region of the batch
    if train:  # statistics over all valid regions at once: compare against the loop's formula
        z = torch.cat([block.W(block.affinity(x[b : b + 1, : lengths[b]]) @ block.g(x[b : b + 1, : lengths[b]]))[0] for b in range(3)])
        normed = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + block.bn.eps) * block.bn.weight + block.bn.bias
        assert torch.allclose(out[mask], valid + normed, atol=1e-12)
    else:
        for b in range(3):
            alone, alone_graph = ref_region_block(block, x[b : b + 1, : lengths[b]])
            assert torch.allclose(out[b, : lengths[b]], alone[0], atol=1e-12)
            assert torch.allclose(graph[b, : lengths[b], : lengths[b]], alone_graph[0], atol=1e-12)


# ----------------------------------------------------------------------------------------------
# word self-attention block (§3.2)
# ----------------------------------------------------------------------------------------------
def word_input(lengths=(6, 4, 2), L=None, seed=4):
    L = L or max(lengths)
    x = torch.randn(len(lengths), L, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, torch.arange(L)[None] < torch.tensor(lengths)[:, None]


def test_word_block_reference_mode_equals_the_padded_loop():
    torch.manual_seed(0)
    block = WordSelfAttentionBlock(E).double()
    x, mask = word_input()
    out, attention = block(x, mask)
    for b in range(3):  # the reference: every padded position is a key, divided by L = 6
        expected, c = ref_word_block(block, x[b], divisor=x.shape[1])
        assert torch.allclose(out[b], expected, atol=1e-12)
        assert torch.allclose(attention[b], c, atol=1e-12)
    bound = (6 / (2 * E)) ** 0.5  # Xavier-uniform, bias 0
    assert block.embedding_v.weight.abs().max() <= bound and torch.all(block.embedding_v.bias == 0)


def test_word_block_reference_mode_depends_on_the_padded_length():
    """lhsc.md §8.2: one more pad column changes the earlier outputs (denominator, extra keys)."""
    torch.manual_seed(0)
    block = WordSelfAttentionBlock(E).double()
    x, mask = word_input()
    wider = torch.cat([x, x[:, :1]], 1)  # any pad content: the reference reads it
    out, _ = block(x, mask)
    out_wide, _ = block(wider, torch.cat([mask, torch.zeros(3, 1, dtype=torch.bool)], 1))
    assert (out_wide[:, :6] - out).abs().max() > 1e-3


def test_word_block_masked_mode_equals_the_loop_on_valid_words_and_ignores_padding():
    torch.manual_seed(0)
    block = WordSelfAttentionBlock(E, padding="masked").double()
    x, mask = word_input()
    garbage = torch.where(mask[..., None], x, 100.0)
    out, attention = block(garbage, mask)
    for b, n in enumerate((6, 4, 2)):
        expected, c = ref_word_block(block, x[b, :n], divisor=n)
        assert torch.allclose(out[b, :n], expected, atol=1e-12)
        assert torch.allclose(attention[b, :n, :n], c, atol=1e-12)
        assert torch.all(attention[b, :, n:] == 0)
    with pytest.raises(ValueError, match="'reference' or 'masked'.*'softmax'"):
        WordSelfAttentionBlock(E, padding="softmax")


def test_word_block_is_permutation_equivariant_over_all_positions():
    torch.manual_seed(0)
    block = WordSelfAttentionBlock(E).double()
    x, mask = word_input(lengths=(6, 6, 6))
    perm = torch.tensor([2, 5, 0, 1, 4, 3])
    assert torch.allclose(block(x[:, perm], mask)[0], block(x, mask)[0][:, perm], atol=1e-12)


# ----------------------------------------------------------------------------------------------
# encoders and the whole model
# ----------------------------------------------------------------------------------------------
def test_encoders_equal_the_loops():
    model = make_model()
    images, img_len, tokens, lengths = make_inputs()
    with torch.no_grad():
        img = model.encode_images(images, img_len)
        cap = model.encode_captions(tokens, lengths)
        for i in range(len(images)):
            assert torch.allclose(img.feats[i], ref_image(model, images[i]), atol=1e-10)
        for j in range(len(lengths)):
            n = int(lengths[j])
            expected = ref_caption(model, tokens[j], n, padded_to=tokens.shape[1])
            assert torch.allclose(cap.feats[j, :n], expected, atol=1e-10)
            assert torch.all(cap.feats[j, n:] == 0)
    assert torch.allclose(img.feats.norm(dim=-1), torch.ones(len(images), R, dtype=torch.float64))
    assert img.extras["region_graph"].shape == (len(images), R, 4, R)
    assert torch.equal(cap.extras["tokens"][..., 0], tokens)


@pytest.mark.parametrize("padding", ["reference", "masked"])
def test_engine_matrix_equals_the_per_pair_loop_fp32(padding):
    model = make_model(word_padding=padding).float()
    images, img_len, tokens, lengths = make_inputs()
    with torch.no_grad():
        img, cap = model.encode_images(images.float(), img_len), model.encode_captions(tokens, lengths)
        per_pair = model.pair_workspace_bytes(img, cap)
        full = model.similarity(img, cap, memory_budget=per_pair * 5)  # many blocks
        model.double()
        for i in range(len(images)):
            regions = ref_image(model, images[i])
            for j in range(len(lengths)):
                words = ref_caption(model, tokens[j], int(lengths[j]), padded_to=tokens.shape[1])
                assert abs(float(full[i, j]) - float(ref_score(model.sim, regions, words))) < 1e-5, (i, j)


def test_a_longer_batch_mate_changes_reference_scores_but_not_masked_ones():
    images, img_len, tokens, lengths = make_inputs()
    longer = torch.randint(4, VOCAB, (1, 10), generator=torch.Generator().manual_seed(9))
    batch = torch.cat([torch.cat([tokens, torch.zeros(len(tokens), 3, dtype=torch.long)], 1), longer])
    batch_lengths = torch.cat([lengths, torch.tensor([10])])
    wider = torch.cat([tokens, torch.zeros(len(tokens), 3, dtype=torch.long)], 1)  # all-pad columns
    changes = {}
    for padding in ("reference", "masked"):
        model = make_model(word_padding=padding)
        with torch.no_grad():
            img = model.encode_images(images, img_len)
            alone = model.score_block(img, model.encode_captions(tokens, lengths))
            mates = model.score_block(img, model.encode_captions(batch, batch_lengths))[:, : len(tokens)]
            assert torch.allclose(model.score_block(img, model.encode_captions(wider, lengths)), alone, atol=1e-12)
        changes[padding] = float((alone - mates).abs().max())
        assert model.batch_dependent_captions == (padding == "reference")
    assert changes["masked"] < 1e-12
    assert changes["reference"] > 1e-6  # lhsc.md §8.2: the encoding depends on the batch's padding


def test_encoded_padding_and_fewer_regions_change_nothing():
    model = make_model()
    images, _, tokens, lengths = make_inputs(n_img=3)
    img_lengths = torch.tensor([4, 3, 5])
    with torch.no_grad():
        cap = model.encode_captions(tokens, lengths)
        junk = images.masked_fill(torch.arange(R)[None, :, None] >= img_lengths[:, None, None], 9.0)
        padded = model.encode_images(junk, img_lengths)
        clean = model.encode_images(images * (torch.arange(R)[None, :, None] < img_lengths[:, None, None]), img_lengths)
        assert torch.allclose(model.score_block(padded, cap), model.score_block(clean, cap), atol=1e-12)
        for i, n in enumerate(img_lengths.tolist()):  # an image with fewer regions = that image alone
            alone = model.encode_images(images[i : i + 1, :n], torch.tensor([n]))
            assert torch.allclose(padded.feats[i, :n], alone.feats[0, :n], atol=1e-12)
            assert torch.all(padded.feats[i, n:] == 0)
        # garbage in the padded word slots of an encoded caption block changes no score
        dirty = Encoded(cap.feats.masked_fill(~cap.mask[..., None], 3.0), cap.lengths, cap.extras)
        assert torch.allclose(model.score_block(padded, dirty), model.score_block(padded, cap), atol=1e-12)


def test_gradients_reach_the_pad_embedding_only_in_reference_mode():
    """lhsc.md §8.10: the reference trains the <pad> row (it is a key of the word attention)."""
    images, img_len, tokens, lengths = make_inputs()
    for padding, reached in (("reference", True), ("masked", False)):
        model = make_model(word_padding=padding).train()
        scores = model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, lengths))
        scores.sum().backward()
        assert bool(model.text.embed.weight.grad[0].abs().sum() > 0) == reached, padding
        assert model.image.graph.blocks[3].bn.weight.grad.abs().sum() > 0


def test_zero_blocks_give_back_sgraf_saf():
    from itmkit.methods.sgraf import SGRAF, SGRAFConfig

    images, img_len, tokens, lengths = make_inputs()
    torch.manual_seed(0)
    saf = SGRAF(SGRAFConfig(module="SAF", img_dim=IMG_DIM, embed_size=D, sim_dim=S, num_regions=R),
                TextConfig(kind="bigru", word_dim=E), VOCAB).double().eval()  # fmt: skip
    torch.manual_seed(0)
    lhsc = LHSC(LHSCConfig(img_dim=IMG_DIM, embed_size=D, sim_dim=S, num_regions=R, region_graph_blocks=0,
                           word_attention_blocks=0), TextConfig(kind="bigru", word_dim=E), VOCAB).double().eval()  # fmt: skip
    lhsc.load_state_dict(saf.state_dict())
    with torch.no_grad():
        a = saf.similarity(saf.encode_images(images, img_len), saf.encode_captions(tokens, lengths))
        b = lhsc.similarity(lhsc.encode_images(images, img_len), lhsc.encode_captions(tokens, lengths))
    assert torch.allclose(a, b, atol=1e-12)


def test_invalid_configurations_are_named():
    with pytest.raises(ValueError, match="module: expected 'SAF'.*'SGR'"):
        LHSC(LHSCConfig(module="SGR", img_dim=IMG_DIM, embed_size=D, sim_dim=S), TextConfig(word_dim=E), VOCAB)
    with pytest.raises(ValueError, match="text.kind: expected 'bigru'.*'hf'"):
        LHSC(LHSCConfig(img_dim=IMG_DIM, embed_size=D, sim_dim=S), TextConfig(kind="hf"), None)


# ----------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------
def test_explain_parts_are_unpadded_padding_invariant_and_match_the_loops():
    model = make_model()
    images, _, tokens, lengths = make_inputs(n_img=2, lengths=(4, 7))
    n_regions = 3
    with torch.no_grad():
        # the image: 3 valid regions of 5, garbage in the padding; the caption: 4 words, encoded in
        # a batch padded to 7, and once more with 3 garbage positions added to its encoded tensors
        junk = images.clone()
        junk[0, n_regions:] = 7.0
        image = model.encode_images(junk[:1], torch.tensor([n_regions]))
        caption = model.encode_captions(tokens, lengths).slice(0, 2).select(torch.tensor([0]))
        explanation = model.explain(image, caption)
        assert explanation.method == "lhsc" and (explanation.n_regions, explanation.n_words) == (n_regions, 4)
        assert explanation.score == pytest.approx(float(model.similarity(image, caption)[0, 0]), abs=1e-12)

        caption_alone = model.encode_captions(tokens[:1, :4], lengths[:1])
        image_alone = model.encode_images(images[:1, :n_regions], torch.tensor([n_regions]))
        alone = model.explain(image_alone, caption_alone)
        padded_caption = Encoded(F.pad(caption.feats, (0, 0, 0, 3), value=5.0), caption.lengths,
                                 {"global": caption.extras["global"], "tokens": F.pad(caption.extras["tokens"], (0, 0, 0, 3), value=9)})  # fmt: skip
        padded = model.explain(image, padded_caption)
    expected_keys = {"word_region_weights", "filtration_weights", "word_scores"}
    expected_keys |= {f"region_graph/layer{k}" for k in range(1, 5)} | {f"word_attention/layer{k}" for k in range(1, 5)}
    assert set(explanation.parts) == expected_keys
    assert explanation["word_region_weights"].shape == (4, n_regions)
    assert np.allclose(explanation["word_region_weights"].sum(1), 1)
    assert explanation["filtration_weights"].shape == (5,) and abs(explanation["filtration_weights"].sum() - 1) < 1e-6
    assert np.array_equal(explanation["word_scores"], explanation["filtration_weights"][1:])
    for k in range(1, 5):
        assert explanation[f"region_graph/layer{k}"].shape == (n_regions, n_regions)
        assert explanation[f"word_attention/layer{k}"].shape == (4, 4)
    for key in expected_keys:  # the same parts for the unpadded pair and for more padding
        assert np.allclose(explanation[key], padded[key], atol=1e-12), key
        if not key.startswith(("word_region", "filtration", "word_scores")):  # encoder parts
            assert np.allclose(explanation[key], alone[key], atol=1e-12), key
    # the layer-1 graph and word attention against the loops
    torch.set_grad_enabled(False)
    x = lin(model.image.fc.weight, model.image.fc.bias, images[0, :n_regions])[None]
    assert np.allclose(explanation["region_graph/layer1"], ref_region_block(model.image.graph.blocks[0], x)[1][0].numpy(), atol=1e-12)
    words = model.text.embed.weight[tokens[0, :4]]
    _, c = ref_word_block(model.text.word_layers.blocks[0], words, divisor=4)
    torch.set_grad_enabled(True)
    assert np.allclose(explanation["word_attention/layer1"], c.numpy(), atol=1e-12)


def test_explain_checks_its_inputs():
    model = make_model()
    images, img_len, tokens, lengths = make_inputs(n_img=2, lengths=(4, 7))
    with torch.no_grad():
        img, cap = model.encode_images(images, img_len), model.encode_captions(tokens, lengths)
    with pytest.raises(ValueError, match="one image and one caption, found 2 and 2"):
        model.explain(img, cap)
    with pytest.raises(KeyError, match="tokens"):
        model.explain(img.slice(0, 1), Encoded(cap.feats[:1], cap.lengths[:1], {"global": cap.extras["global"][:1]}))
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        model.explain(img.slice(0, 1), cap.slice(0, 1))


# ----------------------------------------------------------------------------------------------
# evaluation batching (§4): reference-mode captions are encoded in file order
# ----------------------------------------------------------------------------------------------
def test_evaluator_encodes_reference_mode_captions_in_file_order_batches():
    from itmkit.evaluate.evaluator import _encode_captions_by_length

    g = torch.Generator().manual_seed(5)
    caption_ids = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (3, 8, 5, 2, 9, 4, 6)]
    split = SimpleNamespace(captions=[str(i) for i in range(len(caption_ids))], split="test")
    pipeline = SimpleNamespace(encode=lambda c: caption_ids[int(c)], pad_id=0)
    for padding in ("reference", "masked"):
        model = make_model(word_padding=padding)
        with torch.no_grad():
            encoded = _encode_captions_by_length(model, split, pipeline, 3, "cpu", False)
            for start in range(0, 7, 3):  # batches of 3 consecutive captions, padded to their max
                batch = caption_ids[start : start + 3]
                L = max(len(t) for t in batch)
                tokens = torch.tensor([t + [0] * (L - len(t)) for t in batch])
                expected = model.encode_captions(tokens, torch.tensor([len(t) for t in batch]))
                for row, ids in enumerate(batch):
                    n = len(ids)
                    assert torch.allclose(encoded.feats[start + row, :n], expected.feats[row, :n], atol=1e-12), padding


# ----------------------------------------------------------------------------------------------
# presets and registry
# ----------------------------------------------------------------------------------------------
def test_presets_follow_the_recipes():
    from itmkit.methods.registry import get_method

    spec = get_method("lhsc")
    for name in ("paper-f30k", "paper-coco", "paper"):
        cfg = spec.preset(name)
        assert isinstance(cfg.model, LHSCConfig) and cfg.method == "lhsc"
        assert (cfg.train.epochs, cfg.train.lr_decay_epochs, cfg.train.lr, cfg.train.batch_size) == (50, (20,), 2e-4, 128)
        assert cfg.train.optimizer == "adam" and cfg.train.max_violation and cfg.train.sum_warmup_epochs == 0
        assert cfg.train.grad_clip == 2.0 and cfg.train.eval_batch_size == 100
        m = cfg.model
        assert (m.embed_size, m.sim_dim, m.num_regions, m.region_graph_blocks, m.word_attention_blocks) == (1024, 256, 36, 4, 4)
        assert m.word_padding == "reference" and m.word_attention_dropout == 0.0 and m.word_dropout == 0.4
        assert cfg.text.word_dim == 300 and not cfg.data.caption_augment and cfg.data.region_drop == 0
    assert spec.preset("paper-coco").preset == "paper-coco"
    for name in ("smoke", "course"):
        cfg = spec.preset(name)
        assert cfg.model.word_dropout == 0 and cfg.train.sum_warmup_epochs >= 1
        model = spec.build(cfg, 50)
        assert isinstance(model, LHSC) and model.pairwise and len(model.image.graph.blocks) == 4


# ----------------------------------------------------------------------------------------------
# checkpoint import (§7)
# ----------------------------------------------------------------------------------------------
def reference_checkpoint(images, seed=0, batches_tracked=True):
    """A released-checkpoint-shaped dict with the key names and shapes of lhsc.md §7 (written out
    by hand, not taken from itmkit's model), random float64 values: SGRAF-SAF's layout from
    ``tests/test_sgraf.py`` (``fc``, embedding, ``cap_rnn``, ``sim_enc`` with the SAF head renamed
    ``cal_sim_base_atten``) plus the ``IM_GCN_k`` and ``W_att{k}`` blocks. The IM_GCN BatchNorms
    get the running statistics of ``images`` passed through the reference's conv layout (§8.6)."""
    g = torch.Generator().manual_seed(seed + 50)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3

    base = sgraf_reference_checkpoint("SAF", word_dim=E, seed=seed)
    img, txt, sim = ({k: v.double() if v.is_floating_point() else v for k, v in part.items()} for part in base["model"])
    sim = {k.replace("SAF_module.", "cal_sim_base_atten."): v for k, v in sim.items()}
    d = D
    for k in range(1, 5):
        p = f"IM_GCN_{k}."
        img[p + "g.weight"], img[p + "g.bias"] = rnd(d, d, 1), rnd(d)
        for name in ("theta", "theta1", "theta2", "theta3", "phi", "phi1", "phi2", "phi3"):
            img[p + name + ".weight"], img[p + name + ".bias"] = rnd(d // 4, d, 1), rnd(d // 4)
        for name in ("fc1", "fc2"):
            img[p + name + ".weight"], img[p + name + ".bias"] = rnd(d, d), rnd(d)
        img[p + "W.0.weight"], img[p + "W.0.bias"] = rnd(d, d, 1), rnd(d)
        img[p + "W.1.weight"], img[p + "W.1.bias"] = 0.3 * (1 + rnd(d)), rnd(d)
        img[p + "W.1.running_mean"], img[p + "W.1.running_var"] = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
        img[p + "W.1.num_batches_tracked"] = torch.tensor(777, dtype=torch.int64)
    calibrate_reference_image_bn(img, images)
    for k in range(1, 5):
        for part in ("embedding_local", "embedding_global", "embedding_v"):
            txt[f"W_att{k}.{part}.0.weight"], txt[f"W_att{k}.{part}.0.bias"] = rnd(E, E), rnd(E)
    if not batches_tracked:  # a PyTorch 0.4.0 file
        img, txt, sim = ({k: v for k, v in part.items() if not k.endswith("num_batches_tracked")} for part in (img, txt, sim))
    opt = argparse.Namespace(
        data_name="f30k_precomp", data_path="/Data1/zengsheng/data", vocab_path="./vocab/", embed_size=d,
        sim_dim=S, img_dim=IMG_DIM, word_dim=E, vocab_size=VOCAB, num_layers=1, bi_gru=True,
        max_violation=True, drop_out=0.0, num_epochs=50, lr_update=20, learning_rate=2e-4, batch_size=128,
        margin=0.2, grad_clip=2.0, no_imgnorm=False, no_txtnorm=False, device="1",
    )  # fmt: skip
    return {"epoch": 50, "model": [img, txt, sim], "best_rsum": 480.0, "Eiters": 99999, "opt": opt}


def reference_image_encoder(img, feats):
    """The reference ``EncoderImage.forward`` in its own layout (channels first, ``conv1d`` with
    the ``[out, in, 1]`` weights, the four θ/φ convs concatenated): ``feats [B, N, img_dim]`` ->
    ``([B, N, d], pre-BN updates per block)``; eval-mode BatchNorm."""
    x = (feats @ img["fc.weight"].t() + img["fc.bias"]).permute(0, 2, 1)  # [B, d, N]
    updates = []
    for k in range(1, 5):
        p = f"IM_GCN_{k}."

        def conv(name, v, p=p):
            return F.conv1d(v, img[p + name + ".weight"], img[p + name + ".bias"])

        g_x = conv("g", x).permute(0, 2, 1)
        theta = torch.cat([conv(n, x) for n in ("theta", "theta1", "theta2", "theta3")], 1).permute(0, 2, 1)
        phi = torch.cat([conv(n, x) for n in ("phi", "phi1", "phi2", "phi3")], 1).permute(0, 2, 1)
        theta = theta @ img[p + "fc1.weight"].t() + img[p + "fc1.bias"]
        phi = phi @ img[p + "fc2.weight"].t() + img[p + "fc2.bias"]
        f = theta @ phi.transpose(1, 2) / x.shape[-1]
        y = (f @ g_x).permute(0, 2, 1)
        z = conv("W.0", y)
        updates.append(z)
        mean, var = img[p + "W.1.running_mean"], img[p + "W.1.running_var"]
        z = (z - mean[:, None]) / torch.sqrt(var[:, None] + 1e-5) * img[p + "W.1.weight"][:, None] + img[p + "W.1.bias"][:, None]
        x = x + z
    return l2n(x.permute(0, 2, 1)), updates


def calibrate_reference_image_bn(img, feats):
    """Running stats = the statistics of ``feats``'s pre-BN updates, block by block (§8.6)."""
    for k in range(1, 5):
        _, updates = reference_image_encoder(img, feats)
        z = updates[k - 1].permute(0, 2, 1).reshape(-1, updates[k - 1].shape[1])
        img[f"IM_GCN_{k}.W.1.running_mean"], img[f"IM_GCN_{k}.W.1.running_var"] = z.mean(0), z.var(0)


def test_convert_checkpoint_loads_strictly_and_encodes_like_the_reference_layout(tmp_path):
    from itmkit.checkpoints import load_strict

    images, img_len, tokens, lengths = make_inputs(n_img=3, lengths=(5, 3))
    checkpoint = reference_checkpoint(images)
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)  # a pickled argparse.Namespace inside, as released
    run_cfg, state = convert_checkpoint(path)
    assert run_cfg.method == "lhsc" and run_cfg.preset == "paper-f30k"
    cfg = run_cfg.model
    assert (cfg.embed_size, cfg.sim_dim, cfg.img_dim, cfg.num_regions, cfg.region_graph_blocks, cfg.word_attention_blocks) == (D, S, IMG_DIM, R, 4, 4)
    assert cfg.word_padding == "reference" and run_cfg.text.word_dim == E
    assert run_cfg.train.epochs == 50 and run_cfg.train.lr_decay_epochs == (20,)
    model = LHSC(cfg, run_cfg.text, VOCAB + 1).double()
    load_strict(model, state, str(path))
    img, txt, sim = checkpoint["model"]
    block = model.image.graph.blocks[2]
    q = D // 4
    assert torch.equal(block.theta.weight[2 * q : 3 * q], img["IM_GCN_3.theta2.weight"][..., 0])  # stacking order
    assert torch.equal(block.phi.bias[3 * q :], img["IM_GCN_3.phi3.bias"])
    assert torch.equal(block.bn.running_var, img["IM_GCN_3.W.1.running_var"])
    assert torch.equal(model.text.word_layers.blocks[3].embedding_v.weight, txt["W_att4.embedding_v.0.weight"])
    assert torch.equal(model.text.rnn.weight_hh_l0_reverse, txt["cap_rnn.weight_hh_l0_reverse"])
    assert torch.all(model.text.embed.weight[VOCAB] == 0)  # itmkit's <mask> row, never read
    assert torch.equal(model.sim.SAF_module.bn.running_mean, sim["cal_sim_base_atten.bn.running_mean"])
    model.eval()
    with torch.no_grad():
        encoded = model.encode_images(images, img_len)
        expected, _ = reference_image_encoder(img, images)
        assert torch.allclose(encoded.feats, expected, atol=1e-10)
        assert encoded.feats.abs().max() < 10  # calibrated BatchNorms keep the cubic blocks sane
        scores = model.score_block(encoded, model.encode_captions(tokens, lengths))
        words = ref_caption(model, tokens[1], 3, padded_to=5)
        assert abs(float(scores[2, 1]) - float(ref_score(model.sim, expected[2], words))) < 1e-10


def test_convert_checkpoint_accepts_pytorch_040_files_without_num_batches_tracked():
    images = make_inputs(n_img=3)[0]
    checkpoint = reference_checkpoint(images, batches_tracked=False)
    run_cfg, state = convert_checkpoint(checkpoint)
    assert run_cfg.model.region_graph_blocks == 4
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(counters) == 4 + 3  # the IM_GCN BatchNorms, VisualSA's two and SAF's
    assert all(int(state[k]) == 0 for k in counters)
    assert torch.equal(state["sim.SAF_module.bn.running_mean"], checkpoint["model"][2]["cal_sim_base_atten.bn.running_mean"])


def test_convert_checkpoint_names_what_does_not_fit():
    images = make_inputs(n_img=3)[0]
    broken = reference_checkpoint(images)
    del broken["model"][0]["IM_GCN_2.theta1.bias"]
    with pytest.raises(ValueError, match="missing IM_GCN_2.theta1.bias"):
        convert_checkpoint(broken)
    extra = reference_checkpoint(images)
    extra["model"][1]["W_att2.embedding_q.0.weight"] = torch.zeros(E, E)
    with pytest.raises(ValueError, match="unexpected.*text.word_layers.blocks.1.embedding_q.0.weight"):
        convert_checkpoint(extra)
    gap = reference_checkpoint(images)
    gap["model"][0] = {k.replace("IM_GCN_4.", "IM_GCN_5."): v for k, v in gap["model"][0].items()}
    with pytest.raises(ValueError, match=r"IM_GCN_1..IM_GCN_4, found \[1, 2, 3, 5\]"):
        convert_checkpoint(gap)
    sgr = reference_checkpoint(images)
    sgr["model"][2]["SGR_module.0.graph_query_w.weight"] = torch.zeros(S, S)
    with pytest.raises(ValueError, match="SAF head.*SGR_module"):
        convert_checkpoint(sgr)
    with pytest.raises(ValueError, match="field 'model'.*list"):
        convert_checkpoint({"model": {}})
