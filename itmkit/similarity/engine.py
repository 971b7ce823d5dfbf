"""The pairwise similarity engine: a whole ``[n_img, n_cap]`` matrix from block scores.

Methods whose score does not factorise (SCAN, SGRAF, CHAN, ESL, ...) supply
``score_block(images, captions) -> [bi, bc]`` over a block of images and a block of captions
(an :class:`~itmkit.encoded.Encoded` each, padded, with lengths) and
``pair_workspace_bytes(images, captions)``, the working memory one pair needs. The engine

- sorts captions by length (longest first) so each caption block carries little padding, and
  writes results back in the original order,
- plans blocks so that ``bi * bc * pair_workspace_bytes`` stays under a memory budget
  (``memory_budget`` bytes; default: half the free CUDA memory, or on the CPU half the
  last-level cache, see :func:`default_memory_budget`). Caption blocks grow as captions get
  shorter: each block is sized for its own longest caption,
- trims each caption block to its longest caption (same scores, fewer padded words),
- moves blocks to the device (optionally in fp16/bf16 on CUDA; the method accumulates in fp32),
- writes into a preallocated result: a tensor, or a memory-mapped ``.npy`` file when ``out``
  is a path, so a COCO 5K x 25K matrix never sits in RAM twice,
- shows progress with tqdm (in pairs).

Used in training (the ``[B, B]`` batch matrix for the hinge loss; with gradients enabled the
blocks are assembled differentiably) and evaluation (no grad, blocks written in place).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from itmkit.encoded import Encoded

if TYPE_CHECKING:
    from itmkit.models.base import MatchingModel

# Block workspace on the CPU when the last-level cache size cannot be read. Blocks that stay in
# cache are the fast ones: on a 2-core EPYC with a 32 MiB L3, f30k shapes (benchmarks/
# pairwise_engine.py, docs/scan.md) evaluated SCAN t2i 1.9x, SGR and SAF 2.1x, CHAN and ESL
# 1.2-1.4x faster at 8-16 MiB than at 256 MiB.
DEFAULT_CPU_BUDGET = 16 << 20
#: CPU budgets derived from the cache stay within these bounds.
CPU_BUDGET_RANGE = (4 << 20, 64 << 20)
# Training (gradients on) keeps every block's activations until backward anyway, so a small
# block saves no memory; its speed did not depend on the block size (SGR and SCAN at f30k dims,
# 16-256 MiB), and a batch split into image blocks changes SAF's per-caption train-mode
# BatchNorm statistics (sgraf.md §3.4). Training blocks therefore stay large.
DEFAULT_CPU_TRAIN_BUDGET = 256 << 20


@functools.cache
def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (L3 usually) from Linux sysfs, ``None`` where unreadable.
    Read once per process (the engine asks on every call)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def default_memory_budget(device: torch.device, training: bool = False) -> int:
    """Bytes of block workspace.

    CUDA: half the free device memory. CPU evaluation: half the last-level cache (clamped to
    :data:`CPU_BUDGET_RANGE`; :data:`DEFAULT_CPU_BUDGET` where the cache size is unknown); CPU
    training (``training=True``, gradients on): :data:`DEFAULT_CPU_TRAIN_BUDGET`. Never more
    than a quarter of the free RAM. On the CPU the evaluation budget is a speed setting more than
    a memory limit: blocks that fit in cache avoid streaming the ``[n, c, L, d]`` intermediates
    through RAM.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    if training:
        budget = DEFAULT_CPU_TRAIN_BUDGET
    else:
        cache, (low, high) = last_level_cache_bytes(), CPU_BUDGET_RANGE
        budget = DEFAULT_CPU_BUDGET if cache is None else min(high, max(low, cache // 2))
    try:
        free_ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(min(budget, free_ram // 4))
    except (ValueError, OSError, AttributeError):
        return budget


#: GEMM rows and columns of a block come in multiples of this where the budget allows. The
#: block GEMM ``[bi·R, d] × [d, bc·L]`` ran at 99–122 GFLOP/s with an odd or 4-aligned column
#: count and 130–187 with a multiple of 8 (MKL, 2 threads, d = 1024; benchmarks/pairwise_engine.py).
GEMM_ALIGN = 8


def aligned_count(count: int, set_length: int | None, limit: int) -> int:
    """``count`` items (each ``set_length`` rows of a GEMM operand), rounded down so that
    ``count * set_length`` is a multiple of :data:`GEMM_ALIGN`; left as it is when rounding would
    leave no item or when ``count`` already reaches ``limit`` (the last, partial block)."""
    if set_length is None or count >= limit:
        return count
    step = GEMM_ALIGN // math.gcd(max(1, set_length), GEMM_ALIGN)
    return count - count % step if count >= step else count


def block_sizes(n_img: int, n_cap: int, bytes_per_pair: int, budget: int, image_length: int | None = None,
                caption_length: int | None = None) -> tuple[int, int]:  # fmt: skip
    """Block shape ``(bi, bc)`` with ``bi * bc * bytes_per_pair <= budget`` (at least 1 x 1).

    Keeps the two sides balanced (both sides of the method's big product stay wide) and gives
    spare budget back to the image side when all captions fit in one block. With the padded set
    lengths given (regions per image, words per caption), ``bi * image_length`` and ``bc *
    caption_length`` are made multiples of :data:`GEMM_ALIGN` where possible
    (:func:`aligned_count`): the same pairs in slightly different blocks, faster GEMMs.
    """
    pairs = max(1, budget // max(1, bytes_per_pair))
    side = max(1, int(math.isqrt(pairs)))
    bi = aligned_count(min(n_img, side), image_length, n_img)
    bc = aligned_count(min(n_cap, max(1, pairs // max(1, bi))), caption_length, n_cap)
    if bc == n_cap:  # spare budget goes back to the image side
        bi = aligned_count(min(n_img, max(1, pairs // max(1, bc))), image_length, n_img)
    return bi, bc


@dataclass(frozen=True)
class Block:
    """One tile of the result: images ``img_start:img_stop`` x sorted captions ``cap_start:cap_stop``."""

    img_start: int
    img_stop: int
    cap_start: int
    cap_stop: int
    bytes_per_pair: int

    @property
    def pairs(self) -> int:
        return (self.img_stop - self.img_start) * (self.cap_stop - self.cap_start)

    @property
    def workspace_bytes(self) -> int:
        return self.pairs * self.bytes_per_pair


def _shape_proxy(encoded: Encoded, steps: int | None, dtype: torch.dtype | None) -> Encoded:
    """Shape-only stand-in (``meta`` tensors, no memory) of ``encoded`` trimmed to ``steps``
    positions and cast to ``dtype``, for asking a model its per-pair workspace."""

    def meta(t: Tensor, trim: bool) -> Tensor:
        shape = list(t.shape)
        if trim and steps is not None and t.dim() >= 3:
            shape[1] = min(shape[1], steps)
        cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        return torch.empty(shape, dtype=cast, device="meta")

    full = encoded.feats.shape[1] if encoded.feats.dim() >= 3 else None
    lengths = encoded.lengths
    if lengths is not None and steps is not None:
        lengths = lengths.clamp(max=steps)
    extras = {k: meta(v, v.dim() >= 3 and v.shape[1] == full) for k, v in encoded.extras.items()}
    return Encoded(meta(encoded.feats, True), lengths, extras)


def plan_blocks(
    model: "MatchingModel",
    images: Encoded,
    captions: Encoded,
    budget: int,
    compute_dtype: torch.dtype | None = None,
    caption_lengths: Tensor | None = None,
) -> list[Block]:
    """Tiles covering ``[n_img, n_cap]`` with ``block.workspace_bytes <= budget`` (or 1 x 1 pair).

    ``caption_lengths`` (sorted descending, the order the blocks index) lets each caption block
    be sized for its own longest caption; without it every block is sized for the longest one.
    The image block size is fixed by the longest caption (balanced split, :func:`block_sizes`).
    """
    n_img, n_cap = len(images), len(captions)
    if n_img == 0 or n_cap == 0:
        return []
    image_proxy = _shape_proxy(images, None, compute_dtype)

    def per_pair(steps: int | None) -> int:
        return max(1, int(model.pair_workspace_bytes(image_proxy, _shape_proxy(captions, steps, compute_dtype))))

    longest = None if caption_lengths is None else int(caption_lengths[0])
    image_length = images.feats.shape[1] if images.feats.dim() >= 3 else None
    caption_length = longest if longest is not None else (captions.feats.shape[1] if captions.feats.dim() >= 3 else None)
    bi, bc_fixed = block_sizes(n_img, n_cap, per_pair(longest), budget, image_length, caption_length)
    blocks: list[Block] = []
    start = 0
    while start < n_cap:
        if caption_lengths is None:
            cost, bc = per_pair(None), bc_fixed
        else:
            steps = int(caption_lengths[start])  # the block is trimmed to its first (longest) caption
            cost = per_pair(steps)
            bc = aligned_count(max(1, budget // (bi * cost)), steps, n_cap - start)
        stop = min(n_cap, start + bc)
        blocks.extend(Block(i, min(i + bi, n_img), start, stop, cost) for i in range(0, n_img, bi))
        start = stop
    return blocks


def _allocate(out, shape: tuple[int, int]):
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if isinstance(out, (str, Path)):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    if tuple(out.shape) != shape:
        raise ValueError(f"pairwise_similarity: out: expected shape {shape}, found {tuple(out.shape)}")
    return out


def _tensor_bytes(encoded: Encoded) -> int:
    tensors = [encoded.feats, *encoded.extras.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def pairwise_similarity(
    model: "MatchingModel",
    images: Encoded,
    captions: Encoded,
    *,
    memory_budget: int | None = None,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
    out: Tensor | np.ndarray | str | Path | None = None,
    progress: bool = False,
    desc: str = "similarity",
    sort_captions: bool = True,
) -> Tensor | np.ndarray:
    """``[n_img, n_cap]`` scores of every image against every caption via ``model.score_block``.

    Args:
        model: a pairwise :class:`MatchingModel`.
        images: encoded region sets ``[n_img, R, d]``; captions: word sets ``[n_cap, L, d]``
            (any device; blocks are moved to ``device``).
        memory_budget: bytes of block workspace; ``None``: :func:`default_memory_budget` (for
            training when gradients are enabled).
        device: where blocks are scored; default: the device of ``images.feats``.
        compute_dtype: ``torch.float16`` / ``torch.bfloat16`` to feed blocks in reduced
            precision (CUDA only; methods accumulate in fp32; results are stored in fp32).
            ``None``: the inputs' dtype.
        out: preallocated ``[n_img, n_cap]`` tensor/array (float32, or float64 to store the
            scores as the references do), or a path for a memory-mapped float32 ``.npy`` result.
            ``None`` allocates a float32 tensor.
        progress: show a tqdm bar (pairs scored).
        sort_captions: block captions by length (results are the same, faster).

    Returns:
        The filled result. With gradients enabled and ``out=None`` (training) the blocks are
        assembled into one differentiable tensor.
    """
    n_img, n_cap = len(images), len(captions)
    device = torch.device(device) if device is not None else images.feats.device
    if compute_dtype is not None and compute_dtype != torch.float32 and device.type != "cuda":
        raise ValueError(
            f"pairwise_similarity compute_dtype: expected float32 or None on {device.type} "
            f"(reduced precision is a CUDA option), found {compute_dtype}"
        )

    if sort_captions and captions.lengths is not None:
        order = torch.argsort(captions.lengths.cpu(), descending=True, stable=True)
        sorted_lengths = captions.lengths.cpu()[order]
    else:
        order, sorted_lengths = None, None

    budget = memory_budget if memory_budget is not None else default_memory_budget(device, torch.is_grad_enabled())
    blocks = plan_blocks(model, images, captions, budget, compute_dtype, sorted_lengths)

    def caption_block(start: int, stop: int) -> Encoded:
        part = captions.slice(start, stop) if order is None else captions.select(order[start:stop])
        return part.to(device, compute_dtype)

    if torch.is_grad_enabled() and out is None:
        return _differentiable(model, images, blocks, caption_block, order, device, compute_dtype, n_img)

    result = _allocate(out, (n_img, n_cap))
    if n_img == 0 or n_cap == 0:
        return result
    # images go to the device once when they are small next to the budget, else per block
    images_on_device = images if _tensor_bytes(images) > budget else images.to(device, compute_dtype)
    current = None
    with tqdm(total=n_img * n_cap, desc=desc, disable=not progress, unit="pair", unit_scale=True) as bar:
        for block in blocks:
            if current is None or current[0] != (block.cap_start, block.cap_stop):
                # a caption block is gathered and moved once, then reused for every image block
                current = ((block.cap_start, block.cap_stop), caption_block(block.cap_start, block.cap_stop))
            img_block = images_on_device.slice(block.img_start, block.img_stop).to(device, compute_dtype)
            scores = model.score_block(img_block, current[1]).detach().float()
            rows = slice(block.img_start, block.img_stop)
            cols = slice(block.cap_start, block.cap_stop) if order is None else order[block.cap_start : block.cap_stop]
            if isinstance(result, np.ndarray):
                result[rows, cols if isinstance(cols, slice) else cols.numpy()] = scores.cpu().numpy()
            else:
                # an index put needs equal dtypes: a float64 out takes the float32 scores exactly
                result[rows, cols] = scores.to(result.device, result.dtype)
            bar.update(block.pairs)
    if isinstance(result, np.memmap):
        result.flush()
    return result


def _differentiable(model, images, blocks, caption_block, order, device, compute_dtype, n_img) -> Tensor:
    """Training: score every block with the graph kept and assemble them (no in-place writes)."""
    if not blocks:
        return torch.zeros(n_img, 0 if order is None else len(order), device=device)
    columns: list[Tensor] = []
    cap_ranges = sorted({(b.cap_start, b.cap_stop) for b in blocks})
    for cap_start, cap_stop in cap_ranges:
        caps = caption_block(cap_start, cap_stop)
        rows = [
            model.score_block(images.slice(b.img_start, b.img_stop).to(device, compute_dtype), caps).float()
            for b in blocks
            if (b.cap_start, b.cap_stop) == (cap_start, cap_stop)
        ]
        columns.append(torch.cat(rows, 0))
    full = torch.cat(columns, 1)
    return _unsort(full, order)


def _unsort(block: Tensor, order: Tensor | None) -> Tensor:
    if order is None:
        return block
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return block[:, inverse.to(block.device)]
