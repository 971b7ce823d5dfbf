"""HREM's instance-level batch graph (hrem.md §3.4): connectivity and relevance rules by hand, the
region-word matching against a plain per-caption, per-image loop, the KL regulariser, and the
masked graph Transformer (self-only graph, permutation equivariance, gradient into the mask)."""

import math

import pytest
import torch
import torch.nn.functional as F

from itmkit.models.fragment_pooling import transformer_layer
from itmkit.models.instance_graph import (
    BatchGraph,
    InterModalRelevance,
    build_batch_graph,
    connection_count,
    fragment_matching,
    graph_attention,
    intra_relevance,
    relevance_regulariser,
    topk_connection,
)


def test_topk_connection_by_hand_keeps_ties():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.3, 0.7], [0.4, 0.4, 0.4, 0.4]])
    connect = topk_connection(scores, 2)
    assert connect.tolist() == [
        [True, False, True, True],  # 2nd largest is 0.5, tied: both kept
        [False, True, False, True],
        [True, True, True, True],  # all tied
    ]
    with pytest.raises(ValueError, match="k"):
        topk_connection(scores, 0)


def test_connection_count():
    assert connection_count(128, 0.5) == 64
    assert connection_count(5, 0.5) == 2  # int(2.5)
    assert connection_count(1, 0.5) == 1  # guard: the reference crashes with k = 0


def test_intra_relevance_against_a_loop():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(6, 5), dim=-1)
    got = intra_relevance(x, sigma=0.7)
    for a in range(6):
        for b in range(6):
            expected = math.exp(-math.sqrt(sum((float(x[a, i]) - float(x[b, i])) ** 2 for i in range(5))) / 0.7)
            assert got[a, b].item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(got, got.t()) and torch.allclose(got.diagonal(), torch.ones(6))


def loop_matching(regions, words, word_lengths, topk):
    """hrem.md §3.4 b literally: one caption at a time, one image at a time, plain Python maxima."""
    n_img, n_regions = regions.shape[:2]
    n_cap, width = words.shape[:2]
    t2i_mean = torch.zeros(n_cap, n_img, dtype=torch.float64)
    i2t_mean = torch.zeros(n_img, n_cap, dtype=torch.float64)
    t2i_top = torch.zeros(n_cap, n_img, topk, dtype=torch.float64)
    i2t_top = torch.zeros(n_img, n_cap, topk, dtype=torch.float64)
    r_hat = [[regions[i, n].double() / max(regions[i, n].double().norm().item(), 1e-12) for n in range(n_regions)]
             for i in range(n_img)]  # fmt: skip
    for j in range(n_cap):
        length = int(word_lengths[j])
        m = min(max(length, topk), width)
        w_hat = [words[j, l].double() / max(words[j, l].double().norm().item(), 1e-12) for l in range(m)]
        for i in range(n_img):
            s = [[F.leaky_relu(w_hat[l] @ r_hat[i][n], 0.1).item() for n in range(n_regions)] for l in range(m)]
            word_norm = [math.sqrt(sum(s[l][n] ** 2 for l in range(m))) for n in range(n_regions)]
            region_norm = [math.sqrt(sum(s[l][n] ** 2 for n in range(n_regions))) for l in range(m)]
            row = [max(s[l][n] / max(word_norm[n], 1e-12) for n in range(n_regions)) for l in range(m)]
            col = [max(s[l][n] / max(region_norm[l], 1e-12) for l in range(length)) for n in range(n_regions)]
            t2i_mean[j, i] = sum(row[:length]) / length
            t2i_top[j, i] = torch.tensor(sorted(row, reverse=True)[:topk])
            i2t_mean[i, j] = sum(col) / n_regions
            i2t_top[i, j] = torch.tensor(sorted(col, reverse=True)[:topk])
    return t2i_mean, t2i_top, i2t_mean, i2t_top


def test_fragment_matching_against_the_loop_with_padding_as_the_reference_reads_it():
    torch.manual_seed(3)
    # padded region slots hold a non-zero constant (the encoder's fc(0) + mlp(0)); padded word
    # slots hold non-zero values too (BERT's [PAD] states); caption 1 is shorter than topk.
    regions = torch.randn(3, 5, 6)
    regions[1, 3:] = torch.linspace(-1, 1, 6)
    words = torch.randn(3, 7, 6)
    word_lengths = torch.tensor([7, 2, 5])
    got = fragment_matching(regions, words, word_lengths, topk=4)
    expected = loop_matching(regions, words, word_lengths, topk=4)
    for value, reference in zip((got.t2i_mean, got.t2i_top, got.i2t_mean, got.i2t_top), expected):
        assert torch.allclose(value.double(), reference, atol=1e-5)


def test_fragment_matching_padded_words_beyond_topk_are_ignored():
    torch.manual_seed(4)
    regions, words, lengths = torch.randn(2, 4, 6), torch.randn(2, 5, 6), torch.tensor([5, 3])
    base = fragment_matching(regions, words, lengths, topk=3)
    changed = words.clone()
    changed[1, 3:] = 50 * torch.randn(2, 6)  # caption 1 has 3 >= topk tokens: its padding is not read
    other = fragment_matching(regions, changed, lengths, topk=3)
    for a, b in zip((base.t2i_mean, base.t2i_top, base.i2t_mean, base.i2t_top),
                    (other.t2i_mean, other.t2i_top, other.i2t_mean, other.i2t_top)):  # fmt: skip
        assert torch.allclose(a, b)


def test_fragment_matching_needs_topk_slots():
    with pytest.raises(ValueError, match="topk=10"):
        fragment_matching(torch.randn(2, 12, 4), torch.randn(2, 6, 4), torch.tensor([6, 3]), topk=10)


def test_inter_modal_relevance_copies_the_mlp_and_adds_the_mean():
    torch.manual_seed(5)
    relevance = InterModalRelevance(3)
    t2i, i2t = relevance.mlp_t2i, relevance.mlp_i2t
    assert [k for k in relevance.state_dict()] == [
        "mlp_t2i.0.weight", "mlp_t2i.0.bias", "mlp_t2i.3.weight", "mlp_t2i.3.bias",
        "mlp_i2t.0.weight", "mlp_i2t.0.bias", "mlp_i2t.3.weight", "mlp_i2t.3.bias",
    ]  # fmt: skip
    for a, b in zip(t2i.parameters(), i2t.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # same values, separate parameters
    matching = fragment_matching(torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.tensor([4, 2]), topk=3)
    r_t2i, r_i2t = relevance(matching)
    top = matching.t2i_top[0, 1]
    hidden = torch.relu(t2i[0].weight @ top + t2i[0].bias)
    assert r_t2i[0, 1].item() == pytest.approx((t2i[3].weight[0] @ hidden + t2i[3].bias[0] + matching.t2i_mean[0, 1]).item(), abs=1e-6)
    assert r_i2t.shape == (2, 2)


def small_batch(seed=6, batch=6):
    torch.manual_seed(seed)
    images = F.normalize(torch.randn(batch, 8), dim=-1)
    captions = F.normalize(torch.randn(batch, 8), dim=-1)
    regions, words = torch.randn(batch, 5, 8), torch.randn(batch, 6, 8)
    lengths = torch.tensor([6, 3, 4, 5, 6, 2])[:batch]
    return images, captions, regions, words, lengths


def test_batch_graph_blocks_follow_the_rules():
    images, captions, regions, words, lengths = small_batch()
    relevance_model = InterModalRelevance(3)
    graph = build_batch_graph(images, captions, regions, words, lengths, threshold=0.5, topk=3, inter_relevance=relevance_model)
    b, k = 6, 3
    assert graph.connect.shape == (12, 12) and graph.relevance.shape == (12, 12)
    matching = fragment_matching(regions, words, lengths, topk=3)
    expected = {
        "i2i": (images @ images.t(), intra_relevance(images)),
        "t2t": (captions @ captions.t(), intra_relevance(captions)),
        "t2i": (matching.t2i_mean, relevance_model(matching)[0]),
        "i2t": (matching.i2t_mean, relevance_model(matching)[1]),
    }
    for name, (scores, relevance) in expected.items():
        connect, got = graph.block(name)
        assert torch.allclose(got, relevance, atol=1e-6), name
        for row in range(b):  # a row keeps the values >= its k-th largest: at least k of them
            kth = sorted(scores[row].tolist(), reverse=True)[k - 1]
            assert connect[row].tolist() == [v >= kth for v in scores[row].tolist()], (name, row)
        assert (connect.sum(1) >= k).all()
    assert graph.block("i2i")[0].diagonal().all() and graph.block("t2t")[0].diagonal().all()
    # node layout: images first, then captions
    assert torch.equal(graph.connect[:6, 6:], graph.block("i2t")[0])
    assert torch.equal(graph.relevance[6:, :6], graph.block("t2i")[1])
    with pytest.raises(KeyError, match="i2i"):
        graph.block("ii")


def test_batch_graph_without_learned_relevance_uses_the_means():
    images, captions, regions, words, lengths = small_batch()
    graph = build_batch_graph(images, captions, regions, words, lengths, topk=3, inter_relevance=None)
    assert torch.equal(graph.block("t2i")[1], graph.matching.t2i_mean)
    assert torch.equal(graph.block("i2t")[1], graph.matching.i2t_mean)


def test_batch_graph_gradient_reaches_embeddings_and_mlps_not_fragments():
    images, captions, regions, words, lengths = small_batch()
    images.requires_grad_(True)
    regions.requires_grad_(True)
    relevance_model = InterModalRelevance(3)
    graph = build_batch_graph(images, captions, regions, words, lengths, topk=3, inter_relevance=relevance_model)
    graph.relevance.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert regions.grad is None  # detached, as the reference does
    assert all(p.grad is not None for p in relevance_model.parameters())
    assert relevance_model.mlp_t2i[3].bias.grad.item() == 36  # d sum / d bias: one per t2i entry


def test_attention_mask():
    connect = torch.tensor([[True, False], [True, True]])
    relevance = torch.tensor([[0.5, 0.2], [0.3, 0.9]])
    mask = BatchGraph(connect, relevance, 1).attention_mask(1.5)
    assert mask[0, 1] == float("-inf") and mask[0, 0] == pytest.approx(0.75) and mask[1, 1] == pytest.approx(1.35)


def kl_loop(a, b):
    """``F.kl_div(log_softmax(a), softmax(b), 'batchmean')`` by hand."""
    total = 0.0
    for row_a, row_b in zip(a.tolist(), b.tolist()):
        za, zb = sum(math.exp(v) for v in row_a), sum(math.exp(v) for v in row_b)
        for va, vb in zip(row_a, row_b):
            p_b = math.exp(vb) / zb
            total += p_b * (math.log(p_b) - (va - math.log(za)))
    return total / len(a)


def test_relevance_regulariser_by_hand_and_its_zero():
    images, captions, regions, words, lengths = small_batch()
    graph = build_batch_graph(images, captions, regions, words, lengths, topk=3, inter_relevance=InterModalRelevance(3))
    reg = relevance_regulariser(images, captions, graph)
    guide = torch.exp(-torch.cdist(images, captions))
    expected = kl_loop(guide, graph.block("i2t")[1].detach()) + kl_loop(guide.t(), graph.block("t2i")[1].detach())
    assert reg.item() == pytest.approx(expected, abs=1e-5) and reg.item() >= 0
    # relevance rows equal to the guide's up to a constant shift per row: same softmax, KL = 0
    shift = torch.arange(6.0)[:, None]
    relevance = torch.cat([torch.cat([torch.zeros(6, 6), guide + shift], 1), torch.cat([guide.t() - shift, torch.zeros(6, 6)], 1)], 0)
    zero = relevance_regulariser(images, captions, BatchGraph(torch.ones(12, 12, dtype=torch.bool), relevance, 6))
    assert zero.item() == pytest.approx(0.0, abs=1e-6)


def test_graph_attention_self_only_graph_and_equivariance():
    torch.manual_seed(7)
    layer = transformer_layer(8, 2, 0.0).eval()
    nodes = torch.randn(6, 8)
    alone = torch.full((6, 6), float("-inf"))
    alone.fill_diagonal_(0.3)
    with torch.no_grad():
        out = graph_attention(layer, nodes, alone)
        for n in range(6):  # each node attends to itself only: the layer on a length-1 sequence
            assert torch.allclose(out[n], layer(nodes[n][None, None])[0, 0], atol=1e-5)
        mask = torch.randn(6, 6)
        perm = torch.tensor([4, 2, 0, 5, 1, 3])
        permuted = graph_attention(layer, nodes[perm], mask[perm][:, perm])
        assert torch.allclose(permuted, graph_attention(layer, nodes, mask)[perm], atol=1e-5)


def test_graph_attention_gradient_flows_into_the_mask():
    torch.manual_seed(8)
    layer = transformer_layer(8, 2, 0.0)
    relevance = torch.rand(4, 4, requires_grad=True)
    graph = BatchGraph((torch.rand(4, 4) > 0.3) | torch.eye(4, dtype=torch.bool), relevance, 2)
    graph_attention(layer, torch.randn(4, 8), graph.attention_mask(1.0)).pow(2).sum().backward()
    grad = relevance.grad
    assert grad[graph.connect].abs().sum() > 0
    assert (grad[~graph.connect] == 0).all()  # cut edges carry no gradient
