import pytest
import torch

from itmkit.encoded import Encoded


def make(lengths, t=None, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    t = t or int(lengths.max())
    feats = torch.randn(len(lengths), t, d, generator=g)
    feats = feats * (torch.arange(t)[None, :, None] < lengths[:, None, None])
    return Encoded(feats, lengths, {"global": torch.randn(len(lengths), d, generator=g)})


def test_mask_matches_lengths():
    enc = make([1, 3, 2])
    assert enc.mask.tolist() == [[True, False, False], [True, True, True], [True, True, False]]


def test_slice_trims_to_longest_kept_item():
    enc = make([1, 3, 2])
    part = enc.slice(0, 1)
    assert part.feats.shape == (1, 1, 3)
    assert torch.equal(part.extras["global"], enc.extras["global"][:1])
    assert torch.equal(enc.slice(1, 3).feats, enc.feats[1:3])


def test_cat_pads_and_round_trips():
    a, b = make([2, 1], seed=1), make([4], seed=2)
    both = Encoded.cat([a, b])
    assert both.feats.shape == (3, 4, 3)
    assert torch.equal(both.feats[:2, :2], a.feats)
    assert torch.equal(both.feats[:2, 2:], torch.zeros(2, 2, 3))
    assert torch.equal(both.slice(2, 3).feats, b.feats)
    assert both.lengths.tolist() == [2, 1, 4]


def test_select_and_to_keep_lengths_long():
    enc = make([2, 3, 1])
    sel = enc.select(torch.tensor([2, 0]))
    assert sel.lengths.tolist() == [1, 2]
    half = enc.to(dtype=torch.float64)
    assert half.feats.dtype == torch.float64 and half.lengths.dtype == torch.long


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="lengths"):
        Encoded(torch.zeros(2, 3, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="extras\\['g'\\]"):
        Encoded(torch.zeros(2, 3, 4), torch.tensor([1, 2]), {"g": torch.zeros(3, 4)})
