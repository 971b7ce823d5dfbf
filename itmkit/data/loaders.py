"""Batches for training and evaluation over a :class:`~itmkit.data.precomp.PrecompSplit`.

Training samples one item per caption (VSE∞ ``PrecompDataset``): the caption's image features,
its token ids, with VSE∞'s augmentation (baselines.md §A.5). Every random draw is a function of
``(seed, epoch, caption index)`` (augmentation) or ``(seed, epoch)`` (order), so a run resumed at
step ``k`` of an epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from itmkit.data.augment import REGION_DROP_RATE, drop_regions
from itmkit.data.precomp import PrecompSplit
from itmkit.data.text import TextPipeline
from itmkit.distributed import contiguous_share


@dataclass
class Batch:
    """A collated training batch of ``B`` (image, caption) pairs.

    Attributes:
        images: ``[B, K, D]`` float32, zero-padded to the batch's most regions ``K``.
        img_lengths: ``[B]`` long, regions kept per image.
        tokens: ``[B, L]`` long, padded with the pipeline's ``pad_id`` (0).
        cap_lengths: ``[B]`` long, tokens per caption (``<start>``/``<end>`` or ``[CLS]``/``[SEP]`` included).
        image_index: ``[B]`` long, unique-image index in the split (``caption // 5``).
        caption_index: ``[B]`` long, caption index in the split.
    """

    images: Tensor
    img_lengths: Tensor
    tokens: Tensor
    cap_lengths: Tensor
    image_index: Tensor
    caption_index: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def split(self, parts: int) -> list["Batch"]:
        """``parts`` contiguous micro-batches (sizes as :func:`rank_share` gives them), each trimmed
        to its own longest image and caption: exactly the batches ``parts`` ranks would collate
        from this one (gradient accumulation matches DDP's split of a global batch)."""
        if not 1 <= parts <= len(self):
            raise ValueError(f"Batch.split: expected 1 to {len(self)} parts of a batch of {len(self)} pairs, found {parts}")
        if parts == 1:
            return [self]
        pieces = []
        for part in range(parts):
            lo, hi = rank_share(len(self), part, parts)
            k, steps = int(self.img_lengths[lo:hi].max()), int(self.cap_lengths[lo:hi].max())
            pieces.append(Batch(self.images[lo:hi, :k], self.img_lengths[lo:hi], self.tokens[lo:hi, :steps],
                                self.cap_lengths[lo:hi], self.image_index[lo:hi], self.caption_index[lo:hi]))  # fmt: skip
        return pieces

    def pin_memory(self) -> "Batch":
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return Batch(*(getattr(self, f.name).pin_memory() for f in fields(self)))


@dataclass
class PairItem:
    """One training sample before collation: ``image [k, D]`` float32, ``tokens`` ids, indices."""

    image: np.ndarray
    tokens: list[int]
    image_index: int
    caption_index: int


class PairDataset(Dataset):
    """One item per caption: its image's features ``[k, D]`` and its token ids.

    Args:
        split: the opened split (features stay memory-mapped; each item copies one image).
        pipeline: text pipeline turning captions into ids.
        train: apply the training augmentation (dev/test never augment).
        region_drop: drop rate per region in training (0.2 in VSE∞; 0 disables).
        caption_augment: mask / random / delete tokens in training (§A.5).
        seed: run seed; item ``c`` of epoch ``e`` draws from ``default_rng([seed, e, c])``.
    """

    def __init__(
        self,
        split: PrecompSplit,
        pipeline: TextPipeline,
        train: bool = True,
        region_drop: float = REGION_DROP_RATE,
        caption_augment: bool = True,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= region_drop < 1.0:
            raise ValueError(f"PairDataset: region_drop must be in [0, 1), got {region_drop}")
        self.split = split
        self.pipeline = pipeline
        self.train = train
        self.region_drop = region_drop
        self.caption_augment = caption_augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation draws ``__getitem__`` makes."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.split.n_captions

    def item_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> PairItem:
        index = int(index)
        caption = self.split.captions[index]
        # Copy the row out of the memmap (items cross process boundaries in DataLoader workers);
        # a NaN/Inf value raises naming the file and row
        image = self.split.feature_row(self.split.row_of_caption(index))
        if not self.train:
            return PairItem(image, self.pipeline.encode(caption), index // 5, index)
        rng = self.item_rng(index)
        if self.region_drop > 0:
            image = image[drop_regions(len(image), rng, self.region_drop)]
        tokens = self.pipeline.encode(caption, rng if self.caption_augment else None)
        return PairItem(image, tokens, index // 5, index)


def pad_token_lists(token_lists: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """``B`` id lists -> ``tokens [B, L]`` long padded with ``pad_id``, ``lengths [B]`` long."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    tokens = torch.full((len(token_lists), int(lengths.max()) if len(token_lists) else 0), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return tokens, lengths


def collate_pairs(items: Sequence[PairItem], pad_id: int = 0) -> Batch:
    """Pad images to the batch's most regions with zeros and tokens with ``pad_id``.

    Unlike the reference BiGRU collate, the batch is not sorted by caption length: encoders
    pack with ``enforce_sorted=False``, and keeping the sampled order keeps indices simple.
    """
    if not items:
        raise ValueError("collate_pairs: empty batch")
    img_lengths = torch.tensor([len(item.image) for item in items], dtype=torch.long)
    dim = items[0].image.shape[1]
    images = np.zeros((len(items), int(img_lengths.max()), dim), dtype=np.float32)
    for row, item in enumerate(items):
        images[row, : len(item.image)] = item.image
    tokens, cap_lengths = pad_token_lists([item.tokens for item in items], pad_id)
    return Batch(
        images=torch.from_numpy(images),
        img_lengths=img_lengths,
        tokens=tokens,
        cap_lengths=cap_lengths,
        image_index=torch.tensor([item.image_index for item in items], dtype=torch.long),
        caption_index=torch.tensor([item.caption_index for item in items], dtype=torch.long),
    )


class _BatchIndexSampler(Sampler[list[int]]):
    """Yields precomputed lists of item indices, one per batch (the DataLoader collates each;
    workers stay possible)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def rank_share(batch_len: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rank``'s contiguous share of a global batch of ``batch_len`` pairs
    (:func:`itmkit.distributed.contiguous_share`): the ranks' shares concatenated in rank order
    are the global batch itself."""
    return contiguous_share(batch_len, rank, world_size)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """``[n]`` permutation of item indices for ``epoch``, a function of ``(seed, epoch)`` only."""
    # Hash (seed, epoch) into one 63-bit torch seed; nearby seeds give unrelated permutations.
    torch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    generator = torch.Generator().manual_seed(torch_seed)
    return torch.randperm(n, generator=generator)


def steps_per_epoch(n_items: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Optimisation steps of one epoch. With several ranks a last global batch smaller than the
    world size is skipped (a rank would get no pair; see :func:`train_batches`)."""
    if drop_last:
        return n_items // batch_size
    tail = n_items % batch_size
    return n_items // batch_size + (1 if tail and tail >= world_size else 0)


def train_batches(
    dataset: PairDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pad_id: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Collated batches of one training epoch in a permutation drawn from ``(seed, epoch)``.

    Global batches are consecutive chunks of ``batch_size`` of the permutation, so skipping
    ``start_step`` batches (a resumed run) yields exactly the tail of the full epoch. Sets
    ``dataset.set_epoch(epoch)``. ``drop_last=False`` by default so that a tiny set still gives
    one batch.

    Several processes (``world_size > 1``, DDP): every rank draws the same permutation and takes
    its contiguous share (:func:`rank_share`) of each global batch, so the ranks' batches of a
    step, concatenated in rank order, are the one-process batch of that step, pair for pair and
    augmentation draw for draw (those come from ``(seed, epoch, caption)``). A last global batch
    smaller than ``world_size`` is skipped on every rank (some rank would have no pair);
    :func:`steps_per_epoch` counts the same. ``pin_memory`` pins the batches for fast copies to
    a GPU (DataLoader workers fill them from the memory-mapped features: no process holds the
    whole array).
    """
    if batch_size <= 0:
        raise ValueError(f"train_batches: batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"train_batches: rank {rank} is not in a world of {world_size} processes")
    dataset.set_epoch(epoch)
    order = epoch_order(len(dataset), seed, epoch)[start_step * batch_size :].tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if (drop_last and len(chunk) < batch_size) or len(chunk) < world_size:
            continue
        lo, hi = rank_share(len(chunk), rank, world_size)
        batches.append(chunk[lo:hi])
    pad = dataset.pipeline.pad_id if pad_id is None else pad_id
    loader = DataLoader(
        dataset,
        batch_sampler=_BatchIndexSampler(batches),
        collate_fn=partial(collate_pairs, pad_id=pad),
        num_workers=num_workers,
        pin_memory=pin_memory,
        # The loader's own generator (worker base seed) comes from (seed, epoch), so starting an
        # iterator never draws from torch's global RNG: a resumed run keeps the model's dropout
        # stream exactly where an uninterrupted run has it.
        generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
    )
    yield from loader


def training_batch(split: PrecompSplit, pipeline: TextPipeline, batch_size: int, seed: int, epoch: int = 0,
                   index: int = 0, augment: bool = False) -> Batch:  # fmt: skip
    """Batch ``index`` of ``epoch`` exactly as :func:`train_batches` orders it for ``seed``: the
    same pairs a training run with that seed and batch size sees at that step (for notebooks that
    show one training batch). ``augment=False`` leaves out region drop and caption augmentation
    (the pairs stay the same, their features unaltered)."""
    n_batches = steps_per_epoch(split.n_captions, batch_size)
    if not 0 <= index < n_batches:
        raise IndexError(f"training_batch: index {index}: expected one of the {n_batches} batches of an epoch")
    dataset = PairDataset(split, pipeline, train=augment, seed=seed)
    return next(train_batches(dataset, batch_size, seed, epoch, start_step=index))


def image_batches(split: PrecompSplit, batch_size: int, progress: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Unique images in order, no augmentation: ``(images [b, K, D] float32, lengths [b] long)``.

    When an older release repeats each image 5 times (``im_div == 1``) every 5th row is read.
    """
    for start in tqdm(range(0, split.n_images, batch_size), desc=f"{split.split} images", disable=not progress, leave=False):
        stop = min(start + batch_size, split.n_images)
        block = torch.from_numpy(split.image_block(start, stop))
        yield block, torch.full((stop - start,), split.n_regions, dtype=torch.long)


def caption_batches(
    split: PrecompSplit, pipeline: TextPipeline, batch_size: int, progress: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """Captions in order, test-time encoding: ``(tokens [b, L] long, lengths [b] long)``."""
    for start in tqdm(range(0, split.n_captions, batch_size), desc=f"{split.split} captions", disable=not progress, leave=False):
        ids = [pipeline.encode(c) for c in split.captions[start : start + batch_size]]
        yield pad_token_lists(ids, pipeline.pad_id)
