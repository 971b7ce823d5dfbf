"""Hinge triplet loss (baselines.md §B.5): a 3x3 example by hand, a plain-loop reference, the mask."""

import pytest
import torch

from itmkit.config import TrainConfig
from itmkit.losses import hinge_triplet_loss, same_image_mask, use_max_violation

# Row = image, column = caption. With m = 0.2 (worked by hand):
# cost_s (captions as negatives): row 1: j0 0.2+0.5-0.6 = 0.1, j2 0.2+0.7-0.6 = 0.3; rows 0, 2: 0.
# cost_im (images as negatives): col 1: i0 0.2+0.5-0.6 = 0.1, i2 0.2+0.4-0.6 = 0; col 2: i1 0.1.
S = torch.tensor([[0.9, 0.5, 0.1], [0.5, 0.6, 0.7], [0.2, 0.4, 0.8]])


def test_sum_mode_by_hand():
    assert hinge_triplet_loss(S, 0.2, max_violation=False).item() == pytest.approx(0.4 + 0.2)


def test_max_violation_by_hand():
    # hardest: row 1 -> 0.3; col 1 -> 0.1, col 2 -> 0.1
    assert hinge_triplet_loss(S, 0.2, max_violation=True).item() == pytest.approx(0.3 + 0.2)


def test_positive_mask_removes_same_image_pairs_by_hand():
    image_of_pair = torch.tensor([0, 0, 1])  # pairs 0 and 1 share an image
    mask = same_image_mask(image_of_pair)
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # left: cost_s row 1 j2 = 0.3; cost_im col 1 i2 = 0, col 2 i1 = 0.1
    assert hinge_triplet_loss(S, 0.2, False, positives=mask).item() == pytest.approx(0.4)
    assert hinge_triplet_loss(S, 0.2, True, positives=mask).item() == pytest.approx(0.4)


def test_zero_when_positives_beat_negatives_by_the_margin():
    scores = torch.full((4, 4), 0.5) + 0.31 * torch.eye(4)
    assert hinge_triplet_loss(scores, 0.3, False).item() == 0.0
    assert hinge_triplet_loss(scores, 0.32, False).item() > 0.0


def plain_loop_loss(scores, margin, max_violation, positives):
    n = scores.shape[0]
    total = 0.0
    for i in range(n):  # image anchors: captions as negatives
        costs = [max(0.0, margin + float(scores[i, j]) - float(scores[i, i]))
                 for j in range(n) if j != i and not positives[i][j]]
        total += (max(costs, default=0.0) if max_violation else sum(costs))
    for j in range(n):  # caption anchors: images as negatives
        costs = [max(0.0, margin + float(scores[i, j]) - float(scores[j, j]))
                 for i in range(n) if i != j and not positives[i][j]]
        total += (max(costs, default=0.0) if max_violation else sum(costs))
    return total


@pytest.mark.parametrize("max_violation", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_plain_loop_reference(max_violation, masked):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 7, generator=g)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    mask = same_image_mask(ids) if masked else None
    reference = plain_loop_loss(scores, 0.2, max_violation, mask.tolist() if masked else [[False] * 7] * 7)
    assert hinge_triplet_loss(scores, 0.2, max_violation, mask).item() == pytest.approx(reference, rel=1e-5)


def test_gradient_flows_only_through_hardest_negative():
    scores = S.clone().requires_grad_(True)
    hinge_triplet_loss(scores, 0.2, True).backward()
    # row 1's hardest caption is j2, col 1's hardest image is i0, col 2's is i1
    expected = torch.zeros(3, 3)
    expected[1, 2] += 1
    expected[1, 1] -= 1
    expected[0, 1] += 1
    expected[1, 1] -= 1
    expected[1, 2] += 1
    expected[2, 2] -= 1
    assert torch.equal(scores.grad, expected)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"square \[B, B\]"):
        hinge_triplet_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="positives"):
        hinge_triplet_loss(torch.zeros(3, 3), positives=torch.zeros(2, 2, dtype=torch.bool))


def test_hardest_negatives_follow_the_reference_rule_flag_or_warm_up():
    # VSE∞ train.py: `if epoch >= vse_mean_warmup_epochs: max_violation = True` on top of the flag
    def schedule(flag, warmup, epochs=4):
        return [use_max_violation(e, TrainConfig(max_violation=flag, sum_warmup_epochs=warmup)) for e in range(epochs)]

    assert schedule(False, 1) == [False, True, True, True]  # the recipes: one sum-mode epoch
    assert schedule(True, 1) == [True] * 4  # --max_violation: hardest negatives from the first step
    assert schedule(False, 2) == [False, False, True, True]
    assert schedule(False, 0) == [True] * 4
    assert schedule(False, 4) == [False] * 4  # sum mode throughout
    assert TrainConfig().max_violation is False and TrainConfig().sum_warmup_epochs == 1


def test_a_constant_batch_costs_two_margins_per_pair():
    # what every score alike does to the hardest-negative loss (collapse is detected from the
    # scores' spread, itmkit.evaluate.collapse, not from this value: healthy epochs sit near it too)
    B, m = 8, 0.2
    flat = float(hinge_triplet_loss(torch.full((B, B), 0.37), margin=m, max_violation=True))
    assert flat == pytest.approx(2 * B * m)
