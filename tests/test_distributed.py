"""itmkit.distributed: two gloo processes on the CPU (torch.multiprocessing spawn)."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from itmkit import distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    with distributed.init_from_env("cpu") as ctx:
        torch.manual_seed(0)
        full = torch.randn(5, 3, dtype=torch.float64)  # rank 0 owns rows 0-2, rank 1 rows 3-4 (uneven)
        mine = full[:3] if rank == 0 else full[3:]
        mine = mine.clone().requires_grad_(True)
        gathered = distributed.all_gather_with_grad(mine)
        loss = (gathered @ gathered.T).amax(dim=1).sum()  # the same loss on every rank
        loss.backward()
        torch.save({"gathered": gathered.detach(), "grad": mine.grad, "main": ctx.is_main,
                    "world": distributed.world_size()}, f"{out}/rank{rank}.pt")  # fmt: skip
        distributed.barrier()


def test_world_of_one_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    x = torch.ones(2, 3)
    assert distributed.all_gather_with_grad(x) is x
    assert not dist.is_initialized()


def test_gather_with_grad_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    full = torch.randn(5, 3, dtype=torch.float64).requires_grad_(True)
    (full @ full.T).amax(dim=1).sum().backward()  # one process, the whole batch
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["main"] and not r1["main"] and r0["world"] == 2
    torch.testing.assert_close(r0["gathered"], full.detach())
    torch.testing.assert_close(r1["gathered"], full.detach())
    # each rank's gradient is world_size x the single-process one (DDP's mean over ranks undoes it)
    torch.testing.assert_close(r0["grad"], 2 * full.grad[:3])
    torch.testing.assert_close(r1["grad"], 2 * full.grad[3:])


def _leave_worker(rank: int, world: int, port: int, out: str, clean: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    distributed.init_from_env("cpu")
    if rank == 0:
        time.sleep(1.5)  # rank 0 still writing (a checkpoint, a result) while rank 1 is done
    arrived = time.time()
    distributed.leave_process_group(clean=clean)
    assert not dist.is_initialized()
    torch.save({"arrived": arrived, "left": time.time()}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("clean", [True, False])
def test_leave_process_group_waits_for_every_rank_unless_after_an_error(tmp_path, clean):
    mp.spawn(_leave_worker, args=(2, _free_port(), str(tmp_path), clean), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["arrived"] - r1["arrived"] > 1.0  # rank 1 got there first
    if clean:  # rank 1 left only once rank 0 had arrived: nobody tears down under a working rank
        assert r1["left"] >= r0["arrived"] - 0.05
    else:  # after an error the other ranks may never arrive: no waiting
        assert r1["left"] < r0["arrived"] - 1.0
