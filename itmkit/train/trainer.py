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
from tqdm.auto import tqdm

from itmkit.config import RunConfig, config_from_run_dict
from itmkit.data.loaders import PairDataset, steps_per_epoch, train_batches
from itmkit.data.precomp import PrecompSplit, list_splits
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
    """Dotted keys whose values differ (``"train.lr: 0.0005 -> 0.001"``), resumable ones excluded."""
    a, b = _flatten(old), _flatten(new)
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
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # left by writes a kill interrupted
    config_path, ckpt_path, best_path = out / "config.json", out / "checkpoint.pt", out / "model_best.pt"
    if resume and config_path.is_file():
        _check_config(out, run_cfg)
        if (out / "result.json").is_file():
            return load_run_result(out)
    else:
        (out / "result.json").unlink(missing_ok=True)
        write_json(config_path, _config_dict(run_cfg))

    tcfg = run_cfg.train
    seed_everything(tcfg.seed)
    use_amp = bool(tcfg.amp) and device.type == "cuda"  # AMP only ever on CUDA

    data_dir = resolve_data_dir(run_cfg)
    train_split = PrecompSplit.open(data_dir, run_cfg.data.train_split)
    dev_split = PrecompSplit.open(data_dir, run_cfg.data.dev_split, max_captions=run_cfg.data.dev_max_captions)
    # §A.2: the vocabulary is built from train + dev captions when no vocabulary file is given
    pipeline = build_text_pipeline(run_cfg.text, train_split.captions + dev_split.captions, data_dir)
    pipeline_description = describe_pipeline(pipeline, run_cfg.text.hf_path)

    model = get_method(run_cfg.method).build(run_cfg, pipeline.vocab_size).to(device)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = TrainState()

    last_good = f"nothing yet: {ckpt_path.name} has not been written"
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        load_model_weights(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["state"])
        set_rng_state_plain(ckpt["rng"])
        last_good = _describe_position(state)
        # the logs are part of what the checkpoint restores: a kill after the checkpoint was
        # replaced and before log.csv / steps.csv were loses no row
        _write_logs(out, state)

    def checkpoint_payload() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": plain_state_dict(optimizer.state_dict()),
            "scheduler": plain_state_dict(scheduler.state_dict()),
            "scaler": scaler.state_dict(),
            "state": dataclasses.asdict(state),
            "rng": rng_state_plain(),
            "config": _config_dict(run_cfg),
            "text_pipeline": pipeline_description,
        }

    def save_progress() -> None:
        nonlocal last_good
        check_finite_weights(model.state_dict(), f"{out}: model after step {state.global_step}")
        save_checkpoint(ckpt_path, checkpoint_payload())
        last_good = _describe_position(state)
        write_csv(out / "steps.csv", pd.DataFrame(state.step_log, columns=STEP_COLUMNS))

    def diverged(what: str, epoch: int) -> TrainingDivergedError:
        return TrainingDivergedError(
            f"{out}: epoch {epoch + 1}, step {state.global_step + 1}: {what}; training stopped (lr "
            f"{optimizer.param_groups[0]['lr']:.3g}, hardest negatives {'on' if max_violation else 'off'}). "
            f"{ckpt_path.name} keeps the last good state ({last_good}). {ADVICE}"
        )

    dataset = PairDataset(*model.prepare_data(train_split, pipeline), train=True, region_drop=run_cfg.data.region_drop,
                          caption_augment=run_cfg.data.caption_augment, seed=tcfg.seed)  # fmt: skip
    n_steps = steps_per_epoch(len(dataset), tcfg.batch_size)
    steps_this_call = 0
    while state.epoch < tcfg.epochs:
        epoch = state.epoch
        max_violation = use_max_violation(epoch, tcfg)
        if state.step_in_epoch == 0:
            state.epoch_start_seconds = state.seconds
        started = time.perf_counter()
        model.train()
        batches = train_batches(dataset, tcfg.batch_size, tcfg.seed, epoch, start_step=state.step_in_epoch,
                                num_workers=run_cfg.data.num_workers)  # fmt: skip
        bar = tqdm(batches, total=n_steps, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                   disable=not progress, leave=False)  # fmt: skip
        for batch in bar:
            try:
                loss = train_step(model, batch.to(device), optimizer, scaler, tcfg.margin, max_violation,
                                  tcfg.grad_clip, use_amp, step=state.global_step, epoch=epoch)  # fmt: skip
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
        try:
            dev = evaluate_split(model, dev_split, pipeline, ["test"], tcfg.eval_batch_size, device, progress,
                                 check_collapse=False)  # collapse is judged below, without stopping  # fmt: skip
        except NonFiniteScoresError as err:
            raise diverged(f"the dev scores are not finite ({err})", epoch) from None
        dev_metrics = dev.summary.iloc[0]
        spread = score_spread(dev.sims)
        state.seconds += time.perf_counter() - started
        row = {"epoch": epoch + 1, "step": state.global_step,
               "loss": state.epoch_loss_sum / max(1, state.epoch_loss_count), "lr": lr,
               "max_violation": max_violation, **{m: float(dev_metrics[m]) for m in METRIC_NAMES},
               "score_spread": spread.relative, "collapsed": spread.collapsed,
               "epoch_seconds": state.seconds - state.epoch_start_seconds, "seconds": state.seconds}  # fmt: skip
        state.history.append(row)
        if spread.collapsed:
            warnings.warn(
                f"{out}: epoch {epoch + 1}: the dev scores have collapsed ({spread.describe()}): the model gives "
                "every image-caption pair the same score and no longer ranks; this epoch is not a candidate for "
                "model_best.pt. Start hardest negatives later (train.sum_warmup_epochs) or lower train.lr; see "
                "docs/training_and_evaluation.md",
                ScoreCollapseWarning, stacklevel=2,
            )
        elif spread.nearly_collapsed:
            warnings.warn(
                f"{out}: epoch {epoch + 1}: the dev scores have nearly collapsed ({spread.describe()}): every score "
                "is squeezed towards one value, as hardest negatives do when they start before the model ranks "
                "well. If dev rsum stays low, start hardest negatives later (train.sum_warmup_epochs) or lower "
                "train.lr; see docs/training_and_evaluation.md",
                ScoreCollapseWarning, stacklevel=2,
            )
        if not spread.collapsed and row["rsum"] > state.best_rsum:
            state.best_rsum, state.best_epoch = row["rsum"], epoch + 1
            save_checkpoint(best_path, {"model": model.state_dict(), "config": _config_dict(run_cfg),
                                        "text_pipeline": pipeline_description, "epoch": epoch + 1,
                                        "dev_metrics": {m: float(dev_metrics[m]) for m in METRIC_NAMES}})  # fmt: skip
        state.epoch, state.step_in_epoch = epoch + 1, 0
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        save_progress()
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
    best = load_checkpoint(best_path, map_location=device)
    load_model_weights(model, best["model"], best_path)
    test_metrics = None
    if run_cfg.data.test_split in list_splits(data_dir):
        test = evaluate_model(model, data_dir, run_cfg.data.test_split, pipeline, out_dir=out / "test",
                              batch_size=tcfg.eval_batch_size, device=device, progress=progress)  # fmt: skip
        test_metrics = test.metrics
        write_csv(out / "test_metrics.csv", test_metrics)
    result = _result(out, run_cfg, state, model, pipeline, finished=True, test_metrics=test_metrics)
    write_json(out / "result.json", {"best_epoch": state.best_epoch, "best_dev_rsum": state.best_rsum,
                                     "epochs": tcfg.epochs, "steps": state.global_step, "seconds": state.seconds,
                                     "device": str(device), "data_dir": str(data_dir), **model.describe(),
                                     "test": _summary(test_metrics)})  # fmt: skip
    return result



class NonFiniteLossError(ArithmeticError):
    """:func:`train_step` found a NaN or infinite loss or gradient norm (the step was not applied)."""


def train_step(model: MatchingModel, batch, optimizer, scaler, margin: float, max_violation: bool,
               grad_clip: float, use_amp: bool, step: int = 0, epoch: int = 0) -> float:
    """One optimisation step on a batch of ``B`` pairs; returns the loss (summed over the batch, §B.5).

    A model with a ``training_loss(images, captions, batch, *, step, epoch, margin, max_violation)``
    method (HREM: relations among the batch's items) supplies its own loss from the batch's
    training-mode encodings; ``step`` counts the optimisation steps already taken. Every other
    model gets the hinge loss on its score matrix.

    Raises :class:`NonFiniteLossError` without touching the weights when the loss is not finite,
    or (without AMP, whose scaler skips such steps itself) when the clipped gradients' norm is not.
    """
    device_type = batch.images.device.type
    custom_loss = getattr(model, "training_loss", None)
    with torch.autocast(device_type=device_type, dtype=torch.float16, enabled=use_amp):
        images = model.encode_images(batch.images, batch.img_lengths)
        captions = model.encode_captions(batch.tokens, batch.cap_lengths)
        scores = model.similarity(images, captions) if custom_loss is None else None  # [B, B], row = image
    if custom_loss is not None:
        loss = custom_loss(images, captions, batch, step=step, epoch=epoch, margin=margin, max_violation=max_violation)
    else:
        loss = hinge_triplet_loss(scores.float(), margin=margin, max_violation=max_violation)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the training loss is {value}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        if not use_amp and not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the gradient norm is {norm} (loss {value:.4g})")
    scaler.step(optimizer)
    scaler.update()
    return value


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
