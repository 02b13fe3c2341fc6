"""Iteration-based training loop and evaluation for detector fine-tuning.

One *iteration* is one optimizer step of ``batch_size x world_size x accum_steps`` images.
The learning rate is a pure function of the iteration (:meth:`transfer.solver.Schedule.lr_at`) and the
data stream a pure function of the stream position (:class:`transfer.data.InfiniteSampler`),
so ``--auto-resume`` continues the very same schedule.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from socokit import distributed as sdist
from socokit.checkpoint import save_checkpoint
from socokit.resume import gather_rng_states
from socokit.fileio import atomic_save_json
from socokit.log import get_logger
from socokit.preemption import Preempted
from socokit.training import ProgressMeter, autocast_context, check_finite
from transfer.evaluation import run_inference
from transfer.models.norms import set_norm_eval
from transfer.solver import Schedule, precise_bn

logger = get_logger("soco.finetune")
TARGET_KEYS = ("boxes", "labels", "masks")


@dataclass(kw_only=True)
class TrainState:
    """What the loop needs besides the model: schedule, optimizer, AMP, bookkeeping.

    Attributes:
        schedule: iterations and LR at the actual total batch (:func:`transfer.solver.resolve_schedule`).
        accum_steps: micro-batches per optimizer step.
        amp: "none", "bf16" or "fp16" (resolved).
        norm_eval: BN layers stay in eval mode while training.
        clip_grad: gradient-norm clip (0 = off).
        iteration: optimizer steps done.
        extra: saved with every checkpoint (config, categories, pixel convention, ...).
    """

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    accum_steps: int = 1
    amp: str = "none"
    norm_eval: bool = False
    clip_grad: float = 0.0
    iteration: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def max_iter(self) -> int:
        return self.schedule.max_iter


def to_device(images, targets, device):
    """Move a batch to ``device`` (tensor target entries only)."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: t[k].to(device, non_blocking=True) for k in TARGET_KEYS if k in t} for t in targets]
    return images, targets


def set_train_mode(model: nn.Module, norm_eval: bool) -> None:
    model.train()
    if norm_eval:
        set_norm_eval(model)


def _no_sync(model, last_micro: bool):
    if last_micro or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def train_step(model, batches, state: TrainState, device) -> dict:
    """One optimizer step over ``accum_steps`` micro-batches. Returns the local loss dict."""
    lr = state.schedule.lr_at(state.iteration)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    logged = {}
    for k, (images, targets) in enumerate(batches):
        images, targets = to_device(images, targets, device)
        last = k == len(batches) - 1
        with _no_sync(model, last):
            with autocast_context(device, state.amp):
                loss_dict = model(images, targets)
                loss = sum(loss_dict.values()) / len(batches)
            scale = state.scaler.get_scale() if state.scaler.is_enabled() else None
            check_finite(loss, step=state.iteration, lr=lr, scale=scale)
            state.scaler.scale(loss).backward()
        for name, v in loss_dict.items():
            logged[name] = logged.get(name, 0.0) + v.detach().float() / len(batches)
    if state.clip_grad > 0:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), state.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    logged["loss"] = sum(logged.values())
    logged["lr"] = lr
    return logged


def checkpoint_state(model_without_ddp: nn.Module, state: TrainState, rng: list) -> dict:
    """A plain-dict checkpoint (``weights_only`` loadable).

    Args:
        rng: every rank's RNG states (index = rank), from ``socokit.resume.gather_rng_states``.
    """
    return {"format": "soco-finetune", "version": 1, "model": model_without_ddp.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scaler": state.scaler.state_dict(),
            "iteration": state.iteration, "rng": rng, **state.extra}


def evaluate(model_without_ddp, loader, evaluator, device, amp: str, output_dir: str | None,
             iteration: int) -> dict:
    """Run the evaluation, log it and (rank 0) write ``metrics.json`` + a per-iteration copy."""
    start = time.time()
    metrics = run_inference(model_without_ddp, loader, evaluator, device,
                            lambda: autocast_context(device, amp))
    metrics = {"iteration": iteration, "units": "percent", **metrics,
               "eval_seconds": round(time.time() - start, 2)}
    if output_dir and sdist.is_main_process():
        atomic_save_json(metrics, os.path.join(output_dir, "metrics.json"))
        atomic_save_json(metrics, os.path.join(output_dir, "eval", f"metrics_{iteration:07d}.json"))
    for task in ("bbox", "segm"):
        if metrics.get(task):
            logger.info("iter %d %s: %s", iteration, task, "  ".join(
                f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in metrics[task].items()))
    return metrics


def _save(model_without_ddp, state: TrainState, output_dir, name, retention) -> None:
    """Every rank gives its RNG state; rank 0 writes ``name`` (None: only ``current.pth``) and
    ``current.pth``, then prunes with ``retention``; every rank waits for it."""
    rng = gather_rng_states()  # every rank takes part
    if sdist.is_main_process():
        save_checkpoint(checkpoint_state(model_without_ddp, state, rng), output_dir, name,
                        retention=retention)
    sdist.barrier()


def _after_step(model, model_without_ddp, state: TrainState, device, output_dir, eval_fn,
                eval_period, checkpoint_period, tb, precise_bn_batches, retention=None):
    """Precise BN → checkpoint → evaluation, at their periods and at the end.

    Every evaluation comes after a save of the weights it scores (at least ``current.pth``), so
    an evaluation that fails never costs the training before it.
    """
    done = state.iteration == state.max_iter
    eval_now = eval_fn is not None and ((eval_period and state.iteration % eval_period == 0) or done)
    if eval_now and precise_bn_batches is not None:
        used = precise_bn(model, precise_bn_batches(state.iteration),
                          lambda b: model(*to_device(*b, device)))
        logger.info("precise BN: statistics recomputed over %d batches", used)
    periodic = bool(checkpoint_period and state.iteration % checkpoint_period == 0)
    if periodic or done or eval_now:
        name = "model_final.pth" if done else (f"model_{state.iteration:07d}.pth" if periodic else None)
        _save(model_without_ddp, state, output_dir, name, retention)
    if not eval_now:
        return None
    metrics = eval_fn(state.iteration)
    if tb is not None:
        tb.scalars({f"{task}/{k}": v for task in ("bbox", "segm") if metrics.get(task)
                    for k, v in metrics[task].items() if v is not None}, state.iteration)
    set_train_mode(model, state.norm_eval)
    return metrics


def train(model, model_without_ddp, loader, state: TrainState, device, *, output_dir: str,
          eval_fn=None, eval_period: int = 0, checkpoint_period: int = 0, print_freq: int = 20,
          tb=None, precise_bn_batches=None, retention=None, preemption=None) -> dict | None:
    """Run optimizer steps ``state.iteration .. state.max_iter - 1``.

    Args:
        model: the (DDP-wrapped) model used for the forward/backward.
        model_without_ddp: the unwrapped model (checkpoints, evaluation).
        loader: endless loader of micro-batches.
        eval_fn: callable(iteration) → metrics, run every ``eval_period`` steps and at the end.
        checkpoint_period: save every this many steps (and always at the end).
        tb: :class:`socokit.training.TensorboardWriter` or None.
        precise_bn_batches: optional callable(iteration) → list of batches on which BN
            statistics are recomputed before each evaluation (its own data stream, so the
            training stream, and therefore resume, is unaffected).
        retention: :class:`socokit.retention.Retention` applied after every save (None: keep
            every ``model_<iteration>.pth``).
        preemption: :class:`socokit.preemption.PreemptionWatcher` asked after every step; on a
            signal the loop saves and raises :class:`socokit.preemption.Preempted`.

    Returns:
        The last metrics (or None without ``eval_fn``).
    """
    set_train_mode(model, state.norm_eval)
    world = sdist.get_world_size()
    progress = ProgressMeter(state.max_iter, print_freq, logger, header="train ")
    data = iter(loader)
    metrics = None
    while state.iteration < state.max_iter:
        batches = [next(data) for _ in range(state.accum_steps)]
        logged = train_step(model, batches, state, device)
        it = state.iteration
        state.iteration += 1
        progress.update(it, batch_images=sum(len(b[0]) for b in batches), **logged)
        if tb is not None and (state.iteration % print_freq == 0 or state.iteration == state.max_iter):
            tb.scalars({f"train/{k}": v for k, v in logged.items()}, state.iteration)
            tb.scalars({"train/images_per_s": progress.images.median * world}, state.iteration)
        out = _after_step(model, model_without_ddp, state, device, output_dir, eval_fn, eval_period,
                          checkpoint_period, tb, precise_bn_batches, retention)
        metrics = out if out is not None else metrics
        if state.iteration < state.max_iter and preemption is not None and preemption.requested():
            if not (checkpoint_period and state.iteration % checkpoint_period == 0):
                _save(model_without_ddp, state, output_dir, f"model_{state.iteration:07d}.pth",
                      retention)
            raise Preempted(preemption.received, state.iteration)
    return metrics
