"""SCAN's attention core (itmkit.models.cross_attention) against hand computations and a plain
per-pair loop written here independently of the vectorised code (scan.md §3.3–§3.5, §4, §10)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from itmkit.models import cross_attention as xa

NORMS = list(xa.RAW_FEATURE_NORMS)
AGGS = list(xa.AGGREGATIONS)


# --------------------------------------------------------------------------- plain references
def leaky(x: float) -> float:
    return x if x > 0 else 0.1 * x


def ref_normalize(row: list[float], norm: str) -> list[float]:
    """One context item's raw scores over its query items, normalised by hand (§3.3 table)."""
    if norm.startswith("clipped"):
        row = [leaky(v) for v in row]
    if norm == "softmax":
        z = sum(math.exp(v) for v in row)
        return [math.exp(v) / z for v in row]
    if norm.endswith("l2norm"):
        n = math.sqrt(sum(v * v for v in row)) + 1e-8
        return [v / n for v in row]
    if norm.endswith("l1norm"):
        n = sum(abs(v) for v in row) + 1e-8
        return [v / n for v in row]
    return list(row)


def ref_pool(values: list[float], agg: str, lambda_lse: float) -> float:
    if agg == "LogSumExp":  # literal, as the reference computes it
        return math.log(sum(math.exp(lambda_lse * v) for v in values)) / lambda_lse
    if agg == "Mean":
        return sum(values) / len(values)
    if agg == "Max":
        return max(values)
    return sum(values)


def ref_pair_score(region_vecs, word_vecs, direction, norm, lambda_softmax, agg, lambda_lse) -> float:
    """One (image, caption) pair, real items only, one query item at a time (scan.md §3.4/§3.5)."""
    if direction == "t2i":
        queries, contexts = word_vecs, region_vecs
    else:
        queries, contexts = region_vecs, word_vecs
    # raw scores S[c][q] = context_c . query_q, normalised over q for each c
    raw = [[float(c @ q) for q in queries] for c in contexts]
    normed = [ref_normalize(row, norm) for row in raw]
    relevances = []
    for qi, q in enumerate(queries):
        logits = [lambda_softmax * normed[ci][qi] for ci in range(len(contexts))]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        total = sum(weights)
        attended = sum((w / total) * c for w, c in zip(weights, contexts))
        denom = max(float(q.norm() * attended.norm()), 1e-8)
        relevances.append(float(q @ attended) / denom)
    return ref_pool(relevances, agg, lambda_lse)


def ref_matrix(images, img_lens, caps, cap_lens, direction, norm, l1, agg, l2):
    out = torch.zeros(len(images), len(caps), dtype=torch.float64)
    for i in range(len(images)):
        for j in range(len(caps)):
            out[i, j] = ref_pair_score(
                images[i, : img_lens[i]].double(), caps[j, : cap_lens[j]].double(), direction, norm, l1, agg, l2
            )
    return out


def random_sets(n, t_max, d, lengths, generator, garbage=False, unit=True):
    x = torch.randn(n, t_max, d, generator=generator, dtype=torch.float64)
    if unit:
        x = x / x.norm(dim=-1, keepdim=True)
    mask = torch.arange(t_max)[None] < torch.as_tensor(lengths)[:, None]
    if garbage:
        x = torch.where(mask[..., None], x, 50 * torch.randn(x.shape, generator=generator, dtype=torch.float64))
    else:
        x = x * mask[..., None]
    return x, mask


# --------------------------------------------------------------------------- hand-checked parts
@pytest.mark.parametrize("norm", NORMS)
def test_normalize_raw_scores_matches_hand_formula(norm):
    scores = torch.tensor([[0.5, -0.2, 0.3], [-0.4, -0.1, 0.9]], dtype=torch.float64)
    got = xa.normalize_raw_scores(scores, norm, dim=1)
    for row, got_row in zip(scores.tolist(), got.tolist()):
        assert got_row == pytest.approx(ref_normalize(row, norm), abs=1e-12)


def test_clipped_is_leaky_relu_and_l1_is_defined():
    scores = torch.tensor([[-1.0, 2.0, 1.0]])
    assert xa.normalize_raw_scores(scores, "clipped", 1).tolist()[0] == pytest.approx([-0.1, 2.0, 1.0])
    # L1 of the clipped row: (0.1 + 2 + 1) = 3.1 (the reference crashes on this option, §8.1)
    got = xa.normalize_raw_scores(scores, "clipped_l1norm", 1)
    assert got.tolist()[0] == pytest.approx([-0.1 / 3.1, 2 / 3.1, 1 / 3.1], rel=1e-6)


def test_alias_and_unknown_options():
    s = torch.randn(2, 3)
    torch.testing.assert_close(
        xa.normalize_raw_scores(s, "clipped_leaky_l2norm", 1), xa.normalize_raw_scores(s, "clipped_l2norm", 1)
    )
    with pytest.raises(ValueError, match="raw_feature_norm.*found 'relu_l2norm'"):
        xa.normalize_raw_scores(s, "relu_l2norm", 1)
    with pytest.raises(ValueError, match="agg_func.*found 'Median'"):
        xa.aggregate(s, "Median")


def test_normalize_mask_excludes_padded_query_items():
    scores = torch.tensor([[3.0, 4.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    got = xa.normalize_raw_scores(scores, "l2norm", 1, mask)
    assert got.tolist()[0] == pytest.approx([0.6, 0.8, 0.0], abs=1e-7)
    got = xa.normalize_raw_scores(scores, "softmax", 1, mask)
    e = math.exp(3) + math.exp(4)
    assert got.tolist()[0] == pytest.approx([math.exp(3) / e, math.exp(4) / e, 0.0], abs=1e-7)


def test_func_attention_by_hand():
    # one pair, one query, two context items; no_norm so the logits are λ1 * dot products
    query = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    context = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    attended, attn = xa.func_attention(query, context, "no_norm", smooth=2.0)
    w0 = math.exp(2.0) / (math.exp(2.0) + math.exp(0.0))
    assert attn.shape == (1, 2, 1)
    assert attn[0, :, 0].tolist() == pytest.approx([w0, 1 - w0])
    assert attended[0, 0].tolist() == pytest.approx([w0, 2 * (1 - w0)])


def test_func_attention_limits_and_context_mask():
    g = torch.Generator().manual_seed(0)
    q, _ = random_sets(3, 4, 8, [4, 4, 4], g)
    c, _ = random_sets(3, 5, 8, [5, 5, 5], g)
    attended, attn = xa.func_attention(q, c, "clipped_l2norm", smooth=9.0)
    torch.testing.assert_close(attn.sum(1), torch.ones(3, 4, dtype=torch.float64))
    # λ1 -> 0: the attended vector is the plain mean of the context
    attended0, _ = xa.func_attention(q, c, "clipped_l2norm", smooth=0.0)
    torch.testing.assert_close(attended0, c.mean(1, keepdim=True).expand(-1, 4, -1))
    # no_norm, λ1 -> ∞: hard alignment on the best-matching context item
    attended_inf, _ = xa.func_attention(q, c, "no_norm", smooth=1e4)
    best = (c @ q.transpose(1, 2)).argmax(1)  # [n, Lq]
    torch.testing.assert_close(attended_inf, torch.gather(c, 1, best[..., None].expand(-1, -1, 8)))
    # a masked context item gets exactly zero weight
    cmask = torch.tensor([[True] * 5, [True, True, False, False, False], [True] * 4 + [False]])
    _, attn_m = xa.func_attention(q, c, "softmax", 4.0, context_mask=cmask)
    assert (attn_m.masked_select(~cmask[:, :, None].expand_as(attn_m)) == 0).all()
    torch.testing.assert_close(attn_m.sum(1), torch.ones(3, 4, dtype=torch.float64))


def test_cosine_similarity_zero_vector_and_axes():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[1.0, 0.0], [4.0, 3.0]])
    assert xa.cosine_similarity(x, y).tolist() == pytest.approx([0.0, 24 / 25])
    assert xa.cosine_similarity(x[:1], y[:1]).shape == (1,)  # no squeeze (§8.4)


def test_aggregate_by_hand_and_limits():
    r = torch.tensor([[0.2, -0.5, 0.9]], dtype=torch.float64)
    for agg in AGGS:
        assert xa.aggregate(r, agg, 6.0).item() == pytest.approx(ref_pool(r[0].tolist(), agg, 6.0))
    mask = torch.tensor([[True, True, False]])
    assert xa.aggregate(r, "Mean", mask=mask).item() == pytest.approx(-0.15)
    assert xa.aggregate(r, "Max", mask=mask).item() == pytest.approx(0.2)
    assert xa.aggregate(r, "Sum", mask=mask).item() == pytest.approx(-0.3)
    # LSE -> Max as λ2 -> ∞; LSE - log(n)/λ2 -> Mean as λ2 -> 0 (§10)
    assert xa.aggregate(r, "LogSumExp", 1e4).item() == pytest.approx(0.9, abs=1e-3)
    small = 1e-4
    assert (xa.aggregate(r, "LogSumExp", small) - math.log(3) / small).item() == pytest.approx(0.2, abs=1e-4)


# --------------------------------------------------------------------------- vectorised vs loop
@pytest.mark.parametrize("with_graph", [False, True], ids=["in_place", "autograd"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("norm", NORMS)
def test_block_scores_match_plain_loop_every_option(direction, norm, with_graph):
    g = torch.Generator().manual_seed(zlib.crc32(f"{direction}{norm}".encode()))
    img_lens, cap_lens = [4, 2, 3], [5, 2, 4, 3]
    images, img_mask = random_sets(3, 4, 6, img_lens, g, garbage=True, unit=(norm != "no_norm"))
    caps, cap_mask = random_sets(4, 5, 6, cap_lens, g, garbage=True)
    fn = xa.t2i_scores if direction == "t2i" else xa.i2t_scores
    # requires_grad selects the out-of-place path that keeps the autograd graph
    images_in, caps_in = images.clone().requires_grad_(with_graph), caps.clone().requires_grad_(with_graph)
    for agg in AGGS:
        got = fn(images_in, caps_in, img_mask, cap_mask, norm, 4.0, agg, 5.0).detach()
        want = ref_matrix(images, img_lens, caps, cap_lens, direction, norm, 4.0, agg, 5.0)
        assert got.shape == (3, 4)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{direction} {norm} {agg}")


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_block_scores_float32_close_to_float64_loop(direction):
    g = torch.Generator().manual_seed(7)
    images, img_mask = random_sets(5, 6, 32, [6, 6, 3, 5, 1], g)
    caps, cap_mask = random_sets(7, 9, 32, [9, 2, 5, 7, 3, 9, 4], g)
    fn = xa.t2i_scores if direction == "t2i" else xa.i2t_scores
    got = fn(images.float(), caps.float(), img_mask, cap_mask, "clipped_l2norm", 9.0, "LogSumExp", 20.0)
    want = ref_matrix(images, img_mask.sum(1), caps, cap_mask.sum(1), direction, "clipped_l2norm", 9.0, "LogSumExp", 20.0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("norm", ["softmax", "clipped_l2norm", "no_norm"])
def test_padding_never_changes_a_score(direction, norm):
    g = torch.Generator().manual_seed(3)
    images, img_mask = random_sets(3, 4, 8, [4, 2, 3], g)
    caps, cap_mask = random_sets(4, 5, 8, [5, 2, 4, 3], g)
    fn = xa.t2i_scores if direction == "t2i" else xa.i2t_scores
    for agg in AGGS:
        base = fn(images, caps, img_mask, cap_mask, norm, 9.0, agg, 6.0)
        # three more padded words and two more zero regions
        images_p = torch.cat([images, torch.zeros(3, 2, 8, dtype=images.dtype)], 1)
        caps_p = torch.cat([caps, torch.zeros(4, 3, 8, dtype=caps.dtype)], 1)
        img_mask_p = torch.cat([img_mask, torch.zeros(3, 2, dtype=torch.bool)], 1)
        cap_mask_p = torch.cat([cap_mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
        padded = fn(images_p, caps_p, img_mask_p, cap_mask_p, norm, 9.0, agg, 6.0)
        torch.testing.assert_close(padded, base, rtol=0, atol=1e-12)


def test_region_permutation_and_one_region_image():
    g = torch.Generator().manual_seed(11)
    images, _ = random_sets(2, 5, 8, [5, 5], g)
    caps, cap_mask = random_sets(3, 4, 8, [4, 3, 2], g)
    perm = torch.randperm(5, generator=g)
    for fn in (xa.t2i_scores, xa.i2t_scores):
        torch.testing.assert_close(
            fn(images[:, perm], caps, None, cap_mask), fn(images, caps, None, cap_mask), rtol=0, atol=1e-12
        )
    # one region: every word's attended vector is that region, so t2i relevance = cos(word, region)
    one = images[:, :1]
    got = xa.t2i_scores(one, caps, None, cap_mask, agg_func="Mean")
    cos = torch.einsum("id,cld->icl", one[:, 0], caps)
    want = (cos * cap_mask[None]).sum(-1) / cap_mask.sum(-1)[None]
    torch.testing.assert_close(got, want)


def test_block_scores_are_differentiable():
    g = torch.Generator().manual_seed(5)
    images, img_mask = random_sets(2, 3, 4, [3, 2], g)
    caps, cap_mask = random_sets(2, 4, 4, [4, 2], g)
    images.requires_grad_(True)
    caps.requires_grad_(True)
    for fn in (xa.t2i_scores, xa.i2t_scores):
        assert torch.autograd.gradcheck(
            lambda a, b: fn(a, b, img_mask, cap_mask, "clipped_l2norm", 4.0, "LogSumExp", 5.0), (images, caps)
        )


def test_word_region_attention_rows_sum_to_one():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(6, 8, generator=g)
    caption = torch.randn(4, 8, generator=g)
    t2i = xa.word_region_attention(image, caption, direction="t2i")
    i2t = xa.word_region_attention(image, caption, smooth=4.0, direction="i2t")
    assert t2i.shape == (4, 6) and i2t.shape == (6, 4)
    torch.testing.assert_close(t2i.sum(1), torch.ones(4))
    torch.testing.assert_close(i2t.sum(1), torch.ones(6))
