"""l2norm and masked pooling: hand-checked values and padding that must not matter."""

import math

import pytest
import torch

from itmkit.models.functional import (
    check_lengths,
    l2norm,
    length_mask,
    masked_max,
    masked_mean,
    zero_padding,
)


def test_l2norm_by_hand_eps_added_to_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = l2norm(x, dim=-1, eps=1.0)
    # ||(3, 4)|| = 5, so (3, 4) / (5 + 1); the zero row stays zero.
    assert torch.allclose(out[0], torch.tensor([0.5, 4.0 / 6.0]))
    assert torch.equal(out[1], torch.zeros(2))
    unit = l2norm(torch.randn(5, 7), dim=1)
    assert torch.allclose(unit.norm(dim=1), torch.ones(5), atol=1e-6)


def test_l2norm_gradient_is_finite_at_zero_vector():
    x = torch.zeros(2, 3, requires_grad=True)
    l2norm(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_masked_mean_and_max_ignore_padding_garbage():
    x = torch.tensor([[[1.0, -2.0], [3.0, 5.0], [99.0, 99.0]], [[-4.0, 0.5], [-99.0, -99.0], [50.0, 50.0]]])
    lengths = torch.tensor([2, 1])
    assert torch.allclose(masked_mean(x, lengths), torch.tensor([[2.0, 1.5], [-4.0, 0.5]]))
    assert torch.allclose(masked_max(x, lengths), torch.tensor([[3.0, 5.0], [-4.0, 0.5]]))
    padded = zero_padding(x, lengths)
    assert torch.equal(padded[0, 2], torch.zeros(2)) and torch.equal(padded[1, 1:], torch.zeros(2, 2))
    assert torch.equal(length_mask(lengths, 3), torch.tensor([[True, True, False], [True, False, False]]))


def test_masked_pooling_matches_plain_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 4, generator=g)
    lengths = torch.tensor([6, 1, 3, 4, 2])
    for b in range(5):
        n = int(lengths[b])
        for j in range(4):
            values = [float(x[b, k, j]) for k in range(n)]
            assert math.isclose(float(masked_mean(x, lengths)[b, j]), sum(values) / n, rel_tol=1e-5, abs_tol=1e-6)
            assert float(masked_max(x, lengths)[b, j]) == max(values)


def test_check_lengths_names_field_and_values():
    with pytest.raises(ValueError, match=r"my lengths: expected values in \[1, 3\].*found \[0, 2\]"):
        check_lengths(torch.tensor([0, 2]), 2, 3, "my lengths")
    with pytest.raises(ValueError, match=r"expected shape \(3,\), found \(2,\)"):
        check_lengths(torch.tensor([1, 2]), 3, 3)
