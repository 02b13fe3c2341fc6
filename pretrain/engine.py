"""The SoCo pretraining loop: one iteration, one epoch, checkpoints.

``train.py`` parses the configuration and wires the parts; this module runs them. Every
iteration ``t`` (0-based, global over epochs) does, in this order::

    lr  = lr_values[t];  tau = momentum_values[t]        # per-iteration schedules (docs/method.md §4.2)
    model_without_ddp.update_target(tau)                  # EMA, same place as the original
    loss = model(views, boxes, corres)["loss"]            # under autocast
    all-reduce [loss, bad images]; stop every rank if the mean loss is not finite
    zero_grad; scaler.scale(loss).backward(); scaler.unscale_; LARS step; scaler.update

The EMA counter is the global step ``t`` itself, so a resumed run continues the momentum
schedule where it stopped (the original restarted it at 0.99, docs/method.md §8 item 4).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from pretrain.data.device_colour import apply_colour
from socokit import distributed as sdist
from socokit.backbones import PIXEL_CONVENTION
from socokit.errors import TooManyBadImagesError
from socokit.training import autocast_context, check_finite

CHECKPOINT_FORMAT = "soco-pretrain"
CHECKPOINT_VERSION = 1


@dataclass
class LoopSettings:
    """Knobs of the loop that are not model or optimiser hyperparameters.

    Attributes:
        device: where the model lives.
        amp: "none", "bf16" or "fp16" (already resolved).
        channels_last: feed images in channels-last memory format.
        print_freq: log / TensorBoard every this many iterations.
        save_every_iters: also checkpoint every this many iterations inside an epoch (0: off).
        max_bad_fraction: stop when more than this fraction of an epoch's images was replaced.
        stop_at_step: end the run (with a checkpoint) once this many iterations are done
            (0: run to the end); the schedule is unchanged, so ``--auto-resume`` continues.
        metrics_path: rank 0 appends one JSON line per logged iteration here (None: off).
        preemption: a ``socokit.preemption.PreemptionWatcher`` asked after every step; when it
            says so the epoch ends early with ``EpochResult.preempted`` (None: off).
    """

    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    print_freq: int = 100
    save_every_iters: int = 0
    max_bad_fraction: float = 0.01
    stop_at_step: int = 0
    metrics_path: str | None = None
    preemption: object | None = None


@dataclass
class EpochResult:
    """What one call of :func:`train_one_epoch` did."""

    next_step: int
    stopped: bool = False
    preempted: bool = False
    loss_avg: float = float("nan")
    num_images: int = 0
    num_replaced: int = 0
    history: list = field(default_factory=list)


def move_batch(batch: dict, device: torch.device, channels_last: bool = False):
    """Move a collated batch to ``device``.

    Args:
        batch: ``{"views": [Tensor[N, 3, S_v, S_v]], "boxes": [Tensor[N, L, 5]],
            "corres": [Tensor[N, PL, PL]], "num_replaced": Tensor[N], ...}``; with
            ``"colour_params"`` ([Tensor[N, PARAMS]]) the views are uint8 and get their colour
            augmentation and normalisation here, on ``device``.

    Returns:
        (views, boxes, corres, num_replaced) with ``num_replaced`` a float scalar tensor.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = [v.to(device, non_blocking=True) for v in batch["views"]]
    if "colour_params" in batch:  # uint8 views: colour + normalisation on the device
        views = [apply_colour(v, p.to(device, non_blocking=True))
                 for v, p in zip(views, batch["colour_params"])]
    views = [v.contiguous(memory_format=fmt) for v in views]
    boxes = [b.to(device, non_blocking=True) for b in batch["boxes"]]
    corres = [c.to(device, non_blocking=True) for c in batch["corres"]]
    replaced = batch.get("num_replaced")
    replaced = torch.as_tensor(0.0 if replaced is None else replaced).float().sum().to(device)
    return views, boxes, corres, replaced


def grad_norm(parameters) -> float:
    """Global L2 norm of the gradients (after unscaling), as a Python float."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item())


def train_step(model, model_without_ddp, optimizer, scaler, batch: dict, *, step: int, lr: float,
               tau: float, settings: LoopSettings, want_grad_norm: bool = False) -> dict:
    """One optimisation step on every rank.

    Returns:
        {"loss": all-reduced mean loss, "replaced": bad images in the global batch,
         "grad_norm": float or nan, "scale": grad-scaler scale or None}.

    Raises:
        socokit.training.NonFiniteLossError: on every rank at the same step, before any
            parameter is touched by this step.
    """
    views, boxes, corres, replaced = move_batch(batch, settings.device, settings.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model_without_ddp.update_target(tau)
    with autocast_context(settings.device, settings.amp):
        loss = model(views, boxes, corres)["loss"]
    # One collective per step: the mean loss for logging and the finiteness check, and the
    # bad-image count. Logging the mean fixes the original's rank-0-only loss (docs/method.md §8 item 11).
    stats = sdist.all_reduce_sum(torch.stack([loss.detach().float(), replaced]))
    mean_loss = stats[0] / sdist.get_world_size()
    scale = scaler.get_scale() if scaler.is_enabled() else None
    check_finite(mean_loss, step=step, lr=lr, scale=scale, dist=False)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # LARS must see true gradients (trust ratio, decay)
    norm = float("nan")
    if want_grad_norm:
        norm = grad_norm(p for g in optimizer.param_groups for p in g["params"])
    scaler.step(optimizer)
    scaler.update()
    return {"loss": float(mean_loss.item()), "replaced": float(stats[1].item()),
            "grad_norm": norm, "scale": scale}


DATA_WAIT_FRACTION = 0.2
"""Warn when more than this fraction of the step time is spent waiting for the loader."""
DATA_WAIT_WINDOW = 50
"""Steps over which the waiting fraction is measured (the first window of an epoch is skipped:
workers are still starting)."""


def data_wait_advice(wait_seconds: float, total_seconds: float, steps: int,
                     num_workers: int | None = None) -> str | None:
    """The warning text when the loop waited on data more than :data:`DATA_WAIT_FRACTION`.

    Args:
        wait_seconds: time spent in ``next(loader)`` over the window.
        total_seconds: wall time of the window (waiting included).
        steps: steps in the window.
        num_workers: loader workers per process, for the advice (None: not named).
    """
    if total_seconds <= 0 or wait_seconds / total_seconds <= DATA_WAIT_FRACTION:
        return None
    workers = f" (now {num_workers})" if num_workers is not None else ""
    return (f"the training step waited for data {100 * wait_seconds / total_seconds:.0f}% of the "
            f"time over the last {steps} steps (more than {100 * DATA_WAIT_FRACTION:.0f}%): the "
            f"input pipeline is the bottleneck. Raise --num-workers{workers} (one loader core "
            "makes about 50-100 SoCo_FPN samples/s, see benchmarks/bench_pretrain_data.py), or "
            "pass --colour-on-device to move the colour augmentations to the GPU.")


def check_bad_fraction(num_replaced: float, num_images: float, limit: float, epoch: int) -> None:
    """Raise :class:`TooManyBadImagesError` if the replaced fraction exceeds ``limit``."""
    if num_images > 0 and num_replaced / num_images > limit:
        raise TooManyBadImagesError(
            f"{int(num_replaced)} of {int(num_images)} images loaded in epoch {epoch + 1} "
            f"({100.0 * num_replaced / num_images:.2f}%) were unreadable and replaced by other "
            f"images, more than --max-bad-fraction {limit}. Check the image root and the "
            "proposal store (they must come from the same folder), or remove the bad files "
            "and rebuild the store; the last checkpoint is intact.")


def train_one_epoch(*, model, model_without_ddp, loader, optimizer, scaler, lr_values: np.ndarray,
                    momentum_values: np.ndarray, epoch: int, first_step: int,
                    settings: LoopSettings, progress, tb_writer, logger,
                    save_fn: Callable[[int, str], None] | None = None) -> EpochResult:
    """Run the rest of epoch ``epoch``, starting at global iteration ``first_step``.

    Args:
        model: the (possibly DDP-wrapped) model, in train mode.
        model_without_ddp: the unwrapped model (EMA update, checkpoints).
        loader: yields collated batches; its sampler has been positioned for this epoch.
        lr_values, momentum_values (ndarray[total_iters]): per-iteration schedules.
        first_step: global index of the first iteration this call runs.
        progress: a ``socokit.training.ProgressMeter`` spanning the whole run.
        tb_writer: a ``socokit.training.TensorboardWriter``.
        save_fn: ``save_fn(next_step, kind)`` writes a checkpoint (all ranks call it).

    Returns:
        EpochResult with the next global step and the epoch's averages.
    """
    world = sdist.get_world_size()
    result = EpochResult(next_step=first_step)
    loss_sum, steps = 0.0, 0
    last = time.time()
    epoch_images = len(loader.sampler) * world
    remaining = len(loader)
    wait_window = [0.0, 0.0, 0]  # data seconds, total seconds, steps
    windows_seen, wait_warned = 0, False
    for batch in loader:
        step = result.next_step
        data_time = time.time() - last
        log_now = (step + 1) % settings.print_freq == 0
        out = train_step(model, model_without_ddp, optimizer, scaler, batch, step=step,
                         lr=float(lr_values[step]), tau=float(momentum_values[step]),
                         settings=settings, want_grad_norm=log_now)
        batch_images = len(batch["index"]) * world
        result.next_step = step + 1
        result.num_images += batch_images
        result.num_replaced += int(out["replaced"])
        loss_sum, steps = loss_sum + out["loss"], steps + 1
        dt = max(time.time() - last, 1e-9)
        last = time.time()
        wait_window[0] += data_time
        wait_window[1] += dt
        wait_window[2] += 1
        if wait_window[2] == DATA_WAIT_WINDOW:
            windows_seen += 1
            advice = data_wait_advice(*wait_window, getattr(loader, "num_workers", None))
            if advice is not None and windows_seen > 1 and not wait_warned:
                logger.warning(advice)
                wait_warned = True  # once per epoch
            wait_window = [0.0, 0.0, 0]
        # LR and tau go in the header: a smoothed median of a schedule would be misleading.
        progress.header = (f"epoch {epoch + 1} lr {lr_values[step]:.4g} "
                           f"tau {momentum_values[step]:.6f} ")
        progress.update(step, batch_images=len(batch["index"]), loss=out["loss"], data=data_time)
        if log_now or settings.print_freq == 1:
            record = {"step": step, "epoch": epoch, "loss": out["loss"], "lr": float(lr_values[step]),
                      "momentum": float(momentum_values[step]), "grad_norm": out["grad_norm"],
                      "images_per_s": batch_images / dt, "data_time": data_time,
                      "bad_images": int(out["replaced"])}
            if out["scale"] is not None:
                record["grad_scale"] = out["scale"]
            _log_record(record, tb_writer, settings.metrics_path)
            result.history.append(record)
            if result.num_images >= 0.1 * epoch_images:
                check_bad_fraction(result.num_replaced, result.num_images,
                                   settings.max_bad_fraction, epoch)
        if settings.preemption is not None and settings.preemption.requested():
            result.stopped = result.preempted = True  # train.py saves, then exits for a requeue
            break
        if settings.stop_at_step and result.next_step >= settings.stop_at_step:
            result.stopped = True
            break
        if (save_fn is not None and settings.save_every_iters and steps < remaining
                and result.next_step % settings.save_every_iters == 0):  # epoch end: train.py saves
            save_fn(result.next_step, "iter")
    result.loss_avg = loss_sum / max(steps, 1)
    if not result.stopped:
        check_bad_fraction(result.num_replaced, result.num_images, settings.max_bad_fraction, epoch)
    logger.info("epoch %d done: %d iterations, mean loss %.4f, %d/%d images replaced",
                epoch + 1, steps, result.loss_avg, result.num_replaced, result.num_images)
    return result


def _log_record(record: dict, tb_writer, metrics_path: str | None) -> None:
    tb_writer.scalars({f"train/{k}": v for k, v in record.items() if k not in ("step", "epoch")},
                      record["step"])
    if metrics_path and sdist.is_main_process():
        clean = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None)
                 for k, v in record.items()}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def checkpoint_state(*, model_without_ddp, optimizer, scaler, epoch: int, step: int, config: dict,
                     arch: str, backbone: str, schedule: dict, rng: list) -> dict:
    """The pretraining checkpoint (layout in docs/pretrain.md): a plain dict, ``weights_only``-loadable.

    Args:
        epoch: completed epochs (``step // iters_per_epoch``).
        step: completed iterations; the next run starts at this global step.
        config: the resolved configuration as a plain dict.
        schedule: ``{"iters_per_epoch", "total_iters", "warmup_iters", "peak_lr", ...}``.
        rng: per-rank RNG states (index = rank), from ``socokit.checkpoint.capture_rng_state``.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "backbone": backbone,
        "model": model_without_ddp.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "config": config,
        "schedule": schedule,
        "rng": rng,
        "pixel": dict(PIXEL_CONVENTION),
    }
