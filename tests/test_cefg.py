"""CEFG (cefg.md): every block against a per-pair, per-region reference written from the spec's
equations (plain loops: one image, one caption sliced to its words, a hand-written GRU), the
vectorised block against it, padding / word-order / shard invariance, the reduction to SGRAF,
the model through the data pipeline (adjacency columns, engine, trainer), explain, the AMR fusion,
the BERT variant, presets, the ensemble and the converter of what ``train.py`` writes."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from test_sgraf import D, R, S, bn_eval, l2n, lin, ref_text_global  # SGRAF's per-pair reference helpers
from test_sgraf import make_block as sgraf_block

from itmkit.models.cefg_modules import (
    AMRGatedFusion,
    ContextSimilarityEncoder,
    gather_neighbourhood,
    neighbourhood_slots,
)

# ----------------------------------------------------------------------------------------------
# the per-pair reference (§3.3), loops only
# ----------------------------------------------------------------------------------------------
def leaky(x):
    return torch.where(x > 0, x, 0.1 * x)


def ref_gru(rnn: nn.GRU, sequence):
    """One-layer unidirectional GRU from its equations (gate order r, z, n), ``h_0 = 0``."""
    d = rnn.hidden_size
    h = sequence.new_zeros(d)
    out = []
    for x in sequence:
        gi = rnn.weight_ih_l0 @ x + rnn.bias_ih_l0
        gh = rnn.weight_hh_l0 @ h + rnn.bias_hh_l0
        r = torch.sigmoid(gi[:d] + gh[:d])
        z = torch.sigmoid(gi[d : 2 * d] + gh[d : 2 * d])
        n = torch.tanh(gi[2 * d :] + r * gh[2 * d :])
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out)


def ref_slots(adjacency_row, r, slots=5):
    """collect_emb: the neighbours (ones, by index, at most 5), the rest filled with r itself."""
    ones = [j for j in range(len(adjacency_row)) if adjacency_row[j] == 1][:slots]
    return ones + [r] * (slots - len(ones))


def ref_image(sim: ContextSimilarityEncoder, regions, adjacency):
    """(a)-(d) for one image: ``regions [R, d]``, ``adjacency [R, R]`` -> (enhanced [2R, d], global [d], parts)."""
    att = sim.context_attention
    bn_r, bn_d = att.embedding_local[1], att.embedding_global[1]
    K = regions.shape[0]
    mean = regions.mean(0)
    g = torch.tanh(torch.stack([bn_eval(bn_d, lin(att.embedding_global[0], mean)[f], f) for f in range(mean.shape[0])]))
    logits = torch.stack([lin(att.embedding_common[0], torch.tanh(bn_eval(bn_r, lin(att.embedding_local[0], regions[k]), k)) * g)[0]
                          for k in range(K)])  # fmt: skip
    w = torch.softmax(logits, 0)
    u = sum(w[k] * regions[k] for k in range(K))
    nu = torch.sqrt((u * u).sum()) + 1e-8
    context, slot_list, slot_weights = [], [], []
    for r in range(K):
        slots = ref_slots(adjacency[r].tolist(), r)
        a = torch.softmax(torch.stack([logits[j] for j in slots]), 0)
        p = sum(a[k] * regions[j] for k, j in enumerate(slots))
        context.append(l2n(leaky(regions[r] * (p / nu))))
        slot_list.append(slots)
        slot_weights.append(a)
    hidden = ref_gru(sim.img_rnn, torch.cat([regions, torch.stack(context)]))
    enhanced = torch.stack([l2n(hidden[t] + regions[t % K]) for t in range(2 * K)])
    return enhanced, u / nu, {"region_attention": w, "context": torch.stack(context), "slots": slot_list,
                              "slot_weights": torch.stack(slot_weights)}  # fmt: skip


def ref_attend(context, query, temperature):
    """SCAN_attention with a per-word temperature: ``context [C, d]``, ``query [L, d]``, ``temperature [L]``."""
    raw = leaky(context @ query.t())  # [C, L]
    normed = torch.stack([raw[k] / (torch.sqrt((raw[k] ** 2).sum()) + 1e-8) for k in range(raw.shape[0])])
    attn, ctx = [], []
    for t in range(query.shape[0]):
        a = torch.softmax(temperature[t] * normed[:, t], 0)
        attn.append(a)
        ctx.append(l2n(sum(a[k] * context[k] for k in range(context.shape[0]))))
    return torch.stack(ctx), torch.stack(attn, 1)


def ref_local(sim, ctx, words):
    return torch.stack([l2n(lin(sim.sim_tranloc_w, (ctx[t] - words[t]) ** 2)) for t in range(words.shape[0])])


def ref_pair(sim: ContextSimilarityEncoder, enhanced, image_global, words):
    """(e)-(h) for one pair: ``enhanced [2R, d]``, ``words [L_j, d]`` -> (score, parts)."""
    L = words.shape[0]
    cap_glo = ref_text_global(sim.t_global_w, words)
    matrix = torch.ones_like(words)
    temperature = words.new_full((L,), 10.0)
    temps, mods = [temperature], []
    for reg in sim.rcr_modules:
        mods.append(matrix)
        ctx, _ = ref_attend(enhanced, words * matrix, temperature)
        sigma = ref_local(sim, ctx, words)  # against the un-modulated words
        mw, sw = reg.rcr_matrix_w, reg.rcr_smooth_w
        matrix = torch.stack([torch.clamp(torch.tanh(lin(mw[2], torch.tanh(lin(mw[0], sigma[t])))) + matrix[t], -1, 1)
                              for t in range(L)])  # fmt: skip
        temperature = torch.stack([torch.relu(lin(sw[2], torch.tanh(lin(sw[0], sigma[t])))[0] + temperature[t]) for t in range(L)])
        temps.append(temperature)
    ctx, attention = ref_attend(enhanced, words, temperature)  # the last modulation is discarded
    x = torch.cat([l2n(lin(sim.sim_tranglo_w, (image_global - cap_glo) ** 2))[None], ref_local(sim, ctx, words)])
    parts = {"nodes": x, "attention": attention, "temperatures": torch.stack(temps), "modulations": torch.stack(mods)}
    if sim.module_name == "SGR":
        for step in sim.SGR_module:
            edges = torch.softmax(lin(step.graph_query_w, x) @ lin(step.graph_key_w, x).t(), -1)
            x = torch.relu(lin(step.sim_graph_w, edges @ x))
        v = x[0]
    else:
        saf = sim.SAF_module
        a = torch.sigmoid(bn_eval(saf.bn, lin(saf.attn_sim_w, x)[:, 0], 0))
        a = a / (a.abs().sum() + 1e-8)
        parts["filtration_weights"] = a
        v = l2n((a[:, None] * x).sum(0))
    return torch.sigmoid(lin(sim.sim_eval_w, v))[0], parts


def ref_score(sim, regions, adjacency, words):
    enhanced, glob, _ = ref_image(sim, regions, adjacency)
    return ref_pair(sim, enhanced, glob, words)[0]


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------
def make_sim(module: str, dtype=torch.float64, seed: int = 0) -> ContextSimilarityEncoder:
    torch.manual_seed(seed)
    sim = ContextSimilarityEncoder(D, S, module, num_regions=R).to(dtype)
    with torch.no_grad():  # random running stats and affine BN parameters, so the BN axes matter
        for bn in sim.modules():
            if isinstance(bn, nn.BatchNorm1d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
        for reg in sim.rcr_modules:  # larger regulator outputs, so that M and λ move visibly
            reg.rcr_matrix_w[2].weight.mul_(3.0)
            reg.rcr_smooth_w[2].weight.mul_(20.0)
    return sim.eval()


def make_adjacency(n, dtype=torch.float64, seed=3):
    """0/1 with a diagonal of ones; rows with 0 .. 4 extra ones (row 0 of image 0: all of them)."""
    g = torch.Generator().manual_seed(seed)
    adjacency = (torch.rand(n, R, R, generator=g) < 0.3).to(dtype)
    adjacency[0, 0] = 1.0
    adjacency[:, torch.arange(R), torch.arange(R)] = 1.0
    return adjacency


def make_block(n=4, lengths=(3, 6, 2, 5, 4), dtype=torch.float64, seed=1, garbage=True):
    """SGRAF's test block (``n`` images of ``R`` regions, captions with garbage padding) + adjacency."""
    regions, words, mask, lengths_t = sgraf_block(n, lengths, dtype, seed, garbage)
    return regions, make_adjacency(n, dtype), words, mask, lengths_t


def block_scores(sim, regions, adjacency, words, mask, details=None):
    enhanced, glob = sim.enhance_regions(regions, adjacency, details)
    return sim.score_block(enhanced, glob, words, sim.global_caption(words, mask), mask, details=details)


# ----------------------------------------------------------------------------------------------
# blocks by hand
# ----------------------------------------------------------------------------------------------
def test_slots_fill_with_the_region_itself():
    adjacency = torch.eye(4)[None].repeat(1, 1, 1)
    adjacency[0, 1, 3] = 1  # region 1 gathers 3 and itself
    adjacency[0, 2] = 1  # region 2 gathers everybody (4 ones < 5 slots)
    slots = neighbourhood_slots(adjacency)
    assert slots[0, 0].tolist() == [0, 0, 0, 0, 0]
    assert slots[0, 1].tolist() == [1, 3, 1, 1, 1]
    assert slots[0, 2].tolist() == [0, 1, 2, 3, 2]
    # the softmax counts duplicates: region 1 with logits 0 (itself) and log 4 (region 3) -> 4 copies
    # of itself weigh 4/8 together, region 3 weighs 4/8
    regions = torch.eye(4)[None]
    logits = torch.tensor([[0.0, 0.0, 0.0, math.log(4.0)]])
    partial, weights = gather_neighbourhood(regions, logits, slots)
    assert torch.allclose(weights[0, 1], torch.tensor([1 / 8, 4 / 8, 1 / 8, 1 / 8, 1 / 8]))
    assert torch.allclose(partial[0, 1], torch.tensor([0.0, 0.5, 0.0, 0.5]))
    # more ones than slots: the first 5 by index (deterministic; the reference's topk order is unspecified)
    many = torch.ones(1, 7, 7)
    assert neighbourhood_slots(many)[0, 6].tolist() == [0, 1, 2, 3, 4]
    # fewer regions than slots: padded with the region itself
    assert neighbourhood_slots(torch.ones(1, 2, 2))[0, 1].tolist() == [0, 1, 1, 1, 1]


def test_identity_adjacency_gathers_the_region_itself():
    # §10: A = I  =>  p_r = V_r, q_r = l2n(LReLU(V_r * V_r / ν))
    sim = make_sim("SGR")
    regions, _, _, _, _ = make_block()
    details: dict = {}
    with torch.no_grad():
        sim.enhance_regions(regions, torch.eye(R, dtype=regions.dtype).expand(4, R, R), details)
        w = details["region_attention"]
        u = (w[..., None] * regions).sum(1)
        nu = u.norm(dim=-1) + 1e-8
        expected = l2n(leaky(regions * regions / nu[:, None, None]))
    assert torch.allclose(details["context"], expected, atol=1e-12)


def test_image_side_equals_per_region_reference():
    sim = make_sim("SAF")
    regions, adjacency, *_ = make_block()
    details: dict = {}
    with torch.no_grad():
        enhanced, glob = sim.enhance_regions(regions, adjacency, details)
        for i in range(len(regions)):
            ref_enhanced, ref_glob, parts = ref_image(sim, regions[i], adjacency[i])
            assert torch.allclose(enhanced[i], ref_enhanced, atol=1e-12)
            assert torch.allclose(glob[i], ref_glob, atol=1e-12)
            assert torch.allclose(details["context"][i], parts["context"], atol=1e-12)
            assert details["neighbours"][i].tolist() == parts["slots"]
            assert torch.allclose(details["neighbour_weights"][i], parts["slot_weights"], atol=1e-12)
    assert enhanced.shape == (4, 2 * R, D)
    assert torch.allclose(enhanced.norm(dim=-1), torch.ones(4, 2 * R, dtype=torch.float64))


def test_amr_fusion_equals_per_word_loop():
    torch.manual_seed(0)
    fusion = AMRGatedFusion(D).double()
    g = torch.Generator().manual_seed(2)
    words, amr = l2n(torch.randn(2, 4, D, generator=g, dtype=torch.float64)), torch.randn(2, 5, D, generator=g, dtype=torch.float64)
    word_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    amr_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    junk_words = torch.where(word_mask[..., None], words, 1e3)
    junk_amr = torch.where(amr_mask[..., None], amr, -1e3)
    fused, gates, attention = fusion(junk_words, word_mask, junk_amr, amr_mask)
    for j, (Lw, La) in enumerate([(3, 2), (4, 5)]):
        for t in range(Lw):
            cos = torch.stack([words[j, t] @ amr[j, a] / (words[j, t].norm() * amr[j, a].norm()) for a in range(La)])
            a = torch.softmax(9.0 * cos, 0)
            kappa = l2n(sum(a[k] * amr[j, k] for k in range(La)))
            gate = torch.sigmoid(lin(fusion.gate, torch.cat([words[j, t], kappa])))
            assert torch.allclose(attention[j, t, :La], a, atol=1e-12) and torch.all(attention[j, t, La:] == 0)
            assert torch.allclose(gates[j, t], gate, atol=1e-12)
            assert torch.allclose(fused[j, t], l2n(gate * words[j, t] + (1 - gate) * kappa), atol=1e-12)
    assert torch.all(fused[0, 3] == 0)


# ----------------------------------------------------------------------------------------------
# the vectorised block against the per-pair reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["SGR", "SAF"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_block_equals_per_pair_reference(module, dtype, atol):
    sim = make_sim(module, dtype)
    regions, adjacency, words, mask, lengths = make_block(dtype=dtype)
    with torch.no_grad():
        block = block_scores(sim, regions, adjacency, words, mask)
        ref = torch.stack([torch.stack([ref_score(sim, regions[i], adjacency[i], words[j, : lengths[j]])
                                        for j in range(len(lengths))]) for i in range(len(regions))])  # fmt: skip
    assert block.shape == (4, 5) and block.dtype == dtype
    assert torch.all((block > 0) & (block < 1))
    assert torch.allclose(block, ref, atol=atol, rtol=0), (block - ref).abs().max()


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_intermediates_equal_reference(module):
    sim = make_sim(module)
    regions, adjacency, words, mask, lengths = make_block()
    details: dict = {}
    with torch.no_grad():
        block_scores(sim, regions, adjacency, words, mask, details)
        for i, j in [(0, 1), (3, 2), (2, 3)]:
            enhanced, glob, _ = ref_image(sim, regions[i], adjacency[i])
            Lj = int(lengths[j])
            _, parts = ref_pair(sim, enhanced, glob, words[j, :Lj])
            assert torch.allclose(details["temperatures"][:, i, j, :Lj], parts["temperatures"], atol=1e-10)
            assert torch.allclose(details["modulations"][:, i, j, :Lj], parts["modulations"], atol=1e-12)
            assert torch.allclose(details["attention"][i, j, :, :Lj], parts["attention"], atol=1e-12)
            assert torch.allclose(details["nodes"][i, j, : Lj + 1], parts["nodes"], atol=1e-12)
            assert torch.all(details["nodes"][i, j, Lj + 1 :] == 0)
            if module == "SAF":
                assert torch.allclose(details["filtration_weights"][i, j, : Lj + 1], parts["filtration_weights"], atol=1e-12)
    # the regulator moved: temperatures left 10, modulations left 1 (else the test proves little)
    valid = mask[None].expand(4, 5, -1)
    assert (details["temperatures"][3][valid] - 10).abs().max() > 0.5
    assert (details["modulations"][2][valid] - 1).abs().max() > 0.1
    assert details["step_attention"].shape == (3, 4, 5, 2 * R, 6)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_padding_word_order_and_shard_invariance(module):
    sim = make_sim(module)
    regions, adjacency, words, mask, lengths = make_block(garbage=False)
    with torch.no_grad():
        clean = block_scores(sim, regions, adjacency, words, mask)
        garbage = torch.where(mask[..., None], words, torch.randn_like(words) * 1e3)
        assert torch.allclose(block_scores(sim, regions, adjacency, garbage, mask), clean, atol=1e-13, rtol=0)
        wider = torch.cat([words, torch.randn(5, 4, D, dtype=words.dtype)], 1)
        wider_mask = torch.cat([mask, torch.zeros(5, 4, dtype=torch.bool)], 1)
        assert torch.allclose(block_scores(sim, regions, adjacency, wider, wider_mask), clean, atol=1e-13, rtol=0)
        permuted = words.clone()
        j, Lj = 1, int(lengths[1])
        permuted[j, :Lj] = words[j, torch.randperm(Lj, generator=torch.Generator().manual_seed(3))]
        assert torch.allclose(block_scores(sim, regions, adjacency, permuted, mask), clean, atol=1e-12)
        # regions: the GRU and the BatchNorm over the region index make their order matter (§8.9)
        order = torch.tensor([1, 0, *range(2, R)])
        swapped = block_scores(sim, regions[:, order], adjacency[:, order][:, :, order], words, mask)
        assert not torch.allclose(swapped, clean, atol=1e-6)
        parts = torch.cat([
            torch.cat([block_scores(sim, regions[i : i + 3], adjacency[i : i + 3], words[j : j + 2], mask[j : j + 2])
                       for j in range(0, 5, 2)], 1)
            for i in range(0, 4, 3)
        ], 0)  # fmt: skip
    assert torch.allclose(parts, clean, atol=1e-13, rtol=0)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_reduces_to_sgraf_with_a_silent_gru_and_regulator(module):
    # §10: GRU weights and biases 0, the last Linear of every regulator 0 => M = 1, λ = 10,
    # V' = [V; V]: CEFG is SGRAF with λ = 10 and the inline global attention as VisualSA
    from itmkit.models.sgraf_modules import SimilarityEncoder

    sim = make_sim(module)
    with torch.no_grad():
        for p in sim.img_rnn.parameters():
            p.zero_()
        for reg in sim.rcr_modules:
            for layer in (reg.rcr_matrix_w[2], reg.rcr_smooth_w[2]):
                layer.weight.zero_()
                layer.bias.zero_()
    sgraf = SimilarityEncoder(D, S, module, num_regions=R, smooth=10.0).double().eval()
    state = {k: v for k, v in sim.state_dict().items() if k in sgraf.state_dict() and not k.startswith("v_global_w.")}
    state.update({f"v_global_w.{k}": v for k, v in sim.context_attention.state_dict().items()})
    sgraf.load_state_dict(state)
    regions, adjacency, words, mask, _ = make_block()
    with torch.no_grad():
        cefg = block_scores(sim, regions, adjacency, words, mask)
        plain = sgraf.score_block(regions, sgraf.global_image(regions), words, sgraf.global_caption(words, mask), mask)
    assert torch.allclose(cefg, plain, atol=1e-12)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_gradients_equal_per_pair_reference(module):
    sim = make_sim(module)
    regions, adjacency, words, mask, lengths = make_block(n=2, lengths=(3, 5, 2))
    weights = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (block_scores(sim, regions, adjacency, words, mask) * weights).sum().backward()
    block_grads = {k: p.grad.clone() for k, p in sim.named_parameters() if p.grad is not None}
    sim.zero_grad(set_to_none=True)
    total = sum(weights[i, j] * ref_score(sim, regions[i], adjacency[i], words[j, : lengths[j]])
                for i in range(2) for j in range(3))  # fmt: skip
    total.backward()
    for name, p in sim.named_parameters():
        if p.grad is None:  # unused by the forward in the reference too
            assert name not in block_grads or block_grads[name].abs().max() == 0, name
            continue
        if name.endswith("graph_key_w.bias"):
            continue  # cancels in the softmax (SGRAF's fused edges never compute it)
        assert torch.allclose(block_grads[name], p.grad, atol=1e-10), name


def test_every_parameter_learns_except_the_ones_the_reference_never_uses():
    for module in ("SGR", "SAF"):
        sim = make_sim(module, torch.float32).train()
        regions, adjacency, words, mask, _ = make_block(dtype=torch.float32)
        block_scores(sim, regions, adjacency, words, mask).sum().backward()
        unused = ("v_global_w.", "sim_transform_w.", "rcr_modules.2.rcr_matrix_w.")  # §8.7, §8.8
        # one logit added to a whole softmax; SAF's gate bias before its train-mode BatchNorm
        cancelling = ("graph_key_w.bias", "embedding_common.0.bias", "attn_sim_w.bias")
        for name, p in sim.named_parameters():
            if name.startswith(unused):
                assert p.grad is None, name
            elif name.endswith(cancelling):
                assert p.grad is None or p.grad.abs().max() < 1e-5, name
            else:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_train_mode_saf_batchnorm_and_dropout_run():
    sim = make_sim("SAF", torch.float32)
    for m in sim.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.4
    sim.train()
    regions, adjacency, words, mask, _ = make_block(dtype=torch.float32)
    before = int(sim.SAF_module.bn.num_batches_tracked)
    scores = block_scores(sim, regions, adjacency, words, mask)
    assert torch.isfinite(scores).all()
    assert int(sim.SAF_module.bn.num_batches_tracked) == before + 5  # one update per caption (SGRAF §3.4)


# ----------------------------------------------------------------------------------------------
# the model through the data pipeline
# ----------------------------------------------------------------------------------------------
from itmkit.config import TextConfig  # noqa: E402
from itmkit.methods.cefg import CEFG, CEFGConfig, build, convert_checkpoint  # noqa: E402

VOCAB = 30
IMG_DIM = 10


def make_model(module="SGR", seed=0, **overrides) -> CEFG:
    torch.manual_seed(seed)
    cfg = CEFGConfig(module=module, img_dim=IMG_DIM, embed_size=D, sim_dim=S, num_regions=R, **overrides)
    return CEFG(cfg, TextConfig(kind="bigru", word_dim=7), VOCAB).double().eval()


def make_inputs(n_img=5, lengths=(4, 9, 3, 6, 2, 8, 5, 7, 4, 3, 6), seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_img, R, IMG_DIM, generator=g, dtype=dtype)
    images = torch.cat([features, make_adjacency(n_img, dtype, seed)], -1)
    L = max(lengths)
    lengths_t = torch.tensor(lengths)
    tokens = torch.randint(4, VOCAB, (len(lengths), L), generator=g).masked_fill(torch.arange(L)[None] >= lengths_t[:, None], 0)
    return images, torch.full((n_img,), R), tokens, lengths_t


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_engine_matrix_equals_per_pair_loop_fp32(module):
    model = make_model(module).float()
    images, img_len, tokens, lengths = make_inputs(dtype=torch.float32)
    with torch.no_grad():
        img, cap = model.encode_images(images, img_len), model.encode_captions(tokens, lengths)
        assert img.feats.shape == (5, 2 * R, D) and img.lengths.tolist() == [2 * R] * 5
        assert set(img.extras) == {"global", "region_attention", "neighbours", "neighbour_weights"}
        full = model.similarity(img, cap, memory_budget=model.pair_workspace_bytes(img, cap) * 6)  # many blocks
        for i in range(len(images)):
            regions = model.image(images[i : i + 1, :, :IMG_DIM], img_len[i : i + 1])[0]
            for j in range(len(lengths)):
                Lj = int(lengths[j])
                words = model.text(tokens[j : j + 1, :Lj], lengths[j : j + 1])[0]
                expected = ref_score(model.sim, regions, images[i, :, IMG_DIM:], words)
                assert abs(float(full[i, j]) - float(expected)) < 2e-5, (i, j)


def test_encode_images_checks_its_input():
    model = make_model()
    images, img_len, _, _ = make_inputs(n_img=2)
    with pytest.raises(ValueError, match=r"\[B, 5, 10 \+ 5\].*prepare_data.*found shape \(2, 5, 10\)"):
        model.encode_images(images[..., :IMG_DIM], img_len)
    with pytest.raises(ValueError, match="all 5 regions.*region_drop"):
        model.encode_images(images, torch.tensor([5, 4]))
    bad = images.clone()
    bad[0, 2, IMG_DIM + 2] = 0.0
    with pytest.raises(ValueError, match="diagonal of ones"):
        model.encode_images(bad, img_len)
    with pytest.raises(ValueError, match="region_drop: expected 0"):
        from itmkit.methods.registry import get_method

        cfg = get_method("cefg").preset("smoke")
        cfg.data.region_drop = 0.2
        build(cfg, 40)


def test_explain_parts_match_the_block_and_ignore_padding():
    for module in ("SGR", "SAF"):
        model = make_model(module)
        images, img_len, tokens, lengths = make_inputs(n_img=2, lengths=(5, 3))
        with torch.no_grad():
            img, cap = model.encode_images(images, img_len), model.encode_captions(tokens, lengths)
            one_img, one_cap = img.slice(1, 2), cap.slice(1, 2)  # caption of 3 words, trimmed
            e = model.explain(one_img, one_cap)
            assert e.score == pytest.approx(float(model.similarity(one_img, one_cap)[0, 0]), abs=1e-6)  # stored as float32
            assert e.method == "cefg" and (e.n_regions, e.n_words) == (R, 3)
            assert e["word_region_weights"].shape == (3, R) and e["enhanced_word_region_weights"].shape == (3, 2 * R)
            np.testing.assert_allclose(e["word_region_weights"].sum(1), 1.0, atol=1e-6)
            np.testing.assert_array_equal(e["adjacency"], neighbourhood_adjacency(images[1, :, IMG_DIM:]))
            assert e["regulator_temperature"].shape == (4, 3) and np.all(e["regulator_temperature"][0] == 10)
            assert e["regulator_modulation"].shape == (3, 3, D) and e["regulator_word_region_weights"].shape == (3, 3, 2 * R)
            if module == "SGR":
                assert e["sgr_edges"].shape == (3, 4, 4)
            else:
                assert e["filtration_weights"].sum() == pytest.approx(1.0, abs=1e-6)
                np.testing.assert_array_equal(e["word_scores"], e["filtration_weights"][1:])
            # the same caption inside a longer padded batch: identical parts
            padded = cap.select(torch.tensor([1, 0])).slice(0, 1)
            padded = type(padded)(torch.cat([padded.feats, torch.randn(1, 4, D, dtype=padded.feats.dtype)], 1),
                                  padded.lengths, {"global": padded.extras["global"]})  # fmt: skip
            again = model.explain(one_img, padded)
            for key, value in e.parts.items():
                np.testing.assert_allclose(again[key], value, atol=1e-12, err_msg=key)


def neighbourhood_adjacency(adjacency):
    """What a region gathers: its first 5 ones (by index), itself always."""
    out = np.zeros((R, R))
    for r in range(R):
        out[r, ref_slots(adjacency[r].tolist(), r)] = 1
    return out


def test_pair_workspace_bytes_scales_and_covers_the_big_tensors():
    model = make_model()
    images, img_len, tokens, lengths = make_inputs()
    with torch.no_grad():
        img, cap = model.encode_images(images, img_len), model.encode_captions(tokens, lengths)
        small = model.pair_workspace_bytes(img, cap)
    L = cap.feats.shape[1]
    assert small >= 8 * (4 * L * D + 4 * 2 * R * L)  # float64: the [L, d] and [2R, L] tensors of a round
    with torch.enable_grad():
        assert model.pair_workspace_bytes(img, cap) > 3 * small


# ----------------------------------------------------------------------------------------------
# end to end on the embedded tiny set: adjacency from the boxes, trainer, evaluator
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from itmkit.data.embedded import embedded_dataset

    return embedded_dataset("tiny", progress=False)


def test_prepare_data_appends_the_adjacency_once(tiny):
    from itmkit.data.precomp import PrecompSplit, RegionColumns
    from itmkit.data.spatial_adjacency import split_adjacency
    from itmkit.data.text import build_text_pipeline
    from itmkit.methods.registry import get_method

    cfg = get_method("cefg").preset("smoke")
    split = PrecompSplit.open(tiny, "test")
    pipeline = build_text_pipeline(cfg.text, split.captions, tiny)
    model = build(cfg, pipeline.vocab_size)
    prepared, same_pipeline = model.prepare_data(split, pipeline)
    assert same_pipeline is pipeline and isinstance(prepared.images, RegionColumns)
    assert prepared.images.shape == (16, 12, cfg.model.img_dim + 12)
    np.testing.assert_array_equal(prepared.image_features(3)[:, cfg.model.img_dim :], split_adjacency(split, "released")[3])
    again, _ = model.prepare_data(prepared, pipeline)
    assert again.images is prepared.images  # idempotent
    other = build(type(cfg)(**{**cfg.__dict__, "model": CEFGConfig(**{**cfg.model.__dict__, "adjacency": "identity"})}),
                  pipeline.vocab_size)  # fmt: skip
    identity, _ = other.prepare_data(prepared, pipeline)  # another rule replaces the columns
    np.testing.assert_array_equal(identity.image_features(3)[:, cfg.model.img_dim :], np.eye(12))


def test_smoke_training_runs_end_to_end(tiny, tmp_path):
    from itmkit.methods.registry import get_method
    from itmkit.train.trainer import train

    cfg = get_method("cefg").preset("smoke")
    cfg.train.epochs = 1
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.finished and result.test_metrics is not None
    sims = np.load(tmp_path / "run" / "test" / "sims.npy")
    assert sims.shape == (16, 80) and np.isfinite(sims).all() and sims.std() > 0


def test_a_fixed_batch_loss_goes_down():
    from itmkit.losses import hinge_triplet_loss

    model = make_model("SGR").float().train()
    images, img_len, tokens, lengths = make_inputs(n_img=11, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)
        scores = model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, lengths))
        loss = hinge_triplet_loss(scores, 0.2, max_violation=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------
# the AMR branch: released (dead) and gated (our design)
# ----------------------------------------------------------------------------------------------
def write_amr_folder(root, n=3, with_amr=True):
    from itmkit.data.vocab import Vocabulary

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "test_ims.npy", rng.standard_normal((n, R, IMG_DIM)).astype(np.float32))
    wh = rng.uniform(5, 20, (n, R, 2))
    corner = rng.uniform(0, 40, (n, R, 2))
    np.save(root / "test_boxes.npy", np.concatenate([corner, corner + wh], -1).astype(np.float32))
    (root / "meta.json").write_text(json.dumps({"image_size": 64}))
    colours, things = ["red", "blue", "green"], ["dog", "cat", "ball", "box", "cup"]
    captions = [f"a {colours[i]} {things[c]}" for i in range(n) for c in range(5)]
    (root / "test_caps.txt").write_text("\n".join(captions) + "\n")
    if with_amr:
        amr = [f"( {things[c]} :mod ( {colours[i]} ) )" for i in range(n) for c in range(5)]
        (root / "test_amr_caps.txt").write_text("\n".join(amr) + "\n")
    Vocabulary.build(captions + ["mod"], threshold=1).to_json(root / "vocab.json")
    return captions


def test_amr_pipeline_round_trips_through_the_batch(tmp_path):
    from itmkit.data.amr import AMRTextPipeline, split_amr_tokens
    from itmkit.data.loaders import pad_token_lists
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary

    captions = write_amr_folder(tmp_path)
    split = PrecompSplit.open(tmp_path, "test")
    base = WordIdPipeline(Vocabulary.from_json(tmp_path / "vocab.json"))
    pipeline = AMRTextPipeline.for_split(base, split)
    ids = pipeline.encode(captions[7])
    amr_ids = base.encode("( ball :mod ( blue ) )")
    assert ids == amr_ids + base.encode(captions[7]) and pipeline.tokens(captions[7]) == base.tokens(captions[7])
    rng = np.random.default_rng(1)
    rows = [pipeline.encode(c, rng) for c in captions[:6]]  # caption augmentation may drop its own <end>
    tokens, lengths = pad_token_lists(rows)
    amr, amr_len, cap, cap_len = split_amr_tokens(tokens, lengths)
    for k, c in enumerate(captions[:6]):
        n_amr = len(base.encode(pipeline.amr(c)))
        assert amr[k, : amr_len[k]].tolist() == rows[k][:n_amr] and torch.all(amr[k, amr_len[k] :] == 0)
        assert cap[k, : cap_len[k]].tolist() == rows[k][n_amr:] and torch.all(cap[k, cap_len[k] :] == 0)
    with pytest.raises(ValueError, match=r"\[<start> AMR <end>\] followed by the caption.*row 0"):
        split_amr_tokens(*pad_token_lists([[1, 5, 2]]))
    # the same caption given two different graphs
    lines = (tmp_path / "test_amr_caps.txt").read_text().splitlines()
    with pytest.raises(ValueError, match="line 2.*AMR given earlier"):
        AMRTextPipeline(base, [captions[0], captions[0]], lines[:2], tmp_path / "test_amr_caps.txt")


def test_gated_amr_model_encodes_through_the_evaluator_and_explains(tmp_path):
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary
    from itmkit.evaluate.evaluator import encode_split, similarity_matrix

    write_amr_folder(tmp_path)
    split = PrecompSplit.open(tmp_path, "test")
    pipeline = WordIdPipeline(Vocabulary.from_json(tmp_path / "vocab.json"))
    torch.manual_seed(0)
    cfg = CEFGConfig(img_dim=IMG_DIM, embed_size=D, sim_dim=S, num_regions=R, amr_fusion="gated")
    model = CEFG(cfg, TextConfig(kind="bigru", word_dim=7), pipeline.vocab_size).eval()
    images, captions = encode_split(model, split, pipeline, batch_size=4, progress=False)
    assert captions.lengths.tolist() == [len(pipeline.encode(c)) for c in split.captions]  # caption words only
    assert set(captions.extras) == {"global", "amr_gate"}
    sims = similarity_matrix(model, images, captions, progress=False)
    assert sims.shape == (3, 15) and np.isfinite(sims).all()
    e = model.explain(images.slice(0, 1), captions.slice(2, 3))
    assert e["amr_gate"].shape == (e.n_words,) and np.all((e["amr_gate"] > 0) & (e["amr_gate"] < 1))
    # the fusion changes the words: the released 'none' model with the same weights scores differently
    plain = CEFG(CEFGConfig(img_dim=IMG_DIM, embed_size=D, sim_dim=S, num_regions=R), TextConfig(kind="bigru", word_dim=7),
                 pipeline.vocab_size).eval()  # fmt: skip
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("amr_fusion.")})
    plain_sims = similarity_matrix(plain, *encode_split(plain, split, pipeline, progress=False), progress=False)
    assert not np.allclose(plain_sims, sims, atol=1e-4)
    # missing offline inputs: a clear error naming the file and the way out
    (tmp_path / "test_amr_caps.txt").unlink()
    with pytest.raises(ValueError, match="test_amr_caps.txt.*docs/cefg.md.*amr_fusion='none'"):
        encode_split(model, split, pipeline, progress=False)


def test_gated_amr_needs_the_bigru_vocabulary():
    with pytest.raises(ValueError, match="expected text.kind 'bigru', found 'hf'"):
        CEFG(CEFGConfig(amr_fusion="gated"), TextConfig(kind="hf"), None)


def test_bert_variant_trains_the_backbone_at_a_tenth():
    from itmkit.methods.registry import get_method

    cfg = get_method("cefg").preset("paper-f30k-bert-saf")
    assert cfg.text.kind == "hf" and cfg.model.module == "SAF" and cfg.train.backbone_lr_scale == 0.1
    small = dict(img_dim=IMG_DIM, embed_size=D, sim_dim=S, num_regions=R)
    cfg.model = CEFGConfig(module="SAF", **small)
    model = build(cfg, None).eval()
    groups = {g["name"]: g for g in model.param_groups(cfg.train.lr, cfg.train.backbone_lr_scale)}
    assert groups["backbone"]["lr"] == pytest.approx(2e-5) and groups["main"]["lr"] == pytest.approx(2e-4)
    from itmkit.data.text import HFTokenizerPipeline

    pipeline = HFTokenizerPipeline(cfg.text.hf_path)
    tokens, lengths = __import__("itmkit.data.loaders", fromlist=["pad_token_lists"]).pad_token_lists(
        [pipeline.encode("a red ball"), pipeline.encode("two dogs run on the grass")])
    images, img_len, _, _ = make_inputs(n_img=2, dtype=torch.float32)
    with torch.no_grad():
        scores = model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, lengths))
    assert scores.shape == (2, 2) and torch.all((scores > 0) & (scores < 1))


# ----------------------------------------------------------------------------------------------
# presets, ensemble
# ----------------------------------------------------------------------------------------------
def test_presets_follow_the_released_recipe():
    from itmkit.methods.registry import get_method

    spec = get_method("cefg")
    names = {"paper", "smoke", "course"} | {f"paper-{d}-{t}{m}" for d in ("f30k", "coco") for t in ("", "bert-") for m in ("sgr", "saf")}
    assert set(spec.presets) == names
    for name in names - {"smoke", "course"}:
        cfg = spec.preset(name)
        t = cfg.train
        assert (t.epochs, t.lr_decay_epochs, t.batch_size, t.lr, t.optimizer) == (50, (30,), 32, 2e-4, "adam"), name
        assert not t.max_violation and t.sum_warmup_epochs == 0 and t.grad_clip == 2.0 and t.margin == 0.2
        assert cfg.model.num_regions == 36 and cfg.model.adjacency == "released" and cfg.model.amr_fusion == "none"
        assert cfg.data.region_drop == 0 and not cfg.data.caption_augment
        assert cfg.model.module == ("SAF" if name.endswith("saf") else "SGR")
        assert cfg.text.kind == ("hf" if "bert" in name else "bigru")
    for name in ("smoke", "course"):
        cfg = spec.preset(name)
        assert cfg.model.num_regions == 12 and cfg.model.word_dropout == 0 and cfg.data.region_drop == 0
        assert isinstance(spec.build(cfg, 50), CEFG)


def test_cefg_ensemble_through_the_general_ensemble():
    from itmkit.evaluate.ensemble import evaluate_ensemble

    images, img_len, tokens, lengths = make_inputs(n_img=2, lengths=(4, 3, 5, 6, 2, 3, 4, 5, 6, 7))
    matrices = []
    for module in ("SGR", "SAF"):
        model = make_model(module)
        with torch.no_grad():
            matrices.append(model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, lengths)).numpy())
    result = evaluate_ensemble(matrices)
    np.testing.assert_allclose(result.sims, (matrices[0] + matrices[1]) / 2, atol=1e-6)
    assert not np.allclose(matrices[0], matrices[1])


# ----------------------------------------------------------------------------------------------
# converter: what the reference train.py writes (§7), key names and shapes written out by hand
# ----------------------------------------------------------------------------------------------
def train_py_checkpoint(module, d=D, s=S, regions=R, img_dim=IMG_DIM, word_dim=7, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    def linear(prefix, out_features, in_features):
        return {f"{prefix}.weight": rnd(out_features, in_features), f"{prefix}.bias": rnd(out_features)}

    def bn(prefix, size):
        return {f"{prefix}.weight": 1 + rnd(size), f"{prefix}.bias": rnd(size), f"{prefix}.running_mean": rnd(size),
                f"{prefix}.running_var": 0.5 + torch.rand(size, generator=g),
                f"{prefix}.num_batches_tracked": torch.tensor(777, dtype=torch.int64)}  # fmt: skip

    img = linear("fc", d, img_dim)
    txt = {"embed.weight": rnd(vocab, word_dim)}
    for suffix in ("", "_reverse"):
        txt.update({f"cap_rnn.weight_ih_l0{suffix}": rnd(3 * d, word_dim), f"cap_rnn.weight_hh_l0{suffix}": rnd(3 * d, d),
                    f"cap_rnn.bias_ih_l0{suffix}": rnd(3 * d), f"cap_rnn.bias_hh_l0{suffix}": rnd(3 * d)})  # fmt: skip
    sim = {}
    for side in ("v_global_w", "t_global_w"):
        sim.update(linear(f"{side}.embedding_local.0", d, d))
        sim.update(linear(f"{side}.embedding_global.0", d, d))
        sim.update(linear(f"{side}.embedding_common.0", 1, d))
    sim.update(bn("v_global_w.embedding_local.1", regions))
    sim.update(bn("v_global_w.embedding_global.1", d))
    for name, shape in (("sim_tranloc_w", (s, d)), ("sim_tranglo_w", (s, d)), ("sim_eval_w", (1, s)),
                        ("sim_transform_w", (s, d)), ("emb_local_li", (d, d)), ("emb_global_li", (d, d)),
                        ("emb_common", (1, d))):  # fmt: skip
        sim.update(linear(name, *shape))
    sim.update(bn("emb_local_bn", regions))
    sim.update(bn("emb_global_bn", d))
    sim.update({"img_rnn.weight_ih_l0": rnd(3 * d, d), "img_rnn.weight_hh_l0": rnd(3 * d, d),
                "img_rnn.bias_ih_l0": rnd(3 * d), "img_rnn.bias_hh_l0": rnd(3 * d)})  # fmt: skip
    for m in range(3):
        sim.update(linear(f"rcr_modules.{m}.rcr_smooth_w.0", s // 2, s))
        sim.update(linear(f"rcr_modules.{m}.rcr_smooth_w.2", 1, s // 2))
        sim.update(linear(f"rcr_modules.{m}.rcr_matrix_w.0", 2 * s, s))
        sim.update(linear(f"rcr_modules.{m}.rcr_matrix_w.2", d, 2 * s))
    if module == "SGR":
        for i in range(3):
            for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
                sim.update(linear(f"SGR_module.{i}.{name}", s, s))
    else:
        sim.update(linear("SAF_module.attn_sim_w", 1, s))
        sim.update(bn("SAF_module.bn", 1))
    opt = argparse.Namespace(
        data_name="f30k_precomp", data_path="/home/sda/data/", vocab_path="/home/sda/data/vocab/", module_name=module,
        sgr_step=3, embed_size=d, sim_dim=s, img_dim=img_dim, word_dim=word_dim, vocab_size=vocab, num_layers=1,
        bi_gru=True, max_violation=False, no_imgnorm=False, no_txtnorm=False, batch_size=32, num_epochs=50,
        lr_update=30, learning_rate=2e-4, grad_clip=2.0, margin=0.2, rcr_step=0, rar_step=0, focal_type="glo",
    )
    return {"epoch": 12, "model": [img, txt, sim], "best_rsum": 480.5, "opt": opt, "Eiters": 10000}


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_convert_train_py_checkpoint_loads_strictly_and_scores_like_the_reference(module, tmp_path):
    from itmkit.checkpoints import load_strict

    checkpoint = train_py_checkpoint(module)
    checkpoint["opt"].num_epochs, checkpoint["opt"].max_violation = 40, True  # recorded settings win
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)
    run_cfg, state = convert_checkpoint(path)
    cfg = run_cfg.model
    assert run_cfg.method == "cefg" and run_cfg.preset == f"paper-f30k-{module.lower()}"
    assert (cfg.module, cfg.embed_size, cfg.sim_dim, cfg.img_dim, cfg.num_regions, cfg.rcr_steps) == (module, D, S, IMG_DIM, R, 3)
    assert run_cfg.train.epochs == 40 and run_cfg.train.max_violation and run_cfg.train.lr_decay_epochs == (30,)
    model = CEFG(cfg, run_cfg.text, VOCAB + 1)
    load_strict(model, state, str(path))
    img, txt, sim = checkpoint["model"]
    assert torch.equal(model.sim.context_attention.embedding_local[1].running_var, sim["emb_local_bn.running_var"])
    assert torch.equal(model.sim.context_attention.embedding_common[0].weight, sim["emb_common.weight"])
    assert torch.equal(model.sim.rcr_modules[1].rcr_matrix_w[2].weight, sim["rcr_modules.1.rcr_matrix_w.2.weight"])
    assert torch.equal(model.sim.img_rnn.weight_hh_l0, sim["img_rnn.weight_hh_l0"])
    assert torch.equal(model.text.rnn.weight_ih_l0_reverse, txt["cap_rnn.weight_ih_l0_reverse"])
    assert torch.all(model.text.embed.weight[VOCAB] == 0)
    model = model.double().eval()
    images, img_len, tokens, lengths = make_inputs(n_img=2, lengths=(5, 3))
    with torch.no_grad():
        scores = model.score_block(model.encode_images(images, img_len), model.encode_captions(tokens, lengths))
        regions = model.image(images[1:2, :, :IMG_DIM], img_len[1:2])[0]
        words = model.text(tokens[1:2, :3], lengths[1:2])[0]
        assert abs(float(scores[1, 1]) - float(ref_score(model.sim, regions, images[1, :, IMG_DIM:], words))) < 1e-10


def test_convert_rejects_inconsistent_files():
    checkpoint = train_py_checkpoint("SAF")
    checkpoint["opt"].module_name = "SGR"
    with pytest.raises(ValueError, match="module_name: expected 'SAF'.*found 'SGR'"):
        convert_checkpoint(checkpoint)
    broken = train_py_checkpoint("SGR")
    del broken["model"][2]["rcr_modules.2.rcr_smooth_w.2.bias"]
    with pytest.raises(ValueError, match="missing.*sim.rcr_modules.2.rcr_smooth_w.2.bias"):
        convert_checkpoint(broken)
    sgraf_like = train_py_checkpoint("SGR")
    sgraf_like["model"][2] = {k: v for k, v in sgraf_like["model"][2].items() if not k.startswith("emb_local_bn")}
    with pytest.raises(KeyError, match="emb_local_bn.weight"):
        convert_checkpoint(sgraf_like)
    with pytest.raises(ValueError, match="field 'model'.*list"):
        convert_checkpoint({"model": {}})
