"""Threads and devices (issue 14 §4, §7): one thread setting, devices this machine lacks refused."""

import os

import pytest
import torch

from itmkit import runtime
from itmkit.runtime import (
    THREADS_ENV,
    available_cpus,
    cgroup_cpu_quota,
    configure_threads,
    environment,
    pick_device,
    thread_count,
    thread_environment,
)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_thread_count_prefers_the_argument_then_the_environment_then_the_cpus(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert thread_count() == available_cpus()
    monkeypatch.setenv(THREADS_ENV, "3")
    assert thread_count() == 3
    assert thread_count(1) == 1 and thread_count("2") == 2
    monkeypatch.setenv(THREADS_ENV, "  ")  # set but empty: as if unset
    assert thread_count() == available_cpus()


@pytest.mark.parametrize("bad", ["0", "-2", "abc", "1.5"])
def test_bad_thread_settings_name_their_source(monkeypatch, bad):
    monkeypatch.setenv(THREADS_ENV, bad)
    with pytest.raises(ValueError, match=rf"environment variable {THREADS_ENV}: expected a positive integer.*{bad!r}"):
        thread_count()
    with pytest.raises(ValueError, match=r"^threads: expected a positive integer"):
        thread_count(bad)
    with pytest.raises(ValueError, match=r"^threads: expected"):
        thread_count(True)


def test_configure_threads_sets_torch(monkeypatch, restore_threads):
    monkeypatch.setenv(THREADS_ENV, "1")
    torch.set_num_threads(2)
    assert configure_threads() == 1 and torch.get_num_threads() == 1
    assert configure_threads(2) == 2 and torch.get_num_threads() == 2


def test_available_cpus_is_the_affinity_capped_by_the_cgroup_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: None)
    assert available_cpus() == affinity
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: 1)
    assert available_cpus() == 1
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: affinity + 64)  # a quota above the mask: the mask
    assert available_cpus() == affinity


def test_cgroup_quota_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    assert cgroup_cpu_quota(v2) is None  # no file
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads
    assert cgroup_cpu_quota(v2) == 2
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_quota(v2) == 1
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path / "v1") == 4
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "v1") is None


def test_environment_block_restores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv(THREADS_ENV, raising=False)
    values = thread_environment(1)
    assert values == {THREADS_ENV: "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with environment(values):
        assert os.environ[THREADS_ENV] == "1" and os.environ["OMP_NUM_THREADS"] == "1"
    assert THREADS_ENV not in os.environ and os.environ["OMP_NUM_THREADS"] == "7"


def test_pick_device_names_what_is_missing():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match=r"device 'gpu': expected auto, cpu, cuda, cuda:N or mps"):
        pick_device("gpu")
    if torch.version.cuda is None:
        with pytest.raises(ValueError, match=r"device 'cuda': this torch .* was built without CUDA; use device cpu"):
            pick_device("cuda")
    else:
        with pytest.raises(ValueError, match=r"device 'cuda:99': expected one of the \d+ CUDA GPU"):
            pick_device("cuda:99")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device 'mps': MPS is not available"):
            pick_device("mps")
