"""Seeds, devices and CPU threads: what every run sets first."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Same seed, same machine -> same numbers."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available, else mps, else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
    ``"mps"`` name one. A device this torch build or machine does not have raises ``ValueError``
    saying so and what to use instead (torch itself would fail later, deep in a run)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"device {name!r}: this torch ({torch.__version__}) was built without CUDA; "
                             "use device cpu (or auto), or install a CUDA build of torch")  # fmt: skip
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"device {name!r}: expected one of the {count} CUDA GPU(s) this machine shows; "
                             "use device cpu (or auto)")  # fmt: skip
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use device cpu (or auto)")
    return device


# --- CPU threads -----------------------------------------------------------------------------
THREADS_ENV = "ITMKIT_THREADS"
# What child processes (papermill kernels) read for their thread pools at start-up: torch's and
# OpenMP's, Intel MKL's and OpenBLAS's (NumPy).
THREAD_POOL_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota where one is set
    (containers and JupyterHub servers limit CPUs that way while showing every host core)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(count, quota) if quota is not None else count)


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """CPUs allowed by the cgroup quota, rounded up (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_*``);
    ``None`` when there is no quota or no cgroup file."""
    root = Path(root)
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        v1 = root / "cpu" if (root / "cpu").is_dir() else root
        if (v1 / "cpu.cfs_quota_us").is_file():
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        return None
    return None


def thread_count(threads: int | str | None = None) -> int:
    """The thread count to use: ``threads`` if given, else ``$ITMKIT_THREADS``, else
    :func:`available_cpus`. A value that is not a positive integer raises ``ValueError`` naming
    where it came from."""
    source = "threads"
    if threads is None:
        threads = os.environ.get(THREADS_ENV, "").strip() or None
        source = f"environment variable {THREADS_ENV}"
    if threads is None:
        return available_cpus()
    text = str(threads).strip()
    if isinstance(threads, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{source}: expected a positive integer (CPU threads), found {threads!r}; "
                         f"e.g. {THREADS_ENV}=1 where many people share the cores")  # fmt: skip
    return int(text)


def configure_threads(threads: int | str | None = None) -> int:
    """Set torch's CPU thread count (see :func:`thread_count`) and return it.

    One setting for the CLI (``--threads``), the notebooks and the course runner: on a machine
    shared by many jobs, torch's default of one thread per core oversubscribes the cores and
    every job slows down far more than its share (measured 10-20x on a busy 2-core CPU for 2
    threads against 1); ``ITMKIT_THREADS=1`` avoids that.
    """
    count = thread_count(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def thread_environment(threads: int) -> dict[str, str]:
    """The environment variables that give a child process (a papermill kernel) ``threads``
    threads from its first line: ``ITMKIT_THREADS`` and the thread-pool variables."""
    return {THREADS_ENV: str(threads), **{name: str(threads) for name in THREAD_POOL_ENVS}}


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set ``os.environ`` entries for the duration of a ``with`` block (children started inside
    inherit them), then restore the previous values."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def rng_state() -> dict:
    """Every RNG state a run depends on, for exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
