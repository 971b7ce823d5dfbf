"""HREM's triplet loss with distance-weighted negatives (hrem.md §5.1, §8.2-8.3): the weights
against the formula computed per entry, an arg-max draw by hand, the empty-row rule, both
cutoffs, the float32 underflow, the near-symmetry in s, and the seeded multinomial draw."""

import math

import pytest
import torch

from itmkit.losses import (
    TRIPLET_CUTOFF,
    argmax_negatives,
    distance_sampling_weights,
    distance_weighted_triplet_loss,
    same_image_mask,
)


def log_weight(s, dim=512):
    dist = max(math.sqrt(max(2 - 2 * s, 0.0)), 0.5)
    return (2 - dim) * math.log(dist) - ((dim - 3) / 2) * math.log(1 - dist * dist / 4)


def loop_weights(scores, positives, cutoff):
    """§5.1 per entry in float64 (row maximum over every column, positives' zeros included)."""
    rows = []
    for a in range(scores.shape[0]):
        logs = [0.0 if positives[a, b] else log_weight(float(scores[a, b])) for b in range(scores.shape[1])]
        top = max(logs)
        raw = [0.0 if positives[a, b] or max(math.sqrt(2 - 2 * float(scores[a, b])), 0.5) >= cutoff
               else math.exp(logs[b] - top) for b in range(scores.shape[1])]  # fmt: skip
        total = sum(raw) + 1e-20
        rows.append([w / total for w in raw])
    return torch.tensor(rows, dtype=torch.float64)


def test_weights_against_the_formula():
    scores = torch.tensor([
        [0.90, 0.80, 0.78, -0.2],
        [0.10, 0.60, 0.55, 0.50],
        [0.30, 0.31, 0.70, -0.5],
        [0.40, -0.3, 0.35, 0.80],
    ], dtype=torch.float64)  # fmt: skip
    positives = same_image_mask(torch.tensor([0, 1, 2, 3]))
    weights = distance_sampling_weights(scores, positives, cutoff=1.7, dtype=torch.float64)
    assert torch.allclose(weights, loop_weights(scores, positives, 1.7), atol=1e-12)
    assert (weights[positives] == 0).all()
    assert weights[2, 3] == 0  # s = -0.5: distance sqrt(3) = 1.73 >= 1.7, cut off
    sums = weights.sum(1)
    assert torch.allclose(sums[[0, 1, 3]], torch.ones(3, dtype=torch.float64))
    # row 2: the cut-off s = -0.5 sets the row maximum, the eligible weights are ~1e-20 before the
    # normalisation, whose + 1e-20 then keeps the row below 1 (reference arithmetic)
    assert 0 < sums[2] < 1


def test_near_symmetry_in_s():
    # two negatives at s and -s (both eligible, neither clamped): w(s) / w(-s) = sqrt((1 + s) / (1 - s))
    s = 0.3
    scores = torch.tensor([[0.9, s, -s], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]], dtype=torch.float64)
    weights = distance_sampling_weights(scores, torch.eye(3, dtype=torch.bool), dtype=torch.float64)
    assert (weights[0, 1] / weights[0, 2]).item() == pytest.approx(math.sqrt((1 + s) / (1 - s)), rel=1e-9)


def test_argmax_draw_by_hand_with_same_image_positives():
    # pairs 0 and 1 are captions of the same image: mutual positives, never negatives
    scores = torch.tensor([
        [0.70, 0.65, 0.40, 0.10],
        [0.60, 0.75, 0.20, 0.45],
        [0.30, 0.50, 0.80, 0.20],
        [0.10, 0.20, 0.35, 0.60],
    ])  # fmt: skip
    positives = same_image_mask(torch.tensor([7, 7, 3, 5]))
    loss, zero = distance_weighted_triplet_loss(scores, positives, sampler=argmax_negatives)
    assert zero == 0
    # image anchors (rows); the most probable negative is the eligible one with the largest |s|
    i2t = (max(0, 0.2 + 0.40 - 0.70) + max(0, 0.2 + 0.40 - 0.65)   # row 0: positives 0, 1; negative col 2
           + max(0, 0.2 + 0.45 - 0.60) + max(0, 0.2 + 0.45 - 0.75)  # row 1: negative col 3
           + max(0, 0.2 + 0.50 - 0.80)                              # row 2: negative col 1
           + max(0, 0.2 + 0.35 - 0.60))                             # row 3: negative col 2
    # caption anchors (columns of S)
    t2i = (max(0, 0.2 + 0.30 - 0.70) + max(0, 0.2 + 0.30 - 0.60)   # column 0: negative image 2
           + max(0, 0.2 + 0.50 - 0.65) + max(0, 0.2 + 0.50 - 0.75)  # column 1: negative image 2
           + max(0, 0.2 + 0.40 - 0.80)                              # column 2: negative image 0
           + max(0, 0.2 + 0.45 - 0.60))                             # column 3: negative image 1
    assert loss.item() == pytest.approx(i2t + t2i, abs=1e-6)


def test_empty_row_zeroes_the_direction_and_keeps_the_graph():
    scores = torch.tensor([[0.9, -0.6], [-0.6, 0.9]], requires_grad=True)  # every negative beyond 1.7
    loss, zero = distance_weighted_triplet_loss(scores, torch.eye(2, dtype=torch.bool))
    assert loss.item() == 0.0 and zero == 2
    loss.backward()  # connected to the scores even when zero
    assert scores.grad is not None


def test_coco_cutoff_keeps_an_anticorrelated_negative_f30k_does_not():
    # s = -0.6: distance sqrt(3.2) = 1.79, inside COCO's 1.9, outside f30k's 1.7
    scores = torch.tensor([[0.9, -0.6, 0.32], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]])
    eye = torch.eye(3, dtype=torch.bool)
    f30k = distance_sampling_weights(scores, eye, cutoff=TRIPLET_CUTOFF["f30k"], dtype=torch.float64)
    coco = distance_sampling_weights(scores, eye, cutoff=TRIPLET_CUTOFF["coco"], dtype=torch.float64)
    assert f30k[0].argmax() == 2 and f30k[0, 1] == 0
    assert coco[0].argmax() == 1  # the anti-correlated negative wins over the mildly hard one


def test_float32_underflow_and_its_two_remedies():
    # a cut-off negative with large |s| sets the row maximum; in float32 the eligible weight underflows
    scores = torch.tensor([[0.3, -0.95, 0.2], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]])
    eye = torch.eye(3, dtype=torch.bool)
    assert distance_sampling_weights(scores, eye)[0].sum() == 0
    loss32, zero32 = distance_weighted_triplet_loss(scores, eye, sampler=argmax_negatives)
    loss64, zero64 = distance_weighted_triplet_loss(scores, eye, sampler=argmax_negatives, dtype=torch.float64)
    loss_cut, zero_cut = distance_weighted_triplet_loss(scores, eye, sampler=argmax_negatives, cutoff_before_max=True)
    assert zero32 >= 1 and zero64 == 0 and zero_cut == 0
    assert loss64.item() == pytest.approx(loss_cut.item())
    assert loss32.item() == 0.0 and loss64.item() == pytest.approx(0.1, abs=1e-6)  # row 0: 0.2 + 0.2 - 0.3


def test_seeded_multinomial_draw_is_reproducible():
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    scores = scores @ scores.t() * 0.99  # clamped distances: genuinely random draws
    positives = torch.eye(8, dtype=torch.bool)
    torch.manual_seed(1)
    first = distance_weighted_triplet_loss(scores, positives)[0]
    torch.manual_seed(1)
    assert distance_weighted_triplet_loss(scores, positives)[0].item() == first.item()


def test_shape_checks():
    with pytest.raises(ValueError, match="same shape"):
        distance_weighted_triplet_loss(torch.zeros(3, 3), torch.zeros(3, 2, dtype=torch.bool))
