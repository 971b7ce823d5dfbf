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
    scan_attention,
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


def test_per_pair_scan_attention_equals_the_block_diagonal():
    regions, words, mask, lengths = make_block(n=3, lengths=(4, 2, 5), garbage=False)
    block, _ = t2i_attention(regions, words, mask)
    for j, Lj in enumerate(lengths.tolist()):
        per_pair = scan_attention(words[j : j + 1, :Lj].expand(3, Lj, D), regions)
        assert torch.allclose(per_pair, block[:, j, :Lj], atol=1e-12)
        assert torch.allclose(per_pair.norm(dim=-1), torch.ones(3, Lj, dtype=torch.float64))


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


def test_graph_reasoning_cached_weights_follow_parameter_updates():
    # evaluation caches [M | W_r^T]; an optimiser step or load_state_dict must invalidate it
    torch.manual_seed(3)
    step, fresh = GraphReasoning(S).double(), GraphReasoning(S).double()
    nodes = torch.randn(2, 3, 4, S, dtype=torch.float64)
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    with torch.no_grad():
        step(nodes, mask)
        step.graph_key_w.weight.add_(0.25)  # in place, like an optimiser step
        fresh.load_state_dict(step.state_dict())
        assert torch.allclose(step(nodes, mask)[0], fresh(nodes, mask)[0], atol=1e-12)
        step.load_state_dict(GraphReasoning(S).double().state_dict())
        fresh.load_state_dict(step.state_dict())
        assert torch.allclose(step(nodes, mask)[0], fresh(nodes, mask)[0], atol=1e-12)
    # with autograd the weights get gradients through the fused product
    out, _ = step(nodes, mask)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in
               (step.graph_query_w.weight, step.graph_key_w.weight, step.sim_graph_w.weight, step.sim_graph_w.bias))


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
            ctx = torch.stack([l2n((attn[:, t, None] * regions[i]).sum(0)) for t in range(Lj)])
            assert torch.allclose(details["attended"][i, j, :Lj], ctx, atol=1e-12)
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
@pytest.mark.parametrize("momentum", [0.1, None])
def test_saf_train_batchnorm_matches_per_caption_calls(momentum):
    torch.manual_seed(0)
    saf = AttentionFiltration(S).double().train()
    reference_bn = nn.BatchNorm1d(1, momentum=momentum).double().train()
    saf.bn.momentum = momentum
    with torch.no_grad():
        for bn in (saf.bn, reference_bn):
            bn.num_batches_tracked.fill_(3)
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
    assert int(saf.bn.num_batches_tracked) == int(reference_bn.num_batches_tracked) == 3 + 4


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
            if name.endswith(("graph_key_w.bias", "embedding_common.0.bias")):
                # these biases add the same logit to every entry of a softmax and cancel in it, so
                # their gradient is exactly 0 in the reference too (the key bias is never computed)
                assert p.grad is None or p.grad.abs().max() < 1e-6, name  # 0 up to fp32 rounding
                continue
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_gradients_equal_per_pair_reference(module):
    sim = make_sim(module)
    regions, words, mask, lengths = make_block(n=2, lengths=(3, 5, 2))
    weights = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (block_scores(sim, regions, words, mask) * weights).sum().backward()
    block_grads = {k: p.grad.clone() for k, p in sim.named_parameters() if p.grad is not None}
    sim.zero_grad(set_to_none=True)
    total = sum(weights[i, j] * ref_score(sim, regions[i], words[j, : lengths[j]]) for i in range(2) for j in range(3))
    total.backward()
    for name, p in sim.named_parameters():
        if name.endswith("graph_key_w.bias"):
            assert p.grad.abs().max() < 1e-12  # cancels in the softmax (see the test above)
            continue
        assert torch.allclose(block_grads[name], p.grad, atol=1e-10), name


# ----------------------------------------------------------------------------------------------
# the model: encoders + engine
# ----------------------------------------------------------------------------------------------
from itmkit.config import TextConfig  # noqa: E402
from itmkit.methods.sgraf import SGRAF, SGRAFConfig, convert_checkpoint  # noqa: E402

VOCAB = 30


def make_model(module="SGR", seed=0, **overrides) -> SGRAF:
    torch.manual_seed(seed)
    cfg = SGRAFConfig(module=module, img_dim=10, embed_size=D, sim_dim=S, num_regions=R, **overrides)
    return SGRAF(cfg, TextConfig(kind="bigru", word_dim=7), VOCAB).double().eval()


def make_inputs(n_img=7, lengths=(4, 9, 3, 6, 2, 8, 5, 7, 4, 3, 6), seed=2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, R, 10, generator=g, dtype=torch.float64)
    L = max(lengths)
    tokens = torch.randint(4, VOCAB, (len(lengths), L), generator=g)
    lengths_t = torch.tensor(lengths)
    tokens = tokens.masked_fill(torch.arange(L)[None] >= lengths_t[:, None], 0)
    return images, torch.full((n_img,), R), tokens, lengths_t


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_engine_matrix_equals_per_pair_loop_fp32(module):
    model = make_model(module).float()
    images, img_len, tokens, lengths = make_inputs()
    images = images.float()
    with torch.no_grad():
        img = model.encode_images(images, img_len)
        cap = model.encode_captions(tokens, lengths)
        assert set(img.extras) == {"global"} and img.extras["global"].shape == (7, D)
        # a tiny budget forces many blocks (caption sorting, trimming, reassembly)
        per_pair = model.pair_workspace_bytes(img, cap)
        full = model.similarity(img, cap, memory_budget=per_pair * 6)
        for i in range(len(images)):
            regions = model.image(images[i : i + 1], img_len[i : i + 1])[0]
            for j in range(len(lengths)):
                Lj = int(lengths[j])
                words = model.text(tokens[j : j + 1, :Lj], lengths[j : j + 1])[0]  # caption alone, unpadded
                assert abs(float(full[i, j]) - float(ref_score(model.sim, regions, words))) < 1e-5, (i, j)


def test_model_accepts_fewer_regions_and_masks_them():
    model = make_model("SAF")
    images, _, tokens, lengths = make_inputs(n_img=3)
    img_lengths = torch.tensor([4, 3, 4])
    with torch.no_grad():
        cap = model.encode_captions(tokens, lengths)
        short = model.encode_images(images[:, :4], img_lengths)  # K = 4 < num_regions: padded up
        assert short.feats.shape == (3, R, D)
        junk = images.masked_fill(torch.arange(R)[None, :, None] >= img_lengths[:, None, None], 7.0)
        padded = model.encode_images(junk, img_lengths)  # garbage beyond the lengths, K = R
        assert torch.allclose(model.score_block(padded, cap), model.score_block(short, cap), atol=1e-12)
    with pytest.raises(ValueError, match="num_regions=5.*found 9"):
        model.encode_images(torch.randn(2, 9, 10, dtype=torch.float64), torch.tensor([9, 9]))


def test_train_step_reduces_loss_on_a_fixed_batch():
    from itmkit.losses import hinge_triplet_loss

    model = make_model("SGR").float().train()
    images, img_len, tokens, lengths = make_inputs(n_img=11)
    images = images.float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # same dropout masks each step: a deterministic objective
        scores = model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, lengths))
        loss = hinge_triplet_loss(scores, 0.2, max_violation=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_pair_workspace_bytes_scales_with_the_pair_sizes():
    model = make_model()
    images, img_len, tokens, lengths = make_inputs()
    with torch.no_grad():
        img, cap = model.encode_images(images, img_len), model.encode_captions(tokens, lengths)
        small = model.pair_workspace_bytes(img, cap)
        longer = model.pair_workspace_bytes(img, cap.slice(0, 3))  # trimmed to 9 -> 9 words
    L = cap.feats.shape[1]
    # at least the [L, d] attended tensor and the [L+1, s] nodes, in float64
    assert small >= 8 * (L * D + (L + 1) * S)
    assert longer == small
    with torch.enable_grad():
        assert model.pair_workspace_bytes(img, cap) > small


# ----------------------------------------------------------------------------------------------
# checkpoint import (§7)
# ----------------------------------------------------------------------------------------------
def reference_checkpoint(module: str, d=D, s=S, regions=R, img_dim=10, word_dim=7, vocab=VOCAB, seed=0):
    """A released-checkpoint-shaped dict with the reference key names and shapes of sgraf.md §7
    (written out by hand, not taken from itmkit's model), random values and BN stats."""
    import argparse

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    img = {"fc.weight": rnd(d, img_dim), "fc.bias": rnd(d)}
    txt = {"embed.weight": rnd(vocab, word_dim)}
    for suffix in ("", "_reverse"):
        txt[f"cap_rnn.weight_ih_l0{suffix}"] = rnd(3 * d, word_dim)
        txt[f"cap_rnn.weight_hh_l0{suffix}"] = rnd(3 * d, d)
        txt[f"cap_rnn.bias_ih_l0{suffix}"] = rnd(3 * d)
        txt[f"cap_rnn.bias_hh_l0{suffix}"] = rnd(3 * d)

    def bn(prefix, size):
        return {f"{prefix}.weight": 1 + rnd(size), f"{prefix}.bias": rnd(size), f"{prefix}.running_mean": rnd(size),
                f"{prefix}.running_var": 0.5 + torch.rand(size, generator=g),
                f"{prefix}.num_batches_tracked": torch.tensor(1234, dtype=torch.int64)}

    sim = {}
    for side in ("v_global_w", "t_global_w"):
        for part in ("embedding_local", "embedding_global"):
            sim[f"{side}.{part}.0.weight"], sim[f"{side}.{part}.0.bias"] = rnd(d, d), rnd(d)
        sim[f"{side}.embedding_common.0.weight"], sim[f"{side}.embedding_common.0.bias"] = rnd(1, d), rnd(1)
    sim.update(bn("v_global_w.embedding_local.1", regions))
    sim.update(bn("v_global_w.embedding_global.1", d))
    for name in ("sim_tranloc_w", "sim_tranglo_w"):
        sim[f"{name}.weight"], sim[f"{name}.bias"] = rnd(s, d), rnd(s)
    sim["sim_eval_w.weight"], sim["sim_eval_w.bias"] = rnd(1, s), rnd(1)
    if module == "SGR":
        for i in range(3):
            for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
                sim[f"SGR_module.{i}.{name}.weight"], sim[f"SGR_module.{i}.{name}.bias"] = rnd(s, s), rnd(s)
    else:
        sim["SAF_module.attn_sim_w.weight"], sim["SAF_module.attn_sim_w.bias"] = rnd(1, s), rnd(1)
        sim.update(bn("SAF_module.bn", 1))
    opt = argparse.Namespace(
        data_name="coco_precomp", data_path="/apdcephfs/share_1313228/data", vocab_path="/apdcephfs/vocab",
        model_name="/apdcephfs/runs/coco_" + module, module_name=module, sgr_step=3, embed_size=d, sim_dim=s,
        img_dim=img_dim, word_dim=word_dim, vocab_size=vocab, num_layers=1, bi_gru=True, max_violation=True,
        no_imgnorm=False, no_txtnorm=False,
    )
    return {"epoch": 20, "model": [img, txt, sim], "best_rsum": 500.0, "Eiters": 88000, "opt": opt}


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_convert_checkpoint_loads_strictly_and_scores_like_the_reference(module, tmp_path):
    from itmkit.checkpoints import load_strict

    checkpoint = reference_checkpoint(module)
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)  # a pickled argparse.Namespace inside, as released
    run_cfg, state = convert_checkpoint(path)
    assert run_cfg.method == "sgraf" and run_cfg.preset == f"paper-coco-{module.lower()}"
    cfg = run_cfg.model
    assert (cfg.module, cfg.embed_size, cfg.sim_dim, cfg.img_dim, cfg.num_regions) == (module, D, S, 10, R)
    assert run_cfg.train.epochs == 20 and run_cfg.train.lr_decay_epochs == (10,)
    model = SGRAF(cfg, run_cfg.text, VOCAB + 1)
    load_strict(model, state, str(path))
    img, txt, sim = checkpoint["model"]
    assert torch.equal(model.image.fc.weight, img["fc.weight"])
    assert torch.equal(model.text.rnn.weight_hh_l0_reverse, txt["cap_rnn.weight_hh_l0_reverse"])
    assert torch.equal(model.text.embed.weight[:VOCAB], txt["embed.weight"])
    assert torch.all(model.text.embed.weight[VOCAB] == 0)  # the appended <mask> row
    assert torch.equal(model.sim.v_global_w.embedding_local[1].running_var, sim["v_global_w.embedding_local.1.running_var"])
    if module == "SGR":
        assert torch.equal(model.sim.SGR_module[2].graph_key_w.weight, sim["SGR_module.2.graph_key_w.weight"])
    else:
        assert torch.equal(model.sim.SAF_module.bn.running_mean, sim["SAF_module.bn.running_mean"])
    # the imported model scores like the per-pair reference with the reference's tensors
    model = model.double().eval()
    images, img_len, tokens, lengths = make_inputs(n_img=2, lengths=(5, 3))
    with torch.no_grad():
        scores = model.score_block(model.encode_images(images, img_len), model.encode_captions(tokens, lengths))
        regions = model.image(images[1:2], img_len[1:2])[0]
        words = model.text(tokens[1:2, :3], lengths[1:2])[0]
        assert abs(float(scores[1, 1]) - float(ref_score(model.sim, regions, words))) < 1e-10


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_the_similarity_alone_scores_held_features_like_the_reference(module):
    """A checkpoint whose encoders are absent: convert sim_enc alone, load it into a model whose
    encoders stay as built (reported by name), score region / word features held elsewhere."""
    from itmkit.checkpoints import load_similarity_part
    from itmkit.similarity.scoring import score_sets

    checkpoint = reference_checkpoint(module)
    checkpoint["model"] = [{}, {}, checkpoint["model"][2]]
    run_cfg, state = convert_checkpoint(checkpoint, similarity_only=True)
    assert run_cfg.model.embed_size == D and run_cfg.model.sim_dim == S and run_cfg.model.module == module
    assert state and all(key.startswith("sim.") for key in state)
    model = SGRAF(run_cfg.model, run_cfg.text, 5).double().eval()
    report = load_similarity_part(model, state, "sim only")
    assert "image.fc.weight" in report.missing and "text.rnn.weight_hh_l0" in report.missing
    g = torch.Generator().manual_seed(5)
    regions = torch.nn.functional.normalize(torch.randn(2, R, D, generator=g, dtype=torch.float64), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(3, 6, D, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.tensor([6, 4, 2])
    scores = score_sets(model, regions, words, caption_lengths=lengths)  # stored in fp32 by the engine
    with torch.no_grad():
        for i in range(2):
            for j in range(3):
                expected = float(ref_score(model.sim, regions[i], words[j, : int(lengths[j])]))
                assert abs(float(scores[i, j]) - expected) < 1e-6
    with pytest.raises(KeyError, match="img_enc: expected key 'fc.weight'"):
        convert_checkpoint(checkpoint)  # the whole model needs its encoders


def test_convert_checkpoint_rejects_inconsistent_files():
    checkpoint = reference_checkpoint("SAF")
    checkpoint["opt"].module_name = "SGR"
    with pytest.raises(ValueError, match="module_name: expected 'SAF'.*found 'SGR'"):
        convert_checkpoint(checkpoint)
    broken = reference_checkpoint("SGR")
    del broken["model"][2]["SGR_module.1.sim_graph_w.bias"]
    with pytest.raises(ValueError, match="missing.*sim.SGR_module.1.sim_graph_w.bias"):
        convert_checkpoint(broken)
    with pytest.raises(ValueError, match="field 'model'.*list"):
        convert_checkpoint({"model": {}})


# ----------------------------------------------------------------------------------------------
# presets and the SGRAF ensemble
# ----------------------------------------------------------------------------------------------
def test_presets_follow_the_recipes():
    from itmkit.methods.registry import get_method

    spec = get_method("sgraf")
    expected = {"paper-f30k-sgr": ("SGR", 40, 30), "paper-f30k-saf": ("SAF", 30, 20),
                "paper-coco-sgr": ("SGR", 20, 10), "paper-coco-saf": ("SAF", 20, 10), "paper": ("SGR", 40, 30)}
    for name, (module, epochs, decay) in expected.items():
        cfg = spec.preset(name)
        assert (cfg.model.module, cfg.train.epochs, cfg.train.lr_decay_epochs) == (module, epochs, (decay,))
        assert cfg.train.lr == 2e-4 and cfg.train.optimizer == "adam" and cfg.train.max_violation
        assert cfg.train.sum_warmup_epochs == 0 and cfg.model.bi_gru and cfg.model.num_regions == 36
        assert cfg.data.region_drop == 0 and not cfg.data.caption_augment  # §5: no augmentation
    for name in ("smoke", "course"):
        cfg = spec.preset(name)
        model = spec.build(cfg, 50)
        assert isinstance(model, SGRAF) and model.pairwise


def test_sgraf_ensemble_is_the_mean_of_sgr_and_saf():
    from itmkit.evaluate.ensemble import average_similarities

    images, img_len, tokens, lengths = make_inputs(n_img=2, lengths=(4, 3, 5, 6, 2, 3, 4, 5, 6, 7))
    matrices = []
    for module in ("SGR", "SAF"):
        model = make_model(module)
        with torch.no_grad():
            matrices.append(model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, lengths)))
    ensemble = average_similarities([m.numpy() for m in matrices])
    assert ensemble.shape == (2, 10)
    assert torch.allclose(torch.from_numpy(ensemble), ((matrices[0] + matrices[1]) / 2).float(), atol=1e-6)
    assert not torch.allclose(matrices[0], matrices[1])


def test_reduced_precision_blocks_are_scored_in_the_weights_precision():
    model = make_model("SAF").float()
    images, img_len, tokens, lengths = make_inputs(n_img=2, lengths=(4, 3))
    with torch.no_grad():
        img, cap = model.encode_images(images.float(), img_len), model.encode_captions(tokens, lengths)
        full = model.score_block(img, cap)
        half = model.score_block(img.to(dtype=torch.bfloat16), cap.to(dtype=torch.bfloat16))
    assert half.dtype == torch.float32
    assert torch.allclose(half, full, atol=2e-2)
