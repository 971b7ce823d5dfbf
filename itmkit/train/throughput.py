"""Training throughput: pairs per second of real optimisation steps, against the data-loading limit.

For one run configuration, :func:`measure_throughput` times, on the same batches,

(a) **loading only**: iterating the trainer's own batches (``train_batches``: region drop, caption
    augmentation, collation, moving to the device) without touching a model — the most pairs per
    second any model could be fed this way; and
(b) **training**: the trainer's ``train_step`` (encoders, scores, loss, backward, optimiser) on
    those batches,

after ``warmup`` untimed steps (allocator, caches, lazy init). ``ratio`` = training / loading
pairs per second: near 1 the data pipeline is the limit (more loader workers help), far below 1
the model is (a bigger device helps). On CUDA the peak GPU memory of the timed steps is reported
too. The benchmark script ``benchmarks/train_throughput.py`` runs it for every method and writes
JSON (``make benchmark-train``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from itmkit.config import RunConfig
from itmkit.data.loaders import PairDataset, train_batches
from itmkit.data.precomp import PrecompSplit
from itmkit.data.text import build_text_pipeline
from itmkit.methods.registry import get_method
from itmkit.runtime import pick_device, seed_everything
from itmkit.train.optim import build_optimizer
from itmkit.losses import use_max_violation
from itmkit.train.trainer import resolve_data_dir, train_step


@dataclass
class Throughput:
    """Figures of one :func:`measure_throughput` call (all timed over the same ``steps`` batches).

    Attributes:
        method, preset, device: what was measured where; batch_size: pairs per step.
        steps: timed steps; pairs: pairs in them.
        load_seconds / train_seconds: wall time of loading only / of loading + training.
        load_pairs_per_s / train_pairs_per_s: pairs / those times; ratio: train / load.
        peak_gpu_mib: peak CUDA memory of the timed training steps (``None`` off CUDA).
    """

    method: str
    preset: str
    device: str
    batch_size: int
    steps: int
    pairs: int
    load_seconds: float
    train_seconds: float
    load_pairs_per_s: float
    train_pairs_per_s: float
    ratio: float
    peak_gpu_mib: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(dataset: PairDataset, cfg: RunConfig, count: int, device: torch.device):
    """``count`` batches of the trainer's epoch 0 order (cycling into later epochs if needed)."""
    epoch, produced = 0, 0
    while produced < count:
        for batch in train_batches(dataset, cfg.train.batch_size, cfg.train.seed, epoch, num_workers=cfg.data.num_workers):
            yield batch.to(device)
            produced += 1
            if produced == count:
                return
        epoch += 1


def measure_throughput(cfg: RunConfig, steps: int = 10, warmup: int = 2, device: str | torch.device | None = None) -> Throughput:
    """Loading-only and training pairs/s of ``cfg`` over ``steps`` timed batches (see the module doc)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"measure_throughput: expected steps >= 1 and warmup >= 0, found steps={steps}, warmup={warmup}")
    device = pick_device(device or cfg.train.device)
    seed_everything(cfg.train.seed)
    data_dir = resolve_data_dir(cfg)
    train_split = PrecompSplit.open(data_dir, cfg.data.train_split)
    pipeline = build_text_pipeline(cfg.text, train_split.captions, data_dir)
    model = get_method(cfg.method).build(cfg, pipeline.vocab_size).to(device).train()
    dataset = PairDataset(*model.prepare_data(train_split, pipeline), train=True, region_drop=cfg.data.region_drop,
                          caption_augment=cfg.data.caption_augment, seed=cfg.train.seed)  # fmt: skip
    optimizer = build_optimizer(model, cfg.train)
    use_amp = bool(cfg.train.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    max_violation = use_max_violation(0, cfg.train)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    pairs = 0
    for i, batch in enumerate(_batches(dataset, cfg, warmup + steps, device)):
        if i == warmup:
            sync()
            started, pairs = time.perf_counter(), 0
        pairs += len(batch)
    sync()
    load_seconds = time.perf_counter() - started

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, batch in enumerate(_batches(dataset, cfg, warmup + steps, device)):
        if i == warmup:
            sync()
            started = time.perf_counter()
        train_step(model, batch, optimizer, scaler, cfg.train.margin, max_violation, cfg.train.grad_clip, use_amp,
                   step=i, epoch=0)  # fmt: skip
    sync()
    train_seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    load_rate, train_rate = pairs / load_seconds, pairs / train_seconds
    return Throughput(cfg.method, cfg.preset, str(device), cfg.train.batch_size, steps, pairs, load_seconds, train_seconds,
                      load_rate, train_rate, train_rate / load_rate, peak)  # fmt: skip
