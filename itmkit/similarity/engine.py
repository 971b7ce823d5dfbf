"""The pairwise similarity engine: a whole ``[n_img, n_cap]`` matrix from block scores.

Methods whose score does not factorise (SCAN, SGRAF, CHAN, ESL, ...) supply
``score_block(images, captions) -> [bi, bc]`` over a block of images and a block of captions
(an :class:`~itmkit.encoded.Encoded` each, padded, with lengths). The engine

- sizes blocks so that ``bi * bc * pair_workspace_bytes`` stays under a memory budget
  (``memory_budget`` bytes; default: a share of free device memory, or of RAM on the CPU),
- trims each caption block to its longest caption (fewer padded words, same scores),
- moves blocks to the device (optionally in fp16/bf16 on CUDA; off by default),
- writes into a preallocated result: a tensor, or a memory-mapped ``.npy`` file when ``out``
  is a path, so a COCO 5K x 25K matrix never sits in RAM twice,
- shows progress with tqdm.

Captions are sorted by length before blocking so each block carries little padding; results
are written back in the original order. Used in training (the ``[B, B]`` batch matrix for the
hinge loss, one block, gradients flow) and evaluation (no grad).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from itmkit.encoded import Encoded

if TYPE_CHECKING:
    from itmkit.models.base import MatchingModel

DEFAULT_CPU_BUDGET = 1 << 30  # 1 GiB of block workspace on the CPU


def default_memory_budget(device: torch.device) -> int:
    """Bytes of block workspace: half the free CUDA memory, else min(1 GiB, a quarter of free RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        free_ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(min(DEFAULT_CPU_BUDGET, free_ram // 4))
    except (ValueError, OSError, AttributeError):
        return DEFAULT_CPU_BUDGET


def block_sizes(n_img: int, n_cap: int, bytes_per_pair: int, budget: int) -> tuple[int, int]:
    """Block shape ``(bi, bc)`` with ``bi * bc * bytes_per_pair <= budget`` (at least 1 x 1).

    Prefers wide caption blocks (all images of a block share one big product) and keeps the
    two sides balanced so neither degenerates to a single row.
    """
    pairs = max(1, budget // max(1, bytes_per_pair))
    side = max(1, int(math.isqrt(pairs)))
    bi = min(n_img, side)
    bc = min(n_cap, max(1, pairs // max(1, bi)))
    if bc == n_cap:  # spare budget goes back to the image side
        bi = min(n_img, max(1, pairs // max(1, bc)))
    return bi, bc


def _allocate(out, shape: tuple[int, int]):
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if isinstance(out, (str, Path)):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    if tuple(out.shape) != shape:
        raise ValueError(f"pairwise_similarity: out has shape {tuple(out.shape)}, expected {shape}")
    return out


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
        images, captions: encoded sets (any device; blocks are moved to ``device``).
        memory_budget: bytes of block workspace; ``None`` derives it from free memory.
        device: where blocks are scored; default: the device of ``images.feats``.
        compute_dtype: ``torch.float16`` / ``torch.bfloat16`` to score blocks in reduced
            precision (CUDA only; results are stored in fp32). ``None``: the inputs' dtype.
        out: preallocated ``[n_img, n_cap]`` tensor/array, or a path for a memory-mapped
            ``.npy`` result. ``None`` allocates a tensor.
        progress: show a tqdm bar over blocks.

    Returns:
        The filled result. With gradients enabled and a single block (training), the
        differentiable block output itself is returned.
    """
    n_img, n_cap = len(images), len(captions)
    device = torch.device(device) if device is not None else images.feats.device
    if compute_dtype is not None and compute_dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"compute_dtype={compute_dtype} is a CUDA option; on {device.type} use float32")

    if sort_captions and captions.lengths is not None:
        order = torch.argsort(captions.lengths.cpu(), descending=True, stable=True)
        sorted_caps = captions.select(order.to(captions.feats.device))
    else:
        order, sorted_caps = None, captions

    budget = memory_budget if memory_budget is not None else default_memory_budget(device)
    per_pair = model.pair_workspace_bytes(images, sorted_caps)
    if compute_dtype is not None:
        per_pair = per_pair * torch.empty((), dtype=compute_dtype).element_size() // 4
    bi, bc = block_sizes(n_img, n_cap, per_pair, budget)

    if torch.is_grad_enabled() and bi >= n_img and bc >= n_cap and out is None:
        # training: one block, keep the graph
        block = model.score_block(images.to(device, compute_dtype), sorted_caps.to(device, compute_dtype))
        return _unsort(block.float(), order)

    result = _allocate(out, (n_img, n_cap))
    blocks = [(i, c) for c in range(0, n_cap, bc) for i in range(0, n_img, bi)]
    cap_block = None
    for i, c in tqdm(blocks, desc=desc, disable=not progress, unit="block"):
        if cap_block is None or cap_block[0] != c:
            # caption block moved once and reused for every image block
            cap_block = (c, sorted_caps.slice(c, min(c + bc, n_cap)).to(device, compute_dtype))
        img_block = images.slice(i, min(i + bi, n_img)).to(device, compute_dtype)
        scores = model.score_block(img_block, cap_block[1]).float()
        cols = slice(c, min(c + bc, n_cap))
        if order is not None:
            cols = order[c : min(c + bc, n_cap)]
        if isinstance(result, np.ndarray):
            result[i : i + scores.shape[0], cols.numpy() if isinstance(cols, Tensor) else cols] = scores.detach().cpu().numpy()
        else:
            result[i : i + scores.shape[0], cols] = scores.detach().to(result.device)
    if isinstance(result, np.memmap):
        result.flush()
    return result


def _unsort(block: Tensor, order: Tensor | None) -> Tensor:
    if order is None:
        return block
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return block[:, inverse.to(block.device)]
