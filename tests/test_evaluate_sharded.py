"""Evaluation over 2 gloo processes on the CPU writes the matrix one process writes (issue 13 §2)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from itmkit.config import replace_nested
from itmkit.methods.registry import get_method


def test_row_range_by_hand():
    from itmkit.evaluate.sharded import row_range

    assert [row_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [row_range(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]  # more ranks than rows
    assert row_range(5, 0, 1) == (0, 5)
    with pytest.raises(ValueError, match="expected 0 <= rank < world"):
        row_range(5, 2, 2)


def _encoded(method: str, n_img: int = 7):
    torch.manual_seed(0)
    cfg = replace_nested(get_method(method).preset("smoke"), {"model.img_dim": 12})
    model = get_method(method).build(cfg, 30).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        images = model.encode_images(torch.randn(n_img, 5, 12, generator=g), torch.full((n_img,), 5))
        captions = model.encode_captions(torch.randint(4, 30, (5 * n_img, 6), generator=g),
                                         torch.randint(3, 7, (5 * n_img,), generator=g))
    return model, images, captions


def _worker(rank: int, world: int, init: str, method: str, out: str) -> None:
    import torch.distributed as dist

    from itmkit.evaluate.sharded import sharded_similarity

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, images, captions = _encoded(method)
        sharded_similarity(model, images, captions, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["vse_infty", "scan"])  # an embedding method and a pairwise one
def test_two_processes_write_the_one_process_matrix(tmp_path, method):
    from itmkit.evaluate.evaluator import similarity_matrix

    out = tmp_path / "sims.npy"
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", method, str(out)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    model, images, captions = _encoded(method)
    expected = similarity_matrix(model, images, captions, progress=False)
    shared = np.load(out)
    assert shared.shape == (7, 35)
    np.testing.assert_allclose(shared, expected, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "sims.partial.npy").exists()  # renamed once every rank had written


@pytest.mark.slow
def test_itmkit_eval_under_torchrun_matches_one_process(tmp_path):
    from itmkit.train.trainer import train

    run = tmp_path / "run"
    train(replace_nested(get_method("scan").preset("smoke"), {"train.epochs": 1}), run, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", ITMKIT_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "itmkit", "eval", str(run), "--out", str(tmp_path / "one"), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as probe:  # a free port: with --master_port 0 the workers may be told port 0 itself
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(port), "-m", "itmkit", "eval", str(run), "--out", str(tmp_path / "two"),
                          "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600)  # a hang fails the test, never blocks the suite  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 processes)" in two.stdout
    np.testing.assert_allclose(np.load(tmp_path / "two" / "sims.npy"), np.load(tmp_path / "one" / "sims.npy"), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two" / "metrics.json").read_text().count("rsum") >= 1
