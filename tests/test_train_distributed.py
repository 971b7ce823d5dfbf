"""DDP training on the CPU: two gloo processes against one process (issue 13 §1, §3).

- an embedding method (VSE∞) gathers its encodings: one 2-process step over a global batch of
  16 equals one 1-process step over the same 16 pairs;
- a pairwise method (SCAN) scores each rank's share: a 2-process step equals one process with
  ``accumulate_steps=2`` (the same micro-batches, gradients added);
- a 2-process run stopped mid-epoch (``max_steps``), or with one rank killed by SIGKILL mid-epoch,
  and resumed ends with the same weights and test numbers as an uninterrupted 2-process run under
  ``torchrun -m itmkit train``, and one process may not resume it.
"""

import json
import os
import signal

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from itmkit import distributed
from itmkit.config import replace_nested
from itmkit.methods.registry import get_method
from itmkit.train.checkpoint import weight_difference
from itmkit.train.launch import TorchrunError, free_port, torchrun_train
from itmkit.train.trainer import train

pytestmark = pytest.mark.slow


def _config(method: str, **overrides):
    base = {"train.epochs": 2, "train.batch_size": 16, "train.device": "cpu", "train.log_every_steps": 1}
    return replace_nested(get_method(method).preset("smoke"), {**base, **overrides})


def _worker(rank: int, world: int, port: int, cfg, out: str, max_steps, kill_rank_at) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", ITMKIT_DIST_TIMEOUT_S="120")  # fmt: skip
    torch.set_num_threads(1)

    def on_step(state) -> None:  # a real SIGKILL of one rank, after its step's checkpoint was written
        if kill_rank_at is not None and rank == kill_rank_at[0] and state.global_step == kill_rank_at[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    with distributed.init_from_env("cpu"):
        train(cfg, out, progress=False, max_steps=max_steps, on_step=on_step)


def _spawn(cfg, out, max_steps=None, world=2, kill_rank_at=None) -> None:
    mp.spawn(_worker, args=(world, free_port(), cfg, str(out), max_steps, kill_rank_at), nprocs=world, join=True)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# Adam's first step moves every weight by about lr whatever its gradient's size, so a weight
# whose gradient is float noise around 0 (a feature that is 0 in most of the batch) moves by a
# noise-dependent part of lr: the tolerance is 5 % of the smoke lr (5e-4), 100x below a real
# difference of batches (asserted beside it).
STEP_TOLERANCE = 2.5e-5


def _assert_same_weights(a, b, atol=STEP_TOLERANCE):
    assert weight_difference(a, b) <= atol


def test_ddp_step_of_an_embedding_method_equals_one_process_over_the_global_batch(tmp_path):
    torch.set_num_threads(1)
    # without the MLP's BatchNorm, whose statistics are each rank's own (SyncBatchNorm is CUDA-only)
    # hardest negatives from the first step: the one-process hardest negative of a caption may be
    # another rank's image
    cfg = _config("vse_infty", **{"model.mlp_residual": False, "train.max_violation": True})
    _spawn(cfg, tmp_path / "two", max_steps=1)
    train(cfg, tmp_path / "one", progress=False, max_steps=1)
    two, one = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False), \
        torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)  # fmt: skip
    assert two["world_size"] == 2 and len(two["rng_by_rank"]) == 2
    _assert_same_weights(two["model"], one["model"])
    # the logged loss is the global batch's, the same number one process logs
    assert two["state"]["step_log"][0]["loss"] == pytest.approx(one["state"]["step_log"][0]["loss"], rel=1e-5)
    assert one["state"]["global_step"] == two["state"]["global_step"] == 1
    # the comparison is not between two models a step could not tell apart: the first step's
    # batch split in halves (hardest negatives per half) gives other weights
    train(replace_nested(cfg, {"train.accumulate_steps": 2}), tmp_path / "halves", progress=False, max_steps=1)
    halves = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=False)
    assert weight_difference(one["model"], halves["model"]) > 20 * STEP_TOLERANCE


def test_ddp_step_of_a_pairwise_method_equals_one_process_accumulating_two_micro_batches(tmp_path):
    torch.set_num_threads(1)
    _spawn(_config("scan"), tmp_path / "two", max_steps=1)
    train(_config("scan", **{"train.accumulate_steps": 2}), tmp_path / "acc", progress=False, max_steps=1)
    train(_config("scan"), tmp_path / "whole", progress=False, max_steps=1)
    two, acc, whole = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=False) for name in ("two", "acc", "whole"))
    _assert_same_weights(two["model"], acc["model"])
    assert two["state"]["step_log"][0]["loss"] == pytest.approx(acc["state"]["step_log"][0]["loss"], rel=1e-5)
    # hardest negatives within each half differ from those of the whole batch: another step
    assert weight_difference(acc["model"], whole["model"]) > 20 * STEP_TOLERANCE


def test_ddp_run_stopped_mid_epoch_resumes_to_the_torchrun_run(tmp_path):
    cfg = _config("vse_infty")
    torchrun = torchrun_train("vse_infty", "smoke", tmp_path / "torchrun", nproc=2, device="cpu", timeout_s=600,
                              overrides={"train.epochs": 2, "train.batch_size": 16, "train.log_every_steps": 1})  # fmt: skip
    assert torchrun.stdout.count("best dev rsum") == 1  # rank 0 alone reports
    result = json.loads((tmp_path / "torchrun" / "result.json").read_text())
    assert result["world_size"] == 2

    stopped = tmp_path / "stopped"
    _spawn(cfg, stopped, max_steps=2)  # mid-epoch 1 (the tiny set: 240 captions, 15 steps per epoch at 16)
    state = torch.load(stopped / "checkpoint.pt", weights_only=False)["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    with pytest.raises(ValueError, match="world_size: this run was trained by 2 process"):
        train(cfg, stopped, progress=False)  # one process may not continue a 2-process run
    _spawn(cfg, stopped)
    _assert_same_weights(_weights(stopped / "model_best.pt"), _weights(tmp_path / "torchrun" / "model_best.pt"), atol=0)
    pd.testing.assert_frame_equal(pd.read_csv(stopped / "test_metrics.csv"), pd.read_csv(tmp_path / "torchrun" / "test_metrics.csv"))
    logs = [pd.read_csv(p / "log.csv").drop(columns=["epoch_seconds", "seconds"]) for p in (stopped, tmp_path / "torchrun")]
    pd.testing.assert_frame_equal(*logs)

    # killed: rank 1 dies by SIGKILL mid-epoch 1 (step 5 of 15, checkpoints every step); the survivor
    # fails on the lost peer, and the same command resumes from the last checkpoint
    killed = tmp_path / "killed"
    every_step = replace_nested(cfg, {"train.checkpoint_every_steps": 1})
    with pytest.raises(mp.ProcessExitedException):
        _spawn(every_step, killed, kill_rank_at=(1, 5))
    state = torch.load(killed / "checkpoint.pt", weights_only=False)["state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 5, 5)
    assert not (killed / "result.json").exists()
    _spawn(every_step, killed)
    assert weight_difference(killed / "model_best.pt", tmp_path / "torchrun" / "model_best.pt") == 0.0
    pd.testing.assert_frame_equal(pd.read_csv(killed / "test_metrics.csv"), pd.read_csv(tmp_path / "torchrun" / "test_metrics.csv"))


def test_a_failed_torchrun_launch_says_what_the_processes_printed(tmp_path):
    with pytest.raises(TorchrunError, match=r"exited with .*no field 'nope'"):
        torchrun_train("vse_infty", "smoke", tmp_path / "bad", overrides={"train.nope": 1}, timeout_s=300)


def test_a_method_with_its_own_loss_and_a_transformer_text_encoder_trains_under_ddp(tmp_path):
    """HREM supplies its own loss (relations among the batch's items, scored per rank) and the
    offline MiniLM leaves its pooler unused: DDP must find the unused parameters, not hang."""
    cfg = _config("hrem", **{"text.kind": "hf", "train.log_every_steps": 1})
    _spawn(cfg, tmp_path / "hrem", max_steps=2)
    ckpt = torch.load(tmp_path / "hrem" / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["state"]["global_step"] == 2
    losses = [row["loss"] for row in ckpt["state"]["step_log"]]
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses)
