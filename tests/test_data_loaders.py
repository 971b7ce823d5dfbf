"""PairDataset, collation, epoch order and resume, evaluation iterators (baselines.md §A.5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit.data.loaders import (
    Batch,
    PairDataset,
    PairItem,
    caption_batches,
    collate_pairs,
    epoch_order,
    image_batches,
    steps_per_epoch,
    train_batches,
)
from itmkit.data.precomp import PrecompSplit
from itmkit.data.text import WordIdPipeline
from itmkit.data.vocab import Vocabulary

WORDS = ["a", "red", "blue", "ball", "cup", "on", "the", "table", "dog", "cat"]


def make_split(root: Path, n_img: int = 12, k: int = 8, d: int = 5, im_div: int = 5) -> tuple[PrecompSplit, np.ndarray]:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n_img, k, d)).astype(np.float32) + 10.0  # no feature is 0
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "train_ims.npy", feats if im_div == 5 else np.repeat(feats, 5, axis=0))
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(5 * n_img)]
    (root / "train_caps.txt").write_text("\n".join(lines))
    return PrecompSplit.open(root, "train"), feats


@pytest.fixture()
def pipeline():
    return WordIdPipeline(Vocabulary([*Vocabulary.SPECIALS, *WORDS]))


@pytest.mark.parametrize("im_div", [5, 1])
def test_eval_items_are_unaltered(tmp_path, pipeline, im_div):
    split, feats = make_split(tmp_path, im_div=im_div)
    dataset = PairDataset(split, pipeline, train=False)
    assert len(dataset) == 60
    for c in (0, 7, 59):
        item = dataset[c]
        np.testing.assert_array_equal(item.image, feats[c // 5])
        assert item.tokens == pipeline.encode(split.captions[c])
        assert (item.image_index, item.caption_index) == (c // 5, c)


def test_train_items_depend_only_on_seed_epoch_index(tmp_path, pipeline):
    split, feats = make_split(tmp_path)
    dataset = PairDataset(split, pipeline, train=True, seed=3)
    dataset.set_epoch(2)
    first = [dataset[c] for c in range(60)]
    other = PairDataset(split, pipeline, train=True, seed=3)
    other.set_epoch(2)
    for c in reversed(range(60)):  # order of access must not matter
        again = other[c]
        np.testing.assert_array_equal(again.image, first[c].image)
        assert again.tokens == first[c].tokens
    # kept regions are a subset of the image's rows, in order
    for c, item in enumerate(first):
        rows = [int(np.flatnonzero((feats[c // 5] == r).all(1))[0]) for r in item.image]
        assert rows == sorted(rows) and len(rows) >= 1
    assert {len(item.image) for item in first} != {8}  # some regions were dropped
    other.set_epoch(3)
    assert any(other[c].tokens != first[c].tokens or len(other[c].image) != len(first[c].image) for c in range(60))


def test_train_switches(tmp_path, pipeline):
    split, feats = make_split(tmp_path)
    no_aug = PairDataset(split, pipeline, train=True, region_drop=0.0, caption_augment=False)
    for c in range(60):
        item = no_aug[c]
        np.testing.assert_array_equal(item.image, feats[c // 5])
        assert item.tokens == pipeline.encode(split.captions[c])
    with pytest.raises(ValueError, match="region_drop"):
        PairDataset(split, pipeline, region_drop=1.0)


def test_collate_pads_against_a_plain_loop():
    rng = np.random.default_rng(0)
    items = [PairItem(rng.standard_normal((k, 3)).astype(np.float32), list(range(1, n + 1)), i, 5 * i + 1)
             for i, (k, n) in enumerate([(2, 4), (5, 2), (3, 6)])]
    batch = collate_pairs(items, pad_id=0)
    assert batch.images.shape == (3, 5, 3) and batch.tokens.shape == (3, 6)
    assert batch.img_lengths.tolist() == [2, 5, 3] and batch.cap_lengths.tolist() == [4, 2, 6]
    assert batch.image_index.tolist() == [0, 1, 2] and batch.caption_index.tolist() == [1, 6, 11]
    for b, item in enumerate(items):
        for k in range(5):
            expected = item.image[k] if k < len(item.image) else np.zeros(3, np.float32)
            np.testing.assert_array_equal(batch.images[b, k].numpy(), expected)
        for t in range(6):
            assert batch.tokens[b, t].item() == (item.tokens[t] if t < len(item.tokens) else 0)
    assert batch.images.dtype == torch.float32 and batch.tokens.dtype == torch.long
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and len(moved) == 3


def _epoch(dataset, seed, epoch, start_step=0, num_workers=0, batch_size=7):
    return list(train_batches(dataset, batch_size, seed, epoch, start_step=start_step, num_workers=num_workers))


def _same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in
               ("images", "img_lengths", "tokens", "cap_lengths", "image_index", "caption_index"))


def test_same_seed_same_batches_and_resume_equals_tail(tmp_path, pipeline):
    split, _ = make_split(tmp_path)
    dataset = PairDataset(split, pipeline, train=True, seed=1)
    full = _epoch(dataset, seed=1, epoch=4)
    assert len(full) == steps_per_epoch(60, 7) == 9 and len(full[-1]) == 60 - 8 * 7
    assert sorted(torch.cat([b.caption_index for b in full]).tolist()) == list(range(60))
    again = _epoch(PairDataset(split, pipeline, train=True, seed=1), seed=1, epoch=4)
    assert all(_same(a, b) for a, b in zip(full, again))
    for k in (1, 5, 8):
        tail = _epoch(PairDataset(split, pipeline, train=True, seed=1), seed=1, epoch=4, start_step=k)
        assert len(tail) == len(full) - k and all(_same(a, b) for a, b in zip(full[k:], tail))
    other_epoch = _epoch(dataset, seed=1, epoch=5)
    other_seed = _epoch(dataset, seed=2, epoch=4)
    assert not torch.equal(full[0].caption_index, other_epoch[0].caption_index)
    assert not torch.equal(full[0].caption_index, other_seed[0].caption_index)
    assert steps_per_epoch(60, 7, drop_last=True) == 8
    assert len(list(train_batches(dataset, 7, 1, 4, drop_last=True))) == 8


def test_epoch_order_is_a_permutation_per_seed_and_epoch():
    a, b = epoch_order(100, 0, 0), epoch_order(100, 0, 0)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_order(100, 0, 1)) and not torch.equal(a, epoch_order(100, 1, 0))


def test_workers_give_the_same_batches(tmp_path, pipeline):
    split, _ = make_split(tmp_path)
    dataset = PairDataset(split, pipeline, train=True, seed=0)
    plain = _epoch(dataset, seed=0, epoch=1, batch_size=16)
    workers = _epoch(dataset, seed=0, epoch=1, batch_size=16, num_workers=2)
    assert len(plain) == len(workers) and all(_same(a, b) for a, b in zip(plain, workers))


@pytest.mark.parametrize("im_div", [5, 1])
def test_image_batches_cover_unique_images(tmp_path, im_div):
    split, feats = make_split(tmp_path, n_img=11, im_div=im_div)
    chunks = list(image_batches(split, batch_size=4))
    assert [len(c[0]) for c in chunks] == [4, 4, 3]
    np.testing.assert_array_equal(torch.cat([c[0] for c in chunks]).numpy(), feats)
    assert all(c[1].tolist() == [8] * len(c[1]) for c in chunks)


def test_caption_batches_in_order(tmp_path, pipeline):
    split, _ = make_split(tmp_path, n_img=3)
    chunks = list(caption_batches(split, pipeline, batch_size=4))
    assert sum(len(c[1]) for c in chunks) == 15
    c = 0
    for tokens, lengths in chunks:
        for row in range(len(lengths)):
            ids = pipeline.encode(split.captions[c])
            assert lengths[row].item() == len(ids) and tokens[row, : len(ids)].tolist() == ids
            assert (tokens[row, len(ids) :] == 0).all()
            c += 1


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_concatenate_to_the_one_process_batches(tmp_path, pipeline, world):
    """DDP's sampler: each rank's batch of a step is its contiguous share of the one-process
    batch, pair for pair and augmentation for augmentation (issue 13 §1)."""
    split, _ = make_split(tmp_path)
    one = _epoch(PairDataset(split, pipeline, train=True, seed=3), seed=3, epoch=2, batch_size=16)  # 60 = 3 x 16 + 12
    ranks = [list(train_batches(PairDataset(split, pipeline, train=True, seed=3), 16, 3, 2, rank=r, world_size=world))
             for r in range(world)]  # fmt: skip
    assert [len(r) for r in ranks] == [len(one)] * world == [steps_per_epoch(60, 16, world_size=world)] * world
    for step, whole in enumerate(one):
        parts = [r[step] for r in ranks]
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        assert torch.equal(torch.cat([p.caption_index for p in parts]), whole.caption_index)
        for part, piece in zip(parts, whole.split(world)):  # Batch.split cuts the same shares
            assert _same(part, piece)
    # resuming at step 2 on every rank gives each rank's tail
    tail = list(train_batches(PairDataset(split, pipeline, train=True, seed=3), 16, 3, 2, start_step=2, rank=1,
                              world_size=world))  # fmt: skip
    assert all(_same(a, b) for a, b in zip(ranks[1][2:], tail))


def test_a_last_batch_smaller_than_the_world_is_skipped_on_every_rank(tmp_path, pipeline):
    split, _ = make_split(tmp_path)  # 60 captions: batches of 29 leave 2
    assert steps_per_epoch(60, 29) == 3 and steps_per_epoch(60, 29, world_size=2) == 3
    assert steps_per_epoch(60, 29, world_size=3) == 2
    for rank in range(3):
        batches = list(train_batches(PairDataset(split, pipeline, train=True, seed=0), 29, 0, 0, rank=rank, world_size=3))
        assert [len(b) for b in batches] == [10 if rank < 2 else 9] * 2
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        next(train_batches(PairDataset(split, pipeline, train=True, seed=0), 29, 0, 0, rank=3, world_size=3))


def test_batch_split_trims_each_part_to_its_own_padding():
    rng = np.random.default_rng(0)
    items = [PairItem(rng.standard_normal((k, 3)).astype(np.float32), list(range(1, n + 1)), i // 5, i)
             for i, (k, n) in enumerate([(2, 3), (5, 2), (3, 7), (4, 4), (1, 2)])]  # fmt: skip
    whole = collate_pairs(items)
    parts = whole.split(2)
    assert [len(p) for p in parts] == [3, 2]
    for part, chunk in zip(parts, (items[:3], items[3:])):
        assert _same(part, collate_pairs(chunk))  # exactly what a rank would collate
    assert whole.split(1) == [whole]
    with pytest.raises(ValueError, match="expected 1 to 5 parts"):
        whole.split(6)
