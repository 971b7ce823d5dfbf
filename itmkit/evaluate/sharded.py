"""Evaluation spread over processes (``torch.distributed``, launched by ``torchrun``).

Each of the ``W`` processes (ranks) scores its own contiguous block of image rows of the
``[n_img, n_cap]`` similarity matrix straight into one shared memory-mapped ``.npy`` file: a COCO
5K × 25K matrix of a pairwise method (SCAN, SGRAF, CHAN, ESL, ...) is scored by ``W`` GPUs, each
with the engine's memory-bounded blocks, and no process ever holds the whole matrix.

Every rank encodes the whole split itself. Encoding is linear in the split (seconds to minutes)
while pairwise scoring is quadratic (hours at COCO scale on one GPU), and padded region/word sets
of uneven length would have to be padded again to cross ranks, so re-encoding is the cheaper and
simpler side. For embedding methods the rows are one matrix product per rank.

The file is written under a temporary name and renamed by rank 0 once every rank has flushed its
rows, so a crash never leaves a half-filled ``sims.npy`` that looks finished. Without an
initialised process group (or with one process) this is the ordinary one-process evaluation.

    torchrun --nproc_per_node 4 -m itmkit eval runs/scan/model_best.pt --data data/coco_precomp --split testall
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.distributed as dist

from itmkit.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit
import itmkit.distributed as distributed
from itmkit.distributed import contiguous_share
from itmkit.evaluate.evaluator import encode_split, similarity_matrix
from itmkit.evaluate.collapse import check_not_collapsed
from itmkit.evaluate.protocols import check_protocol_size, default_protocols, evaluate_protocols
from itmkit.evaluate.result import EvalResult
from itmkit.models.base import MatchingModel


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    return distributed.rank(), distributed.world_size()


def row_range(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` rank ``rank`` of ``world`` scores: sizes differ by at
    most one, the first ``n_rows % world`` ranks take the extra row; a rank may get none."""
    return contiguous_share(n_rows, rank, world)


def sharded_similarity(model: MatchingModel, images, captions, out: str | Path, progress: bool = False,
                       device=None) -> np.ndarray:  # fmt: skip
    """Score ``images [n_img, ...]`` against ``captions [n_cap, ...]`` into the ``.npy`` file
    ``out`` (float32), each rank its :func:`row_range` block; every rank must call it with the
    same encodings and the same ``out`` (a path all ranks see). Returns the finished matrix,
    memory-mapped read-only, on every rank."""
    rank, world = rank_and_world()
    out = Path(out)
    partial = out.with_name(out.stem + ".partial.npy")
    shape = (len(images), len(captions))
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape).flush()
    distributed.barrier()  # the file exists before any rank opens it
    start, stop = row_range(shape[0], rank, world)
    if stop > start:
        matrix = np.load(partial, mmap_mode="r+")
        similarity_matrix(model, images.slice(start, stop) if images.lengths is not None else _rows(images, start, stop),
                          captions, out=matrix[start:stop], progress=progress and rank == 0, device=device)  # fmt: skip
        matrix.flush()
        del matrix
    distributed.barrier()  # every block is on disk
    if rank == 0:
        partial.replace(out)
    distributed.barrier()
    return np.load(out, mmap_mode="r")


def _rows(encoded, start: int, stop: int):
    """Rows of pooled ``[n, d]`` encodings (``Encoded.slice`` trims set axes, which these lack)."""
    from itmkit.encoded import Encoded

    return Encoded(encoded.feats[start:stop], None, {k: v[start:stop] for k, v in encoded.extras.items()})


def evaluate_sharded(model: MatchingModel, data_dir: str | Path, split: str, pipeline, out_dir: str | Path,
                     protocol=None, batch_size: int = 256, device=None, progress: bool = True) -> EvalResult:  # fmt: skip
    """:func:`~itmkit.evaluate.evaluator.evaluate_model` over the ranks of the process group:
    every rank encodes ``split``, scores its rows into ``<out_dir>/sims.npy``; rank 0 writes
    ``metrics.csv`` / ``metrics.json``. Every rank returns the same :class:`EvalResult`."""
    rank, _ = rank_and_world()
    opened = PrecompSplit.open(data_dir, split)
    protocols = default_protocols(opened.split, opened.n_images) if protocol is None else protocol
    for name in [protocols] if isinstance(protocols, str) else protocols:
        check_protocol_size(name, opened.n_images, opened.n_captions, CAPTIONS_PER_IMAGE)
    images, captions = encode_split(model, opened, pipeline, batch_size, device, progress and rank == 0)
    out = Path(out_dir)
    sims = sharded_similarity(model, images, captions, out / "sims.npy", progress=progress, device=device)
    source = f"scores of {type(model).__name__} on {Path(opened.root) / opened.split}"
    check_not_collapsed(sims, source)  # a broken model must not look good here either
    metrics = evaluate_protocols(sims, protocols, CAPTIONS_PER_IMAGE, source)
    info = {"split": opened.split, "data_dir": str(opened.root), "n_images": opened.n_images,
            "n_captions": opened.n_captions, "method": type(model).__name__, "ranks": rank_and_world()[1]}  # fmt: skip
    result = EvalResult(sims=sims, metrics=metrics, info=info)
    if rank == 0:
        result.save(out, save_sims=False)
    distributed.barrier()
    return result


class process_group_from_env:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1):
    ``nccl`` on CUDA (each rank on GPU ``LOCAL_RANK``), ``gloo`` on the CPU; leave it on exit.
    With ``WORLD_SIZE`` unset or 1 it does nothing. ``device`` is the device this rank scores on."""

    def __init__(self, device: str | None = None) -> None:
        import os

        import torch

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.device = device
        if self.world > 1 and (device in (None, "auto", "cuda")) and torch.cuda.is_available():
            self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.backend = "nccl" if self.device and str(self.device).startswith("cuda") else "gloo"
        self.joined = False

    def __enter__(self) -> "process_group_from_env":
        if self.world > 1 and not dist.is_initialized():
            # the collective timeout is ITMKIT_DIST_TIMEOUT_S (2 h by default): rank 0 validates
            # and tests alone while the others wait, and a COCO evaluation must not trip it
            distributed.init_from_env("cuda" if self.backend == "nccl" else "cpu")
            self.joined = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.joined:
            distributed.leave_process_group(clean=exc_type is None)
