"""One trainer for every method: hinge loss, step LR, dev rsum model selection, exact resume.

The recipe is VSE∞'s (baselines.md §B.5–§B.6): AdamW over ``model.param_groups``, LR x0.1 at
``lr_decay_epochs``, total-norm gradient clipping, sum-mode hinge for ``sum_warmup_epochs`` then
hardest negatives, validation on ``dev`` (first 5,000 captions) after every epoch, the best
rsum kept as ``model_best.pt``.

A run directory holds::

    config.json        the RunConfig (written first, once preflight.py has checked it)
    checkpoint.pt      everything to continue exactly (atomic; epoch ends + every N steps)
    model_best.pt      best dev rsum weights + config + text pipeline (``itmkit eval`` reads it)
    log.csv            one row per epoch: loss, lr, dev recalls, rsum, seconds
    steps.csv          loss and lr every ``log_every_steps`` steps
    test/              metrics.csv, metrics.json, sims.npy of the best model on the test split
    test_metrics.csv   the same metrics table (one row per protocol / fold)
    result.json        written last: a finished run re-invoked returns this without training

Exact resume: batches come from ``(seed, epoch)`` with ``start_step`` skipping, augmentation
from ``(seed, epoch, caption)``, and the checkpoint restores model, optimizer, scheduler, AMP
scaler, RNG states, best score and history; a run killed mid-epoch and resumed ends with the
same weights as an uninterrupted one (bit for bit on the CPU). ``log.csv`` and ``steps.csv``
are rewritten from the checkpoint's history when a run resumes, so a kill between writing the
checkpoint and writing the log loses no row. Temporary files of interrupted writes
(``.checkpoint.pt.*.tmp``) are removed when a run starts.

A broken model never looks good (docs/training_and_evaluation.md, "Failures"):

- a non-finite loss (or gradient norm) stops the run with :class:`TrainingDivergedError`
  before the step is applied; ``checkpoint.pt`` keeps the last good state (weights are
  checked finite before every save);
- non-finite dev scores stop it the same way;
- the dev scores' spread is measured after every epoch (``score_spread`` = std / max |score|
  in ``log.csv``, :mod:`itmkit.evaluate.collapse`): collapsed scores (every score alike) give a
  :class:`ScoreCollapseWarning` and ``collapsed = True``, and that epoch is never selected as the
  best; nearly collapsed ones a warning only. A run without one usable epoch ends with
  :class:`NoUsableEpochError` instead of a ``model_best.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

import itmkit.distributed as distributed
from itmkit.config import ADDED_SETTINGS, RunConfig, config_from_run_dict
from itmkit.data.loaders import PairDataset, steps_per_epoch, train_batches
from itmkit.data.precomp import PrecompSplit, list_splits
from itmkit.encoded import Encoded
from itmkit.data.text import build_text_pipeline
from itmkit.evaluate.atomic_write import remove_stale_temp_files, write_csv, write_json
from itmkit.evaluate.collapse import ScoreCollapseWarning, score_spread
from itmkit.evaluate.evaluator import evaluate_model, evaluate_split
from itmkit.evaluate.metrics import METRIC_NAMES, NonFiniteScoresError
from itmkit.losses import hinge_triplet_loss, use_max_violation
from itmkit.methods.registry import get_method
from itmkit.models.base import MatchingModel
from itmkit.runtime import seed_everything
from itmkit.train.checkpoint import (
    check_finite_weights,
    load_checkpoint,
    load_model_weights,
    model_from_checkpoint,
    plain_state_dict,
    rng_state_plain,
    save_checkpoint,
    set_rng_state_plain,
)
from itmkit.train.optim import build_optimizer, build_scheduler
from itmkit.train.pipeline_state import describe_pipeline
from itmkit.train.preflight import check_max_steps, preflight

# Settings that may change between a run and its resumption without changing the numbers.
RESUMABLE_CHANGES = {
    "train.device", "train.eval_batch_size", "train.log_every_steps", "train.checkpoint_every_steps",
    "data.num_workers",
}  # fmt: skip

LOG_COLUMNS = ["epoch", "step", "loss", "lr", "max_violation", *[m for m in METRIC_NAMES], "score_spread",
               "collapsed", "epoch_seconds", "seconds"]  # fmt: skip
STEP_COLUMNS = ["epoch", "step", "loss", "lr"]

ADVICE = ("Lower train.lr (or check the features with `itmkit data verify`), then start over in a new --out "
          "folder or with --no-resume (resume=False)")  # fmt: skip


class TrainingDivergedError(ValueError):
    """The loss, the gradients or the dev scores became NaN or infinite; the run stopped."""


class NoUsableEpochError(ValueError):
    """Every epoch ended with collapsed dev scores, so no model could be selected."""


@dataclass
class TrainState:
    """Where a run stands. ``epoch`` is 0-based (the epoch in progress); ``step_in_epoch`` counts
    the batches of it already trained; ``history`` holds the ``log.csv`` rows."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_rsum: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    step_log: list[dict[str, Any]] = field(default_factory=list)
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    window_loss_sum: float = 0.0
    window_loss_count: int = 0
    seconds: float = 0.0  # wall time trained so far, over all calls
    epoch_start_seconds: float = 0.0  # ``seconds`` when the epoch in progress began


@dataclass
class RunResult:
    """What :func:`train` returns.

    Attributes:
        finished: all epochs trained and the test split evaluated (``False`` after ``max_steps``).
        best_epoch: 1-based epoch of the best dev rsum (``model_best.pt``).
        log: ``log.csv`` as a DataFrame (one row per epoch).
        test_metrics: ``test_metrics.csv`` (None when unfinished or the data has no test split).
        model / pipeline: the model with the best weights (finished) or the current ones, and its
            text pipeline.
    """

    out_dir: Path
    config: RunConfig
    finished: bool
    best_epoch: int
    best_rsum: float
    log: pd.DataFrame
    test_metrics: pd.DataFrame | None = None
    model: MatchingModel | None = None
    pipeline: Any = None
    seconds: float = 0.0

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "model_best.pt"


def resolve_data_dir(run_cfg: RunConfig) -> Path:
    """``run_cfg.data.data_dir``, or the embedded set of ``data.embedded_preset`` (built once, cached)."""
    if run_cfg.data.data_dir:
        return Path(run_cfg.data.data_dir)
    from itmkit.data.embedded import embedded_dataset

    return Path(embedded_dataset(preset=run_cfg.data.embedded_preset, seed=run_cfg.data.embedded_seed))


def _config_dict(run_cfg: RunConfig) -> dict[str, Any]:
    return json.loads(run_cfg.to_json())


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (``"train.lr: 0.0005 -> 0.001"``), resumable ones excluded;
    a setting added later (``ADDED_SETTINGS``) missing from ``old`` counts as its default."""
    a, b = _flatten(old), _flatten(new)
    for key, default in ADDED_SETTINGS.items():
        if key not in a and key in b:
            a[key] = default
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES]  # fmt: skip


class RunConfigMismatch(ValueError):
    """A run folder holds a run of another config: resuming it would mix two runs.

    Attributes:
        path: the folder's ``config.json``.
        differences: ``"train.lr: 0.0005 -> 0.001"`` per differing field.
    """

    def __init__(self, path: Path, differences: list[str]) -> None:
        self.path, self.differences = path, differences
        super().__init__(f"{path}: the run in this folder used another config; differing fields: "
                         f"{'; '.join(differences)}. Use another out_dir, or train(..., resume=False) "
                         "to start over in this folder (CLI: itmkit train --no-resume)")  # fmt: skip

    def __reduce__(self):
        return (type(self), (self.path, self.differences))


def _check_config(out: Path, run_cfg: RunConfig) -> None:
    stored = json.loads((out / "config.json").read_text(encoding="utf-8"))
    diffs = config_differences(stored, _config_dict(run_cfg))
    if diffs:
        raise RunConfigMismatch(out / "config.json", diffs)


def train(
    run_cfg: RunConfig,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    max_steps: int | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    device: str | torch.device | None = None,
) -> RunResult:
    """Train ``run_cfg`` into ``out_dir`` (see the module docstring for the files).

    Args:
        resume: continue from ``out_dir/checkpoint.pt`` if present (a finished run returns its
            results without training); ``False`` starts over and overwrites the folder's files.
        max_steps: stop after this many optimisation steps in this call (an integer >= 1;
            checkpoint saved, ``finished=False``); the next call resumes.
        on_step: called with the :class:`TrainState` after every step (and after any checkpoint
            of that step); an exception raised there stops the run like a crash would.
        device: overrides ``run_cfg.train.device`` (``"auto"``: cuda, mps, cpu).
    """
    out = Path(out_dir)
    check_max_steps(max_steps)
    device = preflight(run_cfg, device)  # every setting, the device and the named files: before any write
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())  # one GPU per process
    progress = progress and main
    config_path, ckpt_path, best_path = out / "config.json", out / "checkpoint.pt", out / "model_best.pt"

    # Rank 0 alone touches the folder (and builds the embedded set once); the others take its
    # verdict, so a refused config stops every rank instead of leaving some waiting.
    verdict: tuple[BaseException | None, bool] = (None, False)
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(out)  # left by writes a kill interrupted
            if resume and config_path.is_file():
                _check_config(out, run_cfg)
                verdict = (None, (out / "result.json").is_file())
            else:
                (out / "result.json").unlink(missing_ok=True)
                write_json(config_path, _config_dict(run_cfg))
            if not verdict[1]:
                resolve_data_dir(run_cfg)
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
            verdict = (err, False)
    error, finished_before = distributed.broadcast_object(verdict)
    if error is not None:
        raise error
    if finished_before:
        return load_run_result(out)

    tcfg = run_cfg.train
    seed_everything(tcfg.seed)
    use_amp = bool(tcfg.amp) and device.type == "cuda"  # AMP only ever on CUDA
    amp_dtype = _amp_dtype(tcfg.amp_dtype, device, use_amp)
    eval_options = _eval_options(tcfg, device)

    data_dir = resolve_data_dir(run_cfg)
    train_split = PrecompSplit.open(data_dir, run_cfg.data.train_split)
    dev_split = PrecompSplit.open(data_dir, run_cfg.data.dev_split, max_captions=run_cfg.data.dev_max_captions)
    # §A.2: the vocabulary is built from train + dev captions when no vocabulary file is given
    pipeline = build_text_pipeline(run_cfg.text, train_split.captions + dev_split.captions, data_dir)
    pipeline_description = describe_pipeline(pipeline, run_cfg.text.hf_path)

    model = get_method(run_cfg.method).build(run_cfg, pipeline.vocab_size)
    if world > 1 and device.type == "cuda" and tcfg.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    # a scaler only for fp16: bf16 keeps float32's exponent range, so its gradients do not underflow
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    state = TrainState()

    last_good = f"nothing yet: {ckpt_path.name} has not been written"
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if int(ckpt.get("world_size", 1)) != world:
            raise ValueError(
                f"{ckpt_path}: world_size: this run was trained by {int(ckpt.get('world_size', 1))} process(es) and "
                f"is resumed by {world}; exact resume needs the same number (each rank's batches and random "
                "streams depend on it). Resume with the same torchrun --nproc_per_node x --nnodes, or start over "
                "in a new --out folder"
            )
        load_model_weights(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["state"])
        set_rng_state_plain(ckpt["rng_by_rank"][rank] if "rng_by_rank" in ckpt else ckpt["rng"])
        last_good = _describe_position(state)
        # the logs are part of what the checkpoint restores: a kill after the checkpoint was
        # replaced and before log.csv / steps.csv were loses no row
        if main:
            _write_logs(out, state)

    # DDP wraps the whole loss (encoders, scores, loss), so that its hooks see every parameter
    # the loss uses; a world of one trains the model directly
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            StepLoss(model), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # e.g. HREM's relation modules before their warm-up
        )

    def checkpoint_payload(rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": plain_state_dict(optimizer.state_dict()),
            "scheduler": plain_state_dict(scheduler.state_dict()),
            "scaler": scaler.state_dict(),
            "state": dataclasses.asdict(state),
            "rng": rngs[0],
            "rng_by_rank": rngs,  # each rank's own streams (dropout differs by rank)
            "world_size": world,
            "config": _config_dict(run_cfg),
            "text_pipeline": pipeline_description,
        }

    def save_progress() -> None:
        """Every rank calls it (the random states are gathered); rank 0 writes."""
        nonlocal last_good
        check_finite_weights(model.state_dict(), f"{out}: model after step {state.global_step}")
        rngs = distributed.all_gather_object(rng_state_plain())
        if main:
            save_checkpoint(ckpt_path, checkpoint_payload(rngs))
            write_csv(out / "steps.csv", pd.DataFrame(state.step_log, columns=STEP_COLUMNS))
        last_good = _describe_position(state)

    def diverged(what: str, epoch: int) -> TrainingDivergedError:
        return TrainingDivergedError(
            f"{out}: epoch {epoch + 1}, step {state.global_step + 1}: {what}; training stopped (lr "
            f"{optimizer.param_groups[0]['lr']:.3g}, hardest negatives {'on' if max_violation else 'off'}). "
            f"{ckpt_path.name} keeps the last good state ({last_good}). {ADVICE}"
        )

    dataset = PairDataset(*model.prepare_data(train_split, pipeline), train=True, region_drop=run_cfg.data.region_drop,
                          caption_augment=run_cfg.data.caption_augment, seed=tcfg.seed)  # fmt: skip
    n_steps = steps_per_epoch(len(dataset), tcfg.batch_size, world_size=world)
    pin = device.type == "cuda"
    steps_this_call = 0
    while state.epoch < tcfg.epochs:
        epoch = state.epoch
        max_violation = use_max_violation(epoch, tcfg)
        if state.step_in_epoch == 0:
            state.epoch_start_seconds = state.seconds
        started = time.perf_counter()
        model.train()
        batches = train_batches(dataset, tcfg.batch_size, tcfg.seed, epoch, start_step=state.step_in_epoch,
                                num_workers=run_cfg.data.num_workers, rank=rank, world_size=world,
                                pin_memory=pin)  # fmt: skip
        bar = tqdm(batches, total=n_steps, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                   disable=not progress, leave=False)  # fmt: skip
        for batch in bar:
            try:
                loss = train_step(model, batch.to(device, non_blocking=pin), optimizer, scaler, tcfg.margin,
                                  max_violation, tcfg.grad_clip, use_amp, step=state.global_step, epoch=epoch,
                                  amp_dtype=amp_dtype, accumulate_steps=tcfg.accumulate_steps, ddp=ddp)  # fmt: skip
            except NonFiniteLossError as err:
                bar.close()
                raise diverged(str(err), epoch) from None
            state.step_in_epoch += 1
            state.global_step += 1
            state.epoch_loss_sum += loss
            state.epoch_loss_count += 1
            state.window_loss_sum += loss
            state.window_loss_count += 1
            if state.global_step % max(1, tcfg.log_every_steps) == 0:
                state.step_log.append({"epoch": epoch + 1, "step": state.global_step,
                                       "loss": state.window_loss_sum / state.window_loss_count,
                                       "lr": optimizer.param_groups[0]["lr"]})  # fmt: skip
                state.window_loss_sum, state.window_loss_count = 0.0, 0
                bar.set_postfix(loss=f"{state.step_log[-1]['loss']:.3f}")
            steps_this_call += 1
            stopping = max_steps is not None and steps_this_call >= max_steps
            state.seconds += time.perf_counter() - started
            started = time.perf_counter()
            if stopping or (tcfg.checkpoint_every_steps > 0 and state.global_step % tcfg.checkpoint_every_steps == 0):
                save_progress()
            if on_step is not None:
                on_step(state)
            if stopping:
                bar.close()
                return _result(out, run_cfg, state, model, pipeline, finished=False)
        bar.close()

        # epoch end: decay, validate, keep the best, checkpoint
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        row, error = None, None
        if main:  # rank 0 validates alone; the others wait for its row
            try:
                row = _validate(model, dev_split, pipeline, tcfg, device, progress, eval_options, epoch, state, lr,
                                max_violation)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
                error = err
        row, error = distributed.broadcast_object((row, error))
        if isinstance(error, NonFiniteScoresError):
            raise diverged(f"the dev scores are not finite ({error})", epoch) from None
        if error is not None:
            raise error
        spread_collapsed, nearly, described = bool(row["collapsed"]), row.pop("_nearly_collapsed"), row.pop("_spread")
        state.seconds += time.perf_counter() - started
        row["epoch_seconds"], row["seconds"] = state.seconds - state.epoch_start_seconds, state.seconds
        if spread_collapsed and main:
            warnings.warn(
                f"{out}: epoch {epoch + 1}: the dev scores have collapsed ({described}): the model gives "
                "every image-caption pair the same score and no longer ranks; this epoch is not a candidate for "
                "model_best.pt. Start hardest negatives later (train.sum_warmup_epochs) or lower train.lr; see "
                "docs/training_and_evaluation.md",
                ScoreCollapseWarning, stacklevel=2,
            )
        elif nearly and main:
            warnings.warn(
                f"{out}: epoch {epoch + 1}: the dev scores have nearly collapsed ({described}): every score "
                "is squeezed towards one value, as hardest negatives do when they start before the model ranks "
                "well. If dev rsum stays low, start hardest negatives later (train.sum_warmup_epochs) or lower "
                "train.lr; see docs/training_and_evaluation.md",
                ScoreCollapseWarning, stacklevel=2,
            )
        state.history.append(row)
        if not spread_collapsed and row["rsum"] > state.best_rsum:
            state.best_rsum, state.best_epoch = row["rsum"], epoch + 1
            if main:
                save_checkpoint(best_path, {"model": model.state_dict(), "config": _config_dict(run_cfg),
                                            "text_pipeline": pipeline_description, "epoch": epoch + 1,
                                            "dev_metrics": {m: float(row[m]) for m in METRIC_NAMES}})  # fmt: skip
        state.epoch, state.step_in_epoch = epoch + 1, 0
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        save_progress()
        if main:
            write_csv(out / "log.csv", pd.DataFrame(state.history, columns=LOG_COLUMNS))
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{tcfg.epochs}: loss {row['loss']:.4f}  dev rsum {row['rsum']:.2f}  "
                       f"(best {state.best_rsum:.2f} @ {state.best_epoch})")  # fmt: skip

    # finished: the best weights on the test split
    if state.best_epoch == 0:
        collapsed = [row["epoch"] for row in state.history if row.get("collapsed")]
        raise NoUsableEpochError(
            f"{out}: no epoch gave a usable model: the dev scores collapsed (every pair scored alike) after "
            f"epoch{'s' if len(collapsed) > 1 else ''} {', '.join(map(str, collapsed)) or '(none logged)'}, so "
            f"there is no model_best.pt and no test evaluation; see log.csv. Start hardest negatives later "
            f"(train.sum_warmup_epochs) or lower train.lr, then start over in a new --out folder or with "
            "--no-resume (resume=False)"
        )
    test_metrics, error = None, None
    if main:  # rank 0 tests the best weights alone; the others wait for its table
        try:
            best = load_checkpoint(best_path, map_location=device)
            load_model_weights(model, best["model"], best_path)
            if run_cfg.data.test_split in list_splits(data_dir):
                test = evaluate_model(model, data_dir, run_cfg.data.test_split, pipeline, out_dir=out / "test",
                                      batch_size=tcfg.eval_batch_size, device=device, progress=progress,
                                      **eval_options)  # fmt: skip
                test_metrics = test.metrics
                write_csv(out / "test_metrics.csv", test_metrics)
            write_json(out / "result.json", {"best_epoch": state.best_epoch, "best_dev_rsum": state.best_rsum,
                                             "epochs": tcfg.epochs, "steps": state.global_step,
                                             "seconds": state.seconds, "device": str(device), "world_size": world,
                                             "data_dir": str(data_dir), **model.describe(),
                                             "test": _summary(test_metrics)})  # fmt: skip
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
            error = err
    test_metrics, error = distributed.broadcast_object((test_metrics, error))
    if error is not None:
        raise error
    if not main:
        best = load_checkpoint(best_path, map_location=device)
        load_model_weights(model, best["model"], best_path)
    return _result(out, run_cfg, state, model, pipeline, finished=True, test_metrics=test_metrics)


def _amp_dtype(name: str, device: torch.device, use_amp: bool) -> torch.dtype:
    """``train.amp_dtype`` as a dtype; bf16 on a GPU without it is refused by name."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if use_amp and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.amp_dtype: bfloat16 needs a GPU that supports it (Ampere or later); "
                         f"{torch.cuda.get_device_name(device)} does not. Use float16 (with its gradient scaler)")  # fmt: skip
    return dtype


def _eval_options(tcfg, device: torch.device) -> dict[str, Any]:
    """The pairwise engine's block precision for dev/test scoring: ``train.eval_compute_dtype`` on
    CUDA, float32 elsewhere (nothing runs in reduced precision on the CPU)."""
    if device.type != "cuda" or tcfg.eval_compute_dtype == "float32":
        return {}
    return {"compute_dtype": getattr(torch, tcfg.eval_compute_dtype)}


def _validate(model, dev_split, pipeline, tcfg, device, progress, eval_options, epoch, state, lr,
              max_violation) -> dict[str, Any]:  # fmt: skip
    """The ``log.csv`` row of an epoch: dev recalls and the scores' spread (``_spread`` and
    ``_nearly_collapsed`` are for the warnings and leave the row before it is logged)."""
    dev = evaluate_split(model, dev_split, pipeline, ["test"], tcfg.eval_batch_size, device, progress,
                         check_collapse=False, **eval_options)  # collapse is judged by the trainer, without stopping  # fmt: skip
    dev_metrics = dev.summary.iloc[0]
    spread = score_spread(dev.sims)
    return {"epoch": epoch + 1, "step": state.global_step,
            "loss": state.epoch_loss_sum / max(1, state.epoch_loss_count), "lr": lr,
            "max_violation": max_violation, **{m: float(dev_metrics[m]) for m in METRIC_NAMES},
            "score_spread": spread.relative, "collapsed": bool(spread.collapsed),
            "_nearly_collapsed": bool(spread.nearly_collapsed), "_spread": spread.describe()}  # fmt: skip


class NonFiniteLossError(ArithmeticError):
    """:func:`train_step` found a NaN or infinite loss or gradient norm (the step was not applied)."""


def shares_global_batch(model: MatchingModel) -> bool:
    """Whether DDP gathers this model's encodings across ranks so the hinge loss sees the global
    batch (embedding methods with the trainer's loss), or each rank scores its own share
    (pairwise methods and models with their own loss; see docs/gpu_training.md)."""
    return not model.pairwise and getattr(model, "training_loss", None) is None


def _gather_encoded(encoded: Encoded) -> Encoded:
    """Every rank's rows of ``encoded`` (gradient kept: :func:`itmkit.distributed.all_gather_with_grad`)."""
    return Encoded(distributed.all_gather_with_grad(encoded.feats),
                   None if encoded.lengths is None else distributed.all_gather_with_grad(encoded.lengths),
                   {key: distributed.all_gather_with_grad(value) for key, value in encoded.extras.items()})  # fmt: skip


def batch_loss(model: MatchingModel, batch, margin: float, max_violation: bool, *, step: int = 0, epoch: int = 0,
               use_amp: bool = False, amp_dtype: torch.dtype = torch.float16) -> Tensor:  # fmt: skip
    """The loss of a (micro-)batch: the model's own (``training_loss``: HREM, AAHR) or the hinge
    loss (§B.5, summed over the pairs) on its score matrix. Under DDP an embedding method's loss
    is taken over the global batch (:func:`shares_global_batch`): every rank computes the same value."""
    custom_loss = getattr(model, "training_loss", None)
    with torch.autocast(device_type=batch.images.device.type, dtype=amp_dtype, enabled=use_amp):
        images = model.encode_images(batch.images, batch.img_lengths)
        captions = model.encode_captions(batch.tokens, batch.cap_lengths)
        if custom_loss is None:
            if distributed.world_size() > 1 and shares_global_batch(model):
                images, captions = _gather_encoded(images), _gather_encoded(captions)
            scores = model.similarity(images, captions)  # [B, B], row = image
    if custom_loss is not None:
        return custom_loss(images, captions, batch, step=step, epoch=epoch, margin=margin, max_violation=max_violation)
    return hinge_triplet_loss(scores.float(), margin=margin, max_violation=max_violation)


class StepLoss(torch.nn.Module):
    """:func:`batch_loss` as a module: what DDP wraps, so its forward sees every parameter the
    loss uses (a pairwise method's similarity has weights too)."""

    def __init__(self, model: MatchingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, margin: float, max_violation: bool, step: int, epoch: int, use_amp: bool,
                amp_dtype: torch.dtype) -> Tensor:  # fmt: skip
        return batch_loss(self.model, batch, margin, max_violation, step=step, epoch=epoch, use_amp=use_amp,
                          amp_dtype=amp_dtype)  # fmt: skip


def train_step(model: MatchingModel, batch, optimizer, scaler, margin: float, max_violation: bool,
               grad_clip: float, use_amp: bool, step: int = 0, epoch: int = 0, *,
               amp_dtype: torch.dtype = torch.float16, accumulate_steps: int = 1,
               ddp: torch.nn.parallel.DistributedDataParallel | None = None) -> float:  # fmt: skip
    """One optimisation step on this process's batch; returns the step's loss (summed over the
    pairs, §B.5; over all ranks under DDP, so every rank logs the same value).

    ``accumulate_steps`` splits the batch into micro-batches (:meth:`Batch.split`) whose gradients
    add up before the one optimiser step: the same gradient as one pass over the batch when the
    loss is a sum over independent parts, with hardest negatives found within each micro-batch.
    Under DDP (``ddp`` wraps :class:`StepLoss` of ``model``) the gradients are averaged over the
    ranks after the last micro-batch. An embedding method's loss is computed on the gathered
    global batch by every rank (each rank's gradient is world x its share, the average gives the
    one-process gradient exactly); every other loss is this rank's own and is scaled by the world
    size, so the average is the sum over ranks: N processes with b pairs each train like one
    process with ``accumulate_steps = N`` over the N·b pairs.

    A model with a ``training_loss(images, captions, batch, *, step, epoch, margin, max_violation)``
    method (HREM: relations among the batch's items) supplies its own loss from the batch's
    training-mode encodings; ``step`` counts the optimisation steps already taken.

    Raises :class:`NonFiniteLossError` without touching the weights when the loss is not finite
    (on any rank: every rank raises), or (without AMP, whose scaler skips such steps itself) when
    the clipped gradients' norm is not.
    """
    world = distributed.world_size()
    shared = world > 1 and shares_global_batch(model)
    parts = batch.split(min(accumulate_steps, len(batch)))
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for index, part in enumerate(parts):
        syncing = ddp is None or index == len(parts) - 1
        with contextlib.nullcontext() if syncing else ddp.no_sync():
            args = (part, margin, max_violation, step, epoch, use_amp, amp_dtype)
            loss = ddp(*args) if ddp is not None else batch_loss(model, part, margin, max_violation, step=step,
                                                                 epoch=epoch, use_amp=use_amp, amp_dtype=amp_dtype)  # fmt: skip
            value = distributed.sum_over_ranks(float(loss.detach()), loss.device)
            value = value / world if shared else value
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"the training loss is {value}")
            total += value
            scaler.scale(loss if shared or world == 1 else loss * world).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        if not use_amp and not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the gradient norm is {norm} (loss {total:.4g})")
    scaler.step(optimizer)
    scaler.update()
    return total


def _describe_position(state: TrainState) -> str:
    if state.step_in_epoch == 0:
        return f"after epoch {state.epoch}, step {state.global_step}"
    return f"epoch {state.epoch + 1}, step {state.global_step}"


def _write_logs(out: Path, state: TrainState) -> None:
    """``log.csv`` (one row per finished epoch) and ``steps.csv`` from the training state."""
    write_csv(out / "log.csv", pd.DataFrame(state.history, columns=LOG_COLUMNS))
    write_csv(out / "steps.csv", pd.DataFrame(state.step_log, columns=STEP_COLUMNS))


def _summary(metrics: pd.DataFrame | None) -> dict[str, float]:
    if metrics is None:
        return {}
    rows = metrics[metrics["fold"].isin(["all", "mean"])]
    return {f"{r['protocol']}/{m}": float(r[m]) for _, r in rows.iterrows() for m in METRIC_NAMES}


def _result(out, run_cfg, state: TrainState, model, pipeline, finished: bool, test_metrics=None) -> RunResult:
    return RunResult(out_dir=out, config=run_cfg, finished=finished, best_epoch=state.best_epoch,
                     best_rsum=state.best_rsum, log=pd.DataFrame(state.history, columns=LOG_COLUMNS),
                     test_metrics=test_metrics, model=model, pipeline=pipeline, seconds=state.seconds)  # fmt: skip


def load_run_result(out_dir: str | Path, load_model: bool = True) -> RunResult:
    """The :class:`RunResult` of a finished run directory, read from its files (no training)."""
    out = Path(out_dir)
    summary = json.loads((out / "result.json").read_text(encoding="utf-8"))
    model, run_cfg, pipeline = model_from_checkpoint(out / "model_best.pt") if load_model else (None, None, None)
    if run_cfg is None:
        run_cfg = config_from_run_dict(json.loads((out / "config.json").read_text(encoding="utf-8")))
    test_path = out / "test_metrics.csv"
    return RunResult(out_dir=out, config=run_cfg, finished=True, best_epoch=int(summary["best_epoch"]),
                     best_rsum=float(summary["best_dev_rsum"]), log=pd.read_csv(out / "log.csv"),
                     test_metrics=pd.read_csv(test_path, dtype={"fold": str}) if test_path.is_file() else None,
                     model=model, pipeline=pipeline, seconds=float(summary.get("seconds", 0.0)))  # fmt: skip
