"""HREM's fragment-level pooling (hrem.md §3.2): max-k pooling by hand, the k carry-over quirk, and
FragmentAggregation against a plain per-item Transformer layer written from its state dict."""

import math

import pytest
import torch

from itmkit.models.fragment_pooling import FragmentAggregation, maxk_pool, transformer_layer
from itmkit.models.functional import masked_max


def test_maxk_pool_by_hand_with_garbage_padding():
    x = torch.tensor([
        [[1.0, 9.0], [5.0, -1.0], [3.0, 4.0]],
        [[2.0, -3.0], [100.0, 100.0], [-100.0, 7.0]],  # one valid row, then garbage
    ])  # fmt: skip
    out = maxk_pool(x, torch.tensor([3, 1]), k=2)
    # item 0: feature 0 top-2 of (1, 5, 3) = (5, 3) -> 4; feature 1 top-2 of (9, -1, 4) -> 6.5
    # item 1: one valid row: k_b = min(2, 1) = 1 -> the row itself
    assert torch.equal(out, torch.tensor([[4.0, 6.5], [2.0, -3.0]]))


def test_maxk_pool_k1_is_max_pooling_and_k_large_is_mean():
    torch.manual_seed(0)
    x, lengths = torch.randn(4, 6, 5), torch.tensor([6, 2, 4, 1])
    assert torch.allclose(maxk_pool(x, lengths, k=1), masked_max(x, lengths))
    expected = torch.stack([x[b, : lengths[b]].mean(0) for b in range(4)])
    assert torch.allclose(maxk_pool(x, lengths, k=6), expected, atol=1e-6)


def test_maxk_pool_carry_over_quirk():
    x = torch.tensor([[[1.0], [3.0]], [[2.0], [0.0]], [[4.0], [6.0]]])
    lengths = torch.tensor([2, 1, 2])
    # without the quirk every item uses min(2, n_b): 2, 1, 2
    assert torch.equal(maxk_pool(x, lengths, k=2), torch.tensor([[2.0], [2.0], [5.0]]))
    # the reference re-binds k to 1 after the one-fragment item: the last item takes its max only
    assert torch.equal(maxk_pool(x, lengths, k=2, carry_over=True), torch.tensor([[2.0], [2.0], [6.0]]))


def test_maxk_pool_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        maxk_pool(torch.zeros(2, 3, 4), torch.tensor([0, 3]))


def reference_layer(x, state, nhead):
    """A post-norm TransformerEncoderLayer (ReLU, eval mode) on one unpadded set ``x [n, d]``, by hand."""
    x = x.double()
    s = {k: v.double() for k, v in state.items()}
    n, d = x.shape
    q, k, v = (x @ s["self_attn.in_proj_weight"].t() + s["self_attn.in_proj_bias"]).chunk(3, dim=-1)
    width = d // nhead
    heads = []
    for h in range(nhead):
        cols = slice(h * width, (h + 1) * width)
        logits = q[:, cols] @ k[:, cols].t() / math.sqrt(width)
        heads.append(torch.softmax(logits, dim=-1) @ v[:, cols])
    attended = torch.cat(heads, dim=-1) @ s["self_attn.out_proj.weight"].t() + s["self_attn.out_proj.bias"]

    def norm(y, name):
        mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        return (y - mean) / torch.sqrt(var + 1e-5) * s[f"{name}.weight"] + s[f"{name}.bias"]

    y = norm(x + attended, "norm1")
    ff = torch.relu(y @ s["linear1.weight"].t() + s["linear1.bias"]) @ s["linear2.weight"].t() + s["linear2.bias"]
    return norm(y + ff, "norm2")


def test_fragment_aggregation_matches_a_per_item_reference_and_ignores_padding():
    torch.manual_seed(1)
    pool = FragmentAggregation(8, nhead=2, dropout=0.1, residual_weight=0.8).eval()
    for p in pool.parameters():  # non-trivial LayerNorm / bias values
        torch.nn.init.normal_(p, std=0.3)
    lengths = torch.tensor([5, 2, 1])
    x = torch.randn(3, 6, 8)
    garbage = x.clone()
    for b, n in enumerate(lengths):
        garbage[b, n:] = 1e3 * torch.randn(6 - n, 8)
    with torch.no_grad():
        out = pool(x, lengths)
        assert torch.allclose(pool(garbage, lengths), out, atol=1e-5)
        wider = torch.cat([garbage, torch.randn(3, 4, 8)], dim=1)
        assert torch.allclose(pool(wider, lengths), out, atol=1e-5)
    state = {k[len("layers.0."):]: v for k, v in pool.transformer.state_dict().items()}
    for b, n in enumerate(lengths.tolist()):
        items = x[b, :n]
        top = items.double().sort(dim=0, descending=True).values[: min(2, n)].mean(0)
        z = reference_layer(items, state, nhead=2).mean(0)
        assert torch.allclose(out[b].double(), 0.8 * top + 0.2 * z, atol=1e-5)


def test_fragment_aggregation_is_order_invariant_and_beta_one_is_maxk():
    torch.manual_seed(2)
    pool = FragmentAggregation(8, nhead=4, residual_weight=0.8).eval()
    x, lengths = torch.randn(2, 5, 8), torch.tensor([5, 3])
    shuffled = x.clone()
    shuffled[0] = x[0, torch.tensor([3, 0, 4, 1, 2])]
    shuffled[1, :3] = x[1, torch.tensor([2, 0, 1])]
    with torch.no_grad():
        assert torch.allclose(pool(shuffled, lengths), pool(x, lengths), atol=1e-5)
        pool.residual_weight = 1.0
        assert torch.allclose(pool(x, lengths), maxk_pool(x, lengths, 2))


def test_transformer_layer_keys_and_head_check():
    keys = set(transformer_layer(16, 4, 0.1).state_dict())
    assert "layers.0.self_attn.in_proj_weight" in keys and "layers.0.linear2.bias" in keys and "layers.0.norm2.weight" in keys
    with pytest.raises(ValueError, match="divisible"):
        transformer_layer(10, 4, 0.1)
