"""``torchrun -m itmkit train`` from Python: what notebook 12 and the tests launch.

The command is torchrun's own (``python -m torch.distributed.run``), on this machine's loopback
address and a free port, so several local processes train one run without a launcher of ours.
On a GPU machine each process takes GPU ``LOCAL_RANK``; on the CPU they use gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TorchrunError(RuntimeError):
    """A torchrun launch failed; the message ends with the last lines the processes printed."""


def free_port() -> int:
    """A TCP port nothing listens on now (torchrun's ``--master_port 0`` may hand the workers 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_train_command(method: str, preset: str, out_dir: str | Path, *, nproc: int = 2, device: str = "cpu",
                           overrides: Mapping[str, Any] | None = None, max_steps: int | None = None,
                           data_dir: str | Path | None = None, port: int | None = None,
                           fresh: bool = False) -> list[str]:  # fmt: skip
    """The argument list of ``torchrun --nproc_per_node nproc -m itmkit train ...`` (one node);
    ``fresh`` adds ``--no-resume`` (start over in ``out_dir``)."""
    if nproc < 1:
        raise ValueError(f"torchrun_train: nproc must be >= 1, found {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
               "-m", "itmkit", "train", "--method", method, "--preset", preset, "--device", device,
               "--out", str(out_dir), "--quiet"]  # fmt: skip
    for key, value in (overrides or {}).items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).lower() if isinstance(value, bool) else str(value)
        command += ["--set", f"{key}={text}"]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    if data_dir is not None:
        command += ["--data", str(data_dir)]
    if fresh:
        command.append("--no-resume")
    return command


def torchrun_train(method: str, preset: str, out_dir: str | Path, *, nproc: int = 2, device: str = "cpu",
                   overrides: Mapping[str, Any] | None = None, max_steps: int | None = None,
                   data_dir: str | Path | None = None, threads_per_process: int = 1, fresh: bool = False,
                   timeout_s: float = 3600) -> subprocess.CompletedProcess:  # fmt: skip
    """Train ``method``/``preset`` into ``out_dir`` with ``nproc`` local processes (DDP).

    ``fresh`` starts over in ``out_dir`` (``--no-resume``); otherwise a finished run there is
    returned as it is and an unfinished one resumed. Each process gets ``threads_per_process`` CPU threads (two processes on a 2-core machine
    would otherwise fight over the cores). A non-zero exit or a run past ``timeout_s`` raises
    :class:`TorchrunError` with the processes' last output; the run folder keeps what was written
    (rerunning the call resumes it).
    """
    command = torchrun_train_command(method, preset, out_dir, nproc=nproc, device=device, overrides=overrides,
                                     max_steps=max_steps, data_dir=data_dir, fresh=fresh)  # fmt: skip
    threads = str(threads_per_process)
    # a process killed by a signal (a segfault, an abort in native code) prints its Python stack
    # to stderr, which the error below quotes
    env = dict(os.environ, OMP_NUM_THREADS=threads, ITMKIT_THREADS=threads, PYTHONFAULTHANDLER="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-3000:]
        raise TorchrunError(f"torchrun {method} into {out_dir}: no result after {timeout_s:.0f} s; last output:\n"
                            f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}") from None  # fmt: skip
    if done.returncode != 0:
        # itmkit's own one-line errors first (every rank prints it); torchrun's report follows
        errors = dict.fromkeys(line for line in done.stderr.splitlines() if line.startswith("itmkit "))
        said = "\n".join(errors) + "\n" if errors else ""
        raise TorchrunError(f"torchrun {method} into {out_dir} exited with {done.returncode}: {said}last output:\n"
                            f"{done.stderr[-3000:]}")  # fmt: skip
    return done
