"""hardest_negatives_by_batch_size against a plain loop over the drawn batches."""

import numpy as np
import pytest

from itmkit.evaluate.batch_negatives import hardest_negatives_by_batch_size


def _by_loop(sims, sizes, n_batches, seed, margin):
    """Per size: mean hardest negative, mean hinge, share violating, loss per pair; the batches
    drawn the documented way (one generator, sizes in order)."""
    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        hardest, hinge, violating, loss = [], [], [], []
        for _ in range(n_batches):
            images = rng.choice(sims.shape[0], size=size, replace=False)
            captions = images * 5 + rng.integers(0, 5, size=size)
            total = 0.0
            for a in range(size):
                pos = sims[images[a], captions[a]]
                neg_cap = max(sims[images[a], captions[b]] for b in range(size) if b != a)  # the image's hardest caption
                neg_img = max(sims[images[b], captions[a]] for b in range(size) if b != a)  # the caption's hardest image
                for neg in (neg_cap, neg_img):
                    cost = max(0.0, margin + neg - pos)
                    hardest.append(neg)
                    hinge.append(cost)
                    violating.append(cost > 0)
                    total += cost
            loss.append(total / size)
        out.append([np.mean(hardest), np.mean(hinge), np.mean(violating), np.mean(loss)])
    return np.array(out)


def test_hardest_negatives_by_batch_size_by_a_plain_loop():
    sims = np.random.default_rng(1).standard_normal((12, 60)) * 0.3
    sims[np.arange(60) // 5, np.arange(60)] += 0.5  # matching pairs score higher
    table = hardest_negatives_by_batch_size(sims, [2, 5, 12], n_batches=7, seed=3, margin=0.2)
    assert table["batch_size"].tolist() == [2, 5, 12]
    np.testing.assert_allclose(table[["hardest_negative", "hardest_hinge", "violating", "loss_per_pair"]].to_numpy(),
                               _by_loop(sims, [2, 5, 12], 7, 3, 0.2), rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(table["loss_per_pair"], 2 * table["hardest_hinge"])
    assert table["hardest_negative"].is_monotonic_increasing  # bigger batches hold harder negatives


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="expected 5 captions per image"):
        hardest_negatives_by_batch_size(np.zeros((4, 19)), [2])
    with pytest.raises(ValueError, match="batch size 9: expected 2 to 4"):
        hardest_negatives_by_batch_size(np.random.default_rng(0).random((4, 20)), [9])
    bad = np.zeros((4, 20))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hardest_negatives_by_batch_size(bad, [2])
