"""SGRAF (sgraf.md): layers against a per-pair reference written straight from the spec's
equations (one image, one caption, the caption sliced to its valid words, plain loops), the
vectorised block against that reference, masking/padding, the train-mode SAF BatchNorm, the
model, presets, the checkpoint converter and the ensemble."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from itmkit.models.sgraf_modules import (
    AttentionFiltration,
    GraphReasoning,
    SimilarityEncoder,
    VisualSelfAttention,
    t2i_attention,
)

D, S, R = 8, 6, 5  # embed, sim_dim, regions of the small test cases


# ----------------------------------------------------------------------------------------------
# the per-pair reference (§3.3), deliberately loop-based and independent of the vectorised code
# ----------------------------------------------------------------------------------------------
def lin(layer: nn.Linear, x):
    return x @ layer.weight.t() + layer.bias


def l2n(x):
    return x / (torch.sqrt((x * x).sum(-1, keepdim=True)) + 1e-8)


def bn_eval(bn: nn.BatchNorm1d, x, channel: int):
    """Eval-mode BatchNorm with the channel index ``channel`` (scalar stats of that channel)."""
    return (x - bn.running_mean[channel]) / torch.sqrt(bn.running_var[channel] + bn.eps) * bn.weight[channel] + bn.bias[channel]


def ref_visual_global(vsa: VisualSelfAttention, regions):
    """``regions [R, d]`` of one image -> ``[d]`` (eval mode)."""
    mean = regions.mean(0)
    bn_r, bn_d = vsa.embedding_local[1], vsa.embedding_global[1]
    g = torch.tanh(torch.stack([bn_eval(bn_d, lin(vsa.embedding_global[0], mean)[f], f) for f in range(mean.shape[0])]))
    logits = []
    for k in range(regions.shape[0]):
        l_k = torch.tanh(bn_eval(bn_r, lin(vsa.embedding_local[0], regions[k]), k))
        logits.append(lin(vsa.embedding_common[0], l_k * g)[0])
    w = torch.softmax(torch.stack(logits), 0)
    return l2n(sum(w[k] * regions[k] for k in range(regions.shape[0])))


def ref_text_global(tsa, words):
    """``words [L_j, d]`` (valid words only) -> ``[d]``."""
    g = torch.tanh(lin(tsa.embedding_global[0], words.mean(0)))
    logits = [lin(tsa.embedding_common[0], torch.tanh(lin(tsa.embedding_local[0], w)) * g)[0] for w in words]
    w = torch.softmax(torch.stack(logits), 0)
    return l2n(sum(w[t] * words[t] for t in range(words.shape[0])))


def ref_nodes(sim: SimilarityEncoder, regions, words):
    """One pair: ``regions [R, d]``, ``words [L_j, d]`` -> nodes ``[L_j + 1, s]``, attention ``[R, L_j]``."""
    img_glo = ref_visual_global(sim.v_global_w, regions)
    cap_glo = ref_text_global(sim.t_global_w, words)
    raw = regions @ words.t()  # [R, L_j]
    raw = torch.where(raw > 0, raw, 0.1 * raw)
    normed = torch.stack([raw[k] / (torch.sqrt((raw[k] ** 2).sum()) + 1e-8) for k in range(raw.shape[0])])
    nodes = [l2n(lin(sim.sim_tranglo_w, (img_glo - cap_glo) ** 2))]
    attn = []
    for t in range(words.shape[0]):
        a = torch.softmax(9.0 * normed[:, t], 0)
        attn.append(a)
        ctx = l2n(sum(a[k] * regions[k] for k in range(regions.shape[0])))
        nodes.append(l2n(lin(sim.sim_tranloc_w, (ctx - words[t]) ** 2)))
    return torch.stack(nodes), torch.stack(attn, 1)


def ref_score(sim: SimilarityEncoder, regions, words):
    x, _ = ref_nodes(sim, regions, words)
    if sim.module_name == "SGR":
        for step in sim.SGR_module:
            edges = torch.softmax(lin(step.graph_query_w, x) @ lin(step.graph_key_w, x).t(), -1)
            x = torch.relu(lin(step.sim_graph_w, edges @ x))
        v = x[0]
    else:
        saf = sim.SAF_module
        a = torch.sigmoid(bn_eval(saf.bn, lin(saf.attn_sim_w, x)[:, 0], 0))
        a = a / (a.abs().sum() + 1e-8)
        v = l2n((a[:, None] * x).sum(0))
    return torch.sigmoid(lin(sim.sim_eval_w, v))[0]


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------
def make_sim(module: str, dtype=torch.float64, seed: int = 0) -> SimilarityEncoder:
    torch.manual_seed(seed)
    sim = SimilarityEncoder(D, S, module, num_regions=R).to(dtype)
    with torch.no_grad():  # random running stats and affine BN parameters, so the BN axis matters
        for bn in sim.modules():
            if isinstance(bn, nn.BatchNorm1d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
    return sim.eval()


def make_block(n=4, lengths=(3, 6, 2, 5, 4), dtype=torch.float64, seed=1, garbage=True):
    g = torch.Generator().manual_seed(seed)
    regions = l2n(torch.randn(n, R, D, generator=g, dtype=dtype))
    L = max(lengths)
    words = l2n(torch.randn(len(lengths), L, D, generator=g, dtype=dtype))
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(L)[None] < lengths_t[:, None]
    if garbage:  # padded slots hold junk: nothing may read them
        words = torch.where(mask[..., None], words, 100 * torch.randn(words.shape, generator=g, dtype=dtype))
    else:
        words = words * mask[..., None]
    return regions, words, mask, lengths_t


def block_scores(sim, regions, words, mask, details=None):
    return sim.score_block(
        regions, sim.global_image(regions), words, sim.global_caption(words, mask), mask, details=details
    )


# ----------------------------------------------------------------------------------------------
# layers by hand
# ----------------------------------------------------------------------------------------------
def test_xavier_init_bounds_and_zero_bias():
    sim = SimilarityEncoder(32, 16, "SGR", num_regions=36)
    for name, layer in sim.named_modules():
        if isinstance(layer, nn.Linear):
            bound = math.sqrt(6 / (layer.in_features + layer.out_features))
            assert layer.weight.abs().max() <= bound, name
            assert layer.weight.abs().max() > 0.8 * bound, name  # uniform over the whole range
            assert torch.all(layer.bias == 0), name


def test_invalid_module_name_raises():
    with pytest.raises(ValueError, match="'SGR' or 'SAF'.*'AVE'"):
        SimilarityEncoder(8, 4, "AVE", num_regions=3)


def test_visual_sa_rejects_wrong_region_count():
    vsa = VisualSelfAttention(D, num_regions=R).eval()
    with pytest.raises(ValueError, match="expected 5 regions.*found 7"):
        vsa(torch.randn(2, 7, D))


def test_local_attention_two_regions_by_hand():
    # one image with two orthogonal unit regions, one caption with two words
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    words = torch.tensor([[[1.0, 0.0], [0.6, -0.8]]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    attended, attn = t2i_attention(regions, words, mask)
    # S = [[1, 0.6], [0, -0.8]]; LeakyReLU -> [[1, 0.6], [0, -0.08]]; l2 over words per region
    s0 = torch.tensor([1.0, 0.6]) / (math.sqrt(1 + 0.36) + 1e-8)
    s1 = torch.tensor([0.0, -0.08]) / (0.08 + 1e-8)
    for t in range(2):
        e = torch.softmax(9 * torch.stack([s0[t], s1[t]]).double(), 0)
        assert torch.allclose(attn[0, 0, :, t], e, atol=1e-12)
        ctx = e / e.norm()  # regions are the unit axes, so ctx = weights, then l2-normalised
        assert torch.allclose(attended[0, 0, t], ctx, atol=1e-8)


def test_graph_reasoning_padded_nodes_neither_send_nor_receive():
    torch.manual_seed(0)
    step = GraphReasoning(S).double()
    nodes = torch.randn(2, 3, 5, S, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    out, edges = step(nodes, mask[None])
    assert torch.allclose(edges.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert torch.all(edges.masked_select(~mask[None, :, None, :].expand_as(edges)) == 0)  # no sending
    assert torch.all(out.masked_select(~mask[None, :, :, None].expand_as(out)) == 0)  # no receiving
    # changing the padded nodes changes nothing at the valid ones
    junk = torch.where(mask[None, :, :, None], nodes, torch.randn_like(nodes) * 50)
    out2, _ = step(junk, mask[None])
    assert torch.equal(out, out2)
    # the read-out-only path equals row 0 of the full step
    first, _ = step(nodes, mask[None], slice(0, 1))
    assert torch.allclose(first[..., 0, :], out[..., 0, :], atol=1e-14)


def test_saf_weights_are_l1_normalised_over_valid_nodes():
    torch.manual_seed(0)
    saf = AttentionFiltration(S).double().eval()
    nodes = torch.randn(2, 2, 4, S, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    vector, weights = saf(nodes, mask)
    assert torch.all(weights[:, 0, 3] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, dtype=torch.float64), atol=1e-7)
    # by hand for one pair: sigmoid(BN(W a + b)) with fresh BN stats (mean 0, var 1)
    a = torch.sigmoid((nodes[1, 0, :3] @ saf.attn_sim_w.weight[0] + saf.attn_sim_w.bias) / math.sqrt(1 + 1e-5))
    a = a / (a.sum() + 1e-8)
    assert torch.allclose(weights[1, 0, :3], a, atol=1e-12)
    assert torch.allclose(vector[1, 0], l2n((a[:, None] * nodes[1, 0, :3]).sum(0)), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# the vectorised block against the per-pair reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["SGR", "SAF"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_block_equals_per_pair_reference(module, dtype, atol):
    sim = make_sim(module, dtype)
    regions, words, mask, lengths = make_block(dtype=dtype)
    with torch.no_grad():
        block = block_scores(sim, regions, words, mask)
        ref = torch.stack(
            [torch.stack([ref_score(sim, regions[i], words[j, : lengths[j]]) for j in range(len(lengths))])
             for i in range(len(regions))]
        )
    assert block.shape == (4, 5) and block.dtype == dtype
    assert torch.all((block > 0) & (block < 1))
    assert torch.allclose(block, ref, atol=atol, rtol=0), (block - ref).abs().max()


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_intermediates_equal_reference(module):
    sim = make_sim(module)
    regions, words, mask, lengths = make_block()
    details: dict = {}
    with torch.no_grad():
        block_scores(sim, regions, words, mask, details)
        for i, j in [(0, 1), (3, 2)]:
            nodes, attn = ref_nodes(sim, regions[i], words[j, : lengths[j]])
            Lj = int(lengths[j])
            assert torch.allclose(details["nodes"][i, j, : Lj + 1], nodes, atol=1e-12)
            assert torch.all(details["nodes"][i, j, Lj + 1 :] == 0)
            assert torch.allclose(details["attention"][i, j, :, :Lj], attn, atol=1e-12)
    if module == "SAF":
        w = details["filtration_weights"]
        assert torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]), atol=1e-7)
        assert torch.all(w.masked_select(~sim.node_mask(mask)[None].expand_as(w)) == 0)
    else:
        assert details["sgr_edges2"].shape == (4, 5, 7, 7)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_padding_invariance(module):
    sim = make_sim(module)
    regions, words, mask, _ = make_block(garbage=False)
    with torch.no_grad():
        clean = block_scores(sim, regions, words, mask)
        garbage_words = torch.where(mask[..., None], words, torch.randn_like(words) * 1e3)
        assert torch.allclose(block_scores(sim, regions, garbage_words, mask), clean, atol=1e-13, rtol=0)
        wider = torch.cat([words, torch.randn(5, 4, D, dtype=words.dtype)], 1)
        wider_mask = torch.cat([mask, torch.zeros(5, 4, dtype=torch.bool)], 1)
        assert torch.allclose(block_scores(sim, regions, wider, wider_mask), clean, atol=1e-13, rtol=0)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_word_order_invariant_region_order_not(module):
    sim = make_sim(module)
    regions, words, mask, lengths = make_block(garbage=False)
    with torch.no_grad():
        base = block_scores(sim, regions, words, mask)
        permuted = words.clone()
        j, Lj = 1, int(lengths[1])
        permuted[j, :Lj] = words[j, torch.randperm(Lj, generator=torch.Generator().manual_seed(3))]
        assert torch.allclose(block_scores(sim, regions, permuted, mask), base, atol=1e-12)
        # regions: VisualSA's BatchNorm is over the region *index* (§8.2, §10)
        swapped = regions[:, torch.tensor([1, 0, 2, 3, 4])]
        assert not torch.allclose(block_scores(sim, swapped, words, mask), base, atol=1e-6)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_shard_invariance_eval(module):
    sim = make_sim(module)
    regions, words, mask, _ = make_block()
    with torch.no_grad():
        full = block_scores(sim, regions, words, mask)
        parts = torch.cat([
            torch.cat([block_scores(sim, regions[i : i + 3], words[j : j + 2], mask[j : j + 2]) for j in range(0, 5, 2)], 1)
            for i in range(0, 4, 3)
        ], 0)
    assert torch.allclose(parts, full, atol=1e-13, rtol=0)


def test_region_mask_equals_dropping_the_regions_from_attention():
    # with a region mask, masked regions get zero attention and do not enter the attended vector
    torch.manual_seed(0)
    regions, words, mask, _ = make_block()
    rmask = torch.ones(4, R, dtype=torch.bool)
    rmask[1, 3:] = False
    attended, attn = t2i_attention(regions, words.masked_fill(~mask[..., None], 0), mask, rmask)
    assert torch.all(attn[1, :, 3:] == 0)
    kept, _ = t2i_attention(regions[1:2, :3], words.masked_fill(~mask[..., None], 0), mask)
    assert torch.allclose(attended[1:2], kept, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# train mode: the SAF BatchNorm called once per caption (§3.4, §8.3)
# ----------------------------------------------------------------------------------------------
def test_saf_train_batchnorm_matches_per_caption_calls():
    torch.manual_seed(0)
    saf = AttentionFiltration(S).double().train()
    reference_bn = nn.BatchNorm1d(1).double().train()
    with torch.no_grad():
        for bn in (saf.bn, reference_bn):
            bn.running_mean.fill_(0.3)
            bn.running_var.fill_(1.7)
            bn.weight.fill_(1.2)
            bn.bias.fill_(-0.1)
    nodes = torch.randn(3, 4, 6, S, dtype=torch.float64)
    lengths = [6, 3, 5, 2]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    vector, weights = saf(nodes, mask)
    for j, P in enumerate(lengths):  # the reference loop: slice, one BN call per caption, in order
        logits = nodes[:, j, :P] @ saf.attn_sim_w.weight[0] + saf.attn_sim_w.bias  # [n, P]
        a = torch.sigmoid(reference_bn(logits[:, None, :]))[:, 0]
        a = a / (a.abs().sum(-1, keepdim=True) + 1e-8)
        assert torch.allclose(weights[:, j, :P], a, atol=1e-12)
        assert torch.allclose(vector[:, j], l2n((a[..., None] * nodes[:, j, :P]).sum(1)), atol=1e-12)
    assert torch.allclose(saf.bn.running_mean, reference_bn.running_mean, atol=1e-12)
    assert torch.allclose(saf.bn.running_var, reference_bn.running_var, atol=1e-12)
    assert int(saf.bn.num_batches_tracked) == int(reference_bn.num_batches_tracked) == 4


def test_sgr_train_mode_differs_from_eval_only_through_batch_statistics():
    # §10: with dropout 0, train mode = eval mode once the running stats hold the batch statistics
    sim = make_sim("SGR")
    for m in sim.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    regions, words, mask, _ = make_block()
    n = regions.shape[0]
    with torch.no_grad():
        eval_before = block_scores(sim, regions, words, mask)
        sim.train()
        train_scores = block_scores(sim, regions, words, mask)
        assert not torch.allclose(train_scores, eval_before, atol=1e-6)
        bn_regions, bn_features = sim.v_global_w.embedding_local[1], sim.v_global_w.embedding_global[1]
        for bn in (bn_regions, bn_features):
            bn.momentum = 1.0  # one train call copies the batch statistics into the running stats
        sim.global_image(regions)
        # running_var holds the unbiased variance; train mode normalises with the biased one
        bn_regions.running_var.mul_((n * D - 1) / (n * D))
        bn_features.running_var.mul_((n - 1) / n)
        sim.eval()
        eval_after = block_scores(sim, regions, words, mask)
    assert torch.allclose(eval_after, train_scores, atol=1e-12)


def test_backward_runs_and_reaches_every_parameter():
    for module in ("SGR", "SAF"):
        sim = make_sim(module, torch.float32).train()
        regions, words, mask, _ = make_block(dtype=torch.float32)
        regions.requires_grad_(True)
        scores = block_scores(sim, regions, words, mask)
        scores.sum().backward()
        assert regions.grad is not None and torch.isfinite(regions.grad).all()
        for name, p in sim.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
