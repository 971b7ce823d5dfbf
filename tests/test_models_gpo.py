"""GPO (baselines.md §B.1, §H): weights, padding, limits, and an independent per-item reference."""

import math

import pytest
import torch

from itmkit.models.gpo import GPO, positional_encoding, sorted_weighted_sum


@pytest.fixture
def gpo():
    torch.manual_seed(0)
    return GPO(32, 32).eval()


def padded_batch(lengths, d=5, k=None, seed=0, fill=0.0):
    g = torch.Generator().manual_seed(seed)
    k = k or max(lengths)
    x = torch.full((len(lengths), k, d), fill)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randn(n, d, generator=g)
    return x, torch.tensor(lengths)


def test_positional_encoding_by_hand():
    pe = positional_encoding(7, 32)
    for p in (0, 3, 6):
        for i in (0, 2, 10, 30):
            w = math.exp(-i * math.log(10000.0) / 32)
            assert math.isclose(float(pe[p, i]), math.sin(p * w), abs_tol=1e-6)
            assert math.isclose(float(pe[p, i + 1]), math.cos(p * w), abs_tol=1e-6)
    assert torch.equal(positional_encoding(3, 32), pe[:3])
    with pytest.raises(ValueError, match="even"):
        positional_encoding(3, 5)


def test_weights_sum_to_one_and_vanish_on_padding(gpo):
    x, lengths = padded_batch([5, 2, 1, 4])
    _, weights = gpo(x, lengths)
    assert weights.shape == (4, 5)
    assert torch.allclose(weights.sum(1), torch.ones(4), atol=1e-6)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(weights[b, n:] == 0) and torch.all(weights[b, :n] > 0)


def test_padding_garbage_and_extra_padding_do_not_change_output(gpo):
    x, lengths = padded_batch([5, 2, 3], fill=0.0)
    garbage, _ = padded_batch([5, 2, 3], k=9, fill=1e4)
    pooled, weights = gpo(x, lengths)
    pooled_garbage, weights_garbage = gpo(garbage, lengths)
    assert torch.allclose(pooled, pooled_garbage, atol=1e-6)
    assert torch.equal(weights, weights_garbage)


def test_length_one_returns_the_feature(gpo):
    x, lengths = padded_batch([1, 1], k=4, fill=7.0)
    pooled, weights = gpo(x, lengths)
    assert torch.allclose(pooled, x[:, 0], atol=1e-6)
    assert torch.equal(weights[:, 0], torch.ones(2))


def test_permutation_invariance(gpo):
    x, lengths = padded_batch([6, 4, 3], seed=3)
    permuted = x.clone()
    g = torch.Generator().manual_seed(1)
    for b, n in enumerate(lengths.tolist()):
        permuted[b, :n] = x[b, torch.randperm(n, generator=g)]
    assert torch.allclose(gpo(x, lengths)[0], gpo(permuted, lengths)[0], atol=1e-6)


def test_weights_depend_on_length_only(gpo):
    a, _ = gpo(*padded_batch([4, 6], seed=1))
    _, wa = gpo(*padded_batch([4, 6], seed=1))
    _, wb = gpo(*padded_batch([6, 4, 6, 2], seed=2))
    assert torch.allclose(wa[0, :4], wb[1, :4], atol=1e-6) and torch.allclose(wa[1], wb[0], atol=1e-6)


def test_mean_limit_when_scores_are_forced_equal(gpo):
    with torch.no_grad():
        gpo.linear.weight.zero_()  # equal scores -> uniform weights over valid positions
    x, lengths = padded_batch([5, 2, 3], fill=3.0)
    pooled, weights = gpo(x, lengths)
    expected = torch.stack([x[b, :n].mean(0) for b, n in enumerate(lengths.tolist())])
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert torch.allclose(weights[1, :2], torch.full((2,), 0.5))


def test_max_limit_with_all_weight_on_first_sorted_position():
    x, lengths = padded_batch([5, 2, 3], fill=100.0)
    weights = torch.zeros(3, 5)
    weights[:, 0] = 1.0
    pooled = sorted_weighted_sum(x, lengths, weights)
    expected = torch.stack([x[b, :n].max(0).values for b, n in enumerate(lengths.tolist())])
    assert torch.equal(pooled, expected)


def test_sorted_weighted_sum_matches_plain_loop():
    x, lengths = padded_batch([6, 3, 1, 4], d=4, seed=5, fill=-1e6)
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(4, 6, generator=g)
    pooled = sorted_weighted_sum(x, lengths, weights)
    for b, n in enumerate(lengths.tolist()):
        for j in range(4):
            column = sorted((float(x[b, k, j]) for k in range(n)), reverse=True)
            expected = sum(float(weights[b, k]) * column[k] for k in range(n))
            assert math.isclose(float(pooled[b, j]), expected, rel_tol=1e-5, abs_tol=1e-5)


def test_weights_match_per_sequence_reference(gpo):
    """Each length's weights from an unbatched, unpacked GRU run on that sequence alone."""
    _, weights = gpo(*padded_batch([7, 3, 1, 5]))
    for b, n in enumerate([7, 3, 1, 5]):
        pe = positional_encoding(n, 32)[None]
        out, _ = gpo.gru(pe)  # one sequence, no padding: what packing must reproduce
        hidden = (out[0, :, :32] + out[0, :, 32:]) / 2
        scores = hidden @ gpo.linear.weight[0]
        expected = torch.softmax(scores / 0.1, dim=0)
        assert torch.allclose(weights[b, :n], expected, atol=1e-6)


def test_cache_used_without_grad_and_invalidated_by_parameter_updates(gpo):
    x, lengths = padded_batch([4, 2])
    with torch.no_grad():
        _, first = gpo(x, lengths)
        cached = gpo._cache
        _, again = gpo(x, lengths)
        assert gpo._cache is cached and torch.equal(first, again)
        gpo.linear.weight.mul_(-3.0)  # an in-place update, like an optimiser step
        _, changed = gpo(x, lengths)
    assert not torch.allclose(first, changed)
    fresh = gpo._compute_table(4)[lengths]
    assert torch.allclose(changed, fresh)


def test_gradients_reach_gru_in_training():
    torch.manual_seed(0)
    gpo = GPO().train()
    x, lengths = padded_batch([4, 2, 3])
    x.requires_grad_(True)
    pooled, _ = gpo(x, lengths)
    pooled.pow(2).sum().backward()
    assert gpo.gru.weight_hh_l0.grad is not None and gpo.gru.weight_hh_l0.grad.abs().sum() > 0
    assert gpo.linear.weight.grad.abs().sum() > 0
    assert torch.all(x.grad[1, 2:] == 0)  # padded inputs get no gradient


def test_bad_lengths_raise(gpo):
    x, _ = padded_batch([3, 2])
    with pytest.raises(ValueError, match="GPO lengths"):
        gpo(x, torch.tensor([4, 2]))
