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


def test_encoded_writer_equals_cat_then_select_for_shuffled_batches_of_any_length():
    from itmkit.encoded import EncodedWriter

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (11,), generator=g)
    items = [torch.randn(int(n), 3, generator=g) for n in lengths]
    extra = [torch.randn(int(n), 2, generator=g) for n in lengths]
    order = torch.randperm(11, generator=g)

    def part(rows):
        t = int(lengths[rows].max())
        feats, ex = torch.zeros(len(rows), t, 3), torch.zeros(len(rows), t, 2)
        for k, r in enumerate(rows.tolist()):
            feats[k, : lengths[r]], ex[k, : lengths[r]] = items[r], extra[r]
        return Encoded(feats, lengths[rows], {"words": ex, "pooled": feats.sum(1)})

    batches = [order[i : i + 4] for i in range(0, 11, 4)]  # the longest item may come late: the buffer grows
    for hint in (None, 2, 20):
        writer = EncodedWriter(11, t_max=hint)
        for rows in batches:
            writer.write(rows, part(rows))
        got = writer.result()
        inverse = torch.empty(11, dtype=torch.long)
        inverse[order] = torch.arange(11)
        want = Encoded.cat([part(rows) for rows in batches]).select(inverse)
        assert torch.equal(got.feats, want.feats) and torch.equal(got.lengths, want.lengths)
        assert torch.equal(got.extras["words"], want.extras["words"]) and torch.equal(got.extras["pooled"], want.extras["pooled"])
    unfinished = EncodedWriter(11)
    unfinished.write(batches[0], part(batches[0]))
    with pytest.raises(ValueError, match="7 of 11 items were never written"):
        unfinished.result()
