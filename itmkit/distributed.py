"""``torch.distributed`` as ``torchrun`` sets it up: init, rank, barrier, gather with gradient, cleanup.

``torchrun --nproc_per_node N`` (multi-node: ``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint
HOST:PORT``) starts N processes with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in their environment. :func:`init_from_env` reads them and joins the process group
(``nccl`` on CUDA, ``gloo`` on the CPU); a plain ``python`` process (no ``WORLD_SIZE``) is a world of
one and every helper here is then a no-op, so library code calls them unconditionally.

Hardest negatives over the global batch (issue 13 §1): :func:`all_gather_with_grad` concatenates
every rank's ``[b_r, ...]`` rows (sizes may differ) into ``[sum b_r, ...]`` on every rank and
sends the gradient of every rank's copy back to the rank that owns the rows (backward = sum over
ranks, then the own slice). When every rank computes the same loss on the gathered tensors, each
rank's parameter gradient is ``N`` times the single-process one and DDP's mean over ranks gives
it back exactly: N processes x B pairs train like one process x N*B pairs.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT_ENV = "ITMKIT_DIST_TIMEOUT_S"  # rank 0 evaluates alone while the others wait at a barrier
DEFAULT_TIMEOUT_S = 7200


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, and whether
    :func:`init_from_env` created the process group (then :func:`cleanup` destroys it). As a
    context manager (``with init_from_env("cpu") as ctx:``) it leaves the group on exit, in step
    with the other ranks unless an error is on its way out."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # after an error, leave without waiting: the other ranks may never reach the barrier
        cleanup(self, clean=exc_type is None)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer (torchrun sets it), found {value!r}") from None


def init_from_env(device_type: str = "cpu") -> DistContext:
    """Join the process group ``torchrun`` describes (``nccl`` for ``device_type == "cuda"``, else
    ``gloo``); a world of one without ``WORLD_SIZE``. An already initialised group is reused."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()),
                           dist.get_backend(), owns_group=False)  # fmt: skip
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # one GPU per process, before NCCL touches any
    timeout = datetime.timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank, world, local_rank, backend, owns_group=True)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def contiguous_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items: shares differ by at most
    one (the first ``n % world`` ranks take one more), concatenated in rank order they are all
    ``n`` items; with ``n < world`` some ranks get none."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"contiguous_share: expected 0 <= rank < world, found rank {rank}, world {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_rank() -> int:
    """This process's GPU index on its node (``LOCAL_RANK``; 0 in a world of one)."""
    return _env_int("LOCAL_RANK", rank()) if world_size() > 1 else 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; no-op in a world of one). Every rank must call it;
    what the other ranks pass is ignored."""
    if world_size() <= 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a world of one)."""
    if world_size() <= 1:
        return [obj]
    found: list[Any] = [None] * world_size()
    dist.all_gather_object(found, obj)
    return found


def sum_over_ranks(value: float, device: torch.device | str = "cpu") -> float:
    """``value`` summed over the ranks (itself in a world of one). NaN or Inf on any rank gives a
    non-finite sum on every rank, so every rank takes the same decision on it."""
    if world_size() <= 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if world_size() > 1:
        dist.barrier()


def leave_process_group(clean: bool = True) -> None:
    """Destroy the default process group, in step with the other ranks.

    ``clean`` (this rank got here without an error): wait for every rank first, so no rank
    tears down its connections while another is still writing or communicating, and free the
    objects that still hold the group (a DDP wrapper lives in reference cycles until a
    collection) while the interpreter is whole. Without this a rank that finished first
    sometimes died in gloo's teardown at interpreter exit ("terminate called without an active
    exception", SIGABRT), failing a run that had finished. After an error there is no wait: the
    other ranks may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean and dist.get_world_size() > 1:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def cleanup(ctx: DistContext, clean: bool = True) -> None:
    """Destroy the process group if :func:`init_from_env` created it (see :func:`leave_process_group`)."""
    if ctx.owns_group:
        leave_process_group(clean)


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows, padded to the largest count for the collective, concatenated.
    Backward: the gradients every rank computed for the gathered tensor, summed, own rows kept."""

    @staticmethod
    def forward(ctx, local: Tensor, sizes: list[int], me: int) -> Tensor:  # type: ignore[override]
        most = max(sizes)
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.me = sizes, me
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss may use every rank's rows
        start = sum(ctx.sizes[: ctx.me])
        return grad[start : start + ctx.sizes[ctx.me]], None, None


def all_gather_with_grad(local: Tensor) -> Tensor:
    """``[b_r, ...]`` on each rank -> ``[sum_r b_r, ...]`` on every rank, rank order, gradient kept
    (see the module docstring for the scaling DDP's mean undoes). World of one: ``local`` itself."""
    if world_size() <= 1:
        return local
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    return _GatherRows.apply(local, [int(c) for c in counts], rank())
