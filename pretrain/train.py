"""SoCo pretraining: ``torchrun pretrain/train.py --config pretrain/configs/<recipe>.yaml``.

Also runs as plain ``python pretrain/train.py ...`` on one device. Every option is declared
once in :mod:`pretrain.config` (name, type, default, help, allowed values); a YAML recipe
(``--config``) supplies values and the command line overrides it; the merged configuration is
validated before anything is built (``--print-config`` prints it and exits). The resolved
configuration is written to ``OUTPUT_DIR/config.yaml`` and stored in every checkpoint. See
``docs/pretrain.md``.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # check the configuration before importing torch: a bad value fails fast
    from pretrain.config import PretrainConfig
    from socokit.config import parse_config_or_exit
    parse_config_or_exit(PretrainConfig, sys.argv[1:])

import json
import logging
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pretrain.config import PretrainConfig, PretrainOptimConfig
from pretrain.data import build_pretrain_dataset
from pretrain.engine import CHECKPOINT_FORMAT, LoopSettings, checkpoint_state, train_one_epoch
from pretrain.models import build_model
from pretrain.optim import build_optimizer
from pretrain.schedules import lr_schedule, momentum_schedule, scaled_lr
from socokit import distributed as sdist
from socokit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from socokit.config import build_parser as build_config_parser
from socokit.config import config_to_dict, parse_config_or_exit, save_config
from socokit.errors import (CheckpointError, ConfigError, NonFiniteLossError, SocoError, TooManyBadImagesError,
                            UnreadableImagesError, exit_on_user_error)
from socokit.fileio import atomic_save_json, check_writable_dir
from socokit.log import setup_logging
from socokit.preemption import REQUEUE_EXIT_CODE, Preempted, watcher_from_args
from socokit.retention import Retention
from socokit.resume import (ResumableDistributedSampler, ResumeError, check_schedule, gather_rng_states,
                            restore_rank_rng)
from socokit.training import (ProgressMeter, TensorboardWriter, make_grad_scaler, resolve_amp, seed_everything,
                              seed_worker)


#: The configuration class of this entry point (sections, options, validation).
CONFIG = PretrainConfig


def build_parser():
    """The argparse parser of every option (from :class:`pretrain.config.PretrainConfig`)."""
    return build_config_parser(PretrainConfig)


def check_inputs(cfg: PretrainConfig) -> None:
    """Fail early, naming the missing path, instead of deep inside the data loader."""
    if not cfg.run.data or (not cfg.run.proposals and cfg.model.arch != "BYOL"):
        raise SystemExit(
            "error: --data (image root) and --proposals (proposal store) are required. Make the "
            "store with selective_search/generate_proposals.py and selective_search/"
            "filter_proposals.py --strategy ratio3size0308 --post (see docs/pretrain.md)")
    if not os.path.isdir(cfg.run.data):
        raise SystemExit(f"error: --data {cfg.run.data!r} is not a folder")
    if cfg.run.proposals and not os.path.isdir(cfg.run.proposals):
        raise SystemExit(f"error: --proposals {cfg.run.proposals!r} is not a proposal store folder")


def build_loader(cfg: PretrainConfig, info: sdist.DistInfo):
    """Dataset, resumable distributed sampler and DataLoader (drop_last).

    Every sample's randomness comes from ``(seed, epoch, index)`` (the sampler's ``SampleKey``),
    so neither the number of workers nor a resume changes what a sample looks like.

    Raises:
        socokit.errors.SocoError: the dataset cannot be built (bad image root or store), or it
            has fewer images than one iteration needs.
    """
    dataset = build_pretrain_dataset(cfg.run.data, cfg.run.proposals, cfg.data, arch=cfg.model.arch)
    sampler = ResumableDistributedSampler(dataset, info.world_size, info.rank, seed=cfg.run.seed)
    # The loader's own generator draws the workers' base seed, so loading never consumes the
    # global torch RNG (restored on resume).
    generator = torch.Generator().manual_seed(cfg.run.seed + info.rank)
    loader = DataLoader(dataset, batch_size=cfg.optim.batch_size, sampler=sampler,
                        num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda",
                        drop_last=True, persistent_workers=cfg.data.num_workers > 0,
                        worker_init_fn=seed_worker, generator=generator)
    if len(loader) == 0:
        raise ConfigError(f"batch_size: {len(dataset)} images are fewer than one iteration needs "
                          f"(batch size {cfg.optim.batch_size} x {info.world_size} processes)", "batch_size",
                          cfg.optim.batch_size)
    return loader, sampler


def build_training_model(cfg: PretrainConfig, info: sdist.DistInfo, logger) -> nn.Module:
    """The unwrapped model on its device; SyncBN on CUDA with more than one process."""
    seed_everything(cfg.run.seed)  # identical init on every rank, whatever DDP broadcasts
    model = build_model(cfg.model.arch, **cfg.model.model_kwargs())
    model.to(info.device)
    if cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.model.sync_bn and info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        logger.info("SyncBatchNorm over %d processes", info.world_size)
    elif info.world_size == 1:
        logger.warning("one process: BatchNorm statistics are per-process (batch %d), not global "
                       "over the original's 16 GPUs", cfg.optim.batch_size)
    else:
        logger.warning("SyncBatchNorm needs CUDA (or --no-sync-bn was given): each process "
                       "normalises with its own batch statistics")
    model.train()
    return model


def wrap_ddp(model: nn.Module, info: sdist.DistInfo) -> nn.Module:
    """DDP without buffer broadcast (BN buffers stay per-process, as the original)."""
    if not info.distributed:
        return model
    device_ids = [info.device] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                   find_unused_parameters=False)


#: schedule values a resumed run must share with its checkpoint.
SCHEDULE_KEYS = ("iters_per_epoch", "total_iters", "warmup_iters", "peak_lr")


def make_schedule(optim: PretrainOptimConfig, world_size: int, iters_per_epoch: int):
    """Per-iteration LR and EMA-momentum arrays plus the numbers that define them."""
    total_iters = iters_per_epoch * optim.epochs
    warmup_iters = iters_per_epoch * optim.warmup_epoch
    peak_lr = scaled_lr(optim.base_lr, optim.batch_size * world_size)
    schedule = {"iters_per_epoch": iters_per_epoch, "total_iters": total_iters,
                "warmup_iters": warmup_iters, "peak_lr": peak_lr,
                "total_batch": optim.batch_size * world_size, "world_size": world_size}
    lr_values = lr_schedule(peak_lr, total_iters, warmup_iters, optim.warmup_multiplier, optim.eta_min)
    momentum_values = momentum_schedule(optim.contrast_momentum, total_iters)
    return schedule, lr_values, momentum_values


def resume_from(path: str, *, cfg: PretrainConfig, model, optimizer, scaler, schedule: dict, info, logger) -> int:
    """Load a checkpoint into the unwrapped model, optimiser and scaler; return its step.

    Follows the resume policy of :mod:`socokit.resume`: the schedule must be the same, each
    rank's RNG states are restored (reseeded when the world size changed).

    Raises:
        SystemExit: the file is unreadable, not a pretraining checkpoint of this arch/backbone,
            or its schedule (iterations per epoch, total and warmup iterations, peak LR)
            differs from this run's.
    """
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"error: cannot resume: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    if (ckpt["arch"], ckpt["backbone"]) != (cfg.model.arch, cfg.model.backbone):
        raise SystemExit(f"error: {path} holds {ckpt['arch']}/{ckpt['backbone']}, this run is "
                         f"{cfg.model.arch}/{cfg.model.backbone}")
    try:
        check_schedule(ckpt.get("schedule"), {k: schedule[k] for k in SCHEDULE_KEYS}, path,
                       "resume with the same total batch (batch size x world size), epochs and "
                       "learning rate, or start a new --output-dir")
    except ResumeError as e:
        raise SystemExit(f"error: {e}") from None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    restore_rank_rng(ckpt.get("rng"), rank=info.rank, world_size=info.world_size, seed=cfg.run.seed,
                     step=int(ckpt["step"]), logger=logger)
    return int(ckpt["step"])


def make_saver(*, cfg: PretrainConfig, model, optimizer, scaler, schedule: dict, info, logger):
    """``save(next_step, kind)``: every rank gathers RNG states, rank 0 writes atomically."""
    ipe = schedule["iters_per_epoch"]

    config = config_to_dict(cfg)
    def save(next_step: int, kind: str) -> None:
        rng = gather_rng_states()
        if not info.is_main:
            return
        epoch = next_step // ipe
        name = f"ckpt_epoch_{epoch:04d}.pth" if next_step % ipe == 0 else "ckpt_iter.pth"
        state = checkpoint_state(model_without_ddp=model, optimizer=optimizer, scaler=scaler,
                                 epoch=epoch, step=next_step, config=config, arch=cfg.model.arch,
                                 backbone=cfg.model.backbone, schedule=schedule, rng=rng)
        save_checkpoint(state, cfg.run.output_dir, name, retention=Retention(
            "ckpt_epoch_", cfg.run.keep_last, cfg.run.keep_every, stale=("ckpt_iter.pth",)))
        logger.info("saved %s (%s, step %d) -> current.pth", name, kind, next_step)

    return save


def run(cfg: PretrainConfig, info: sdist.DistInfo, logger: logging.Logger) -> None:
    """Build everything from ``cfg`` and train until the end (or ``--stop-at-step``)."""
    try:
        amp = resolve_amp(cfg.run.amp, info.device)
    except ValueError as e:
        raise ConfigError(f"amp: {e}", "amp", cfg.run.amp) from None
    if info.is_main:
        save_config(cfg, os.path.join(cfg.run.output_dir, "config.yaml"))
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loader, sampler = build_loader(cfg, info)
    model = build_training_model(cfg, info, logger)
    optimizer = build_optimizer(model, lr=0.0, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                                trust_coef=cfg.optim.trust_coef, eps=cfg.optim.lars_eps, optimizer=cfg.optim.optimizer)
    scaler = make_grad_scaler(info.device, amp)
    schedule, lr_values, momentum_values = make_schedule(cfg.optim, info.world_size, len(loader))
    schedule["amp"] = amp
    ipe, total = schedule["iters_per_epoch"], schedule["total_iters"]
    logger.info("%s/%s: %d processes x %d = %d images/iteration, peak lr %.4g, %d iterations/epoch, "
                "%d iterations, amp %s", cfg.model.arch, cfg.model.backbone, info.world_size, cfg.optim.batch_size,
                schedule["total_batch"], schedule["peak_lr"], ipe, total, amp)
    resume_path = cfg.run.resume or (latest_checkpoint(cfg.run.output_dir) if cfg.run.auto_resume else None)
    seed_everything(cfg.run.seed, info.rank)
    start_step = 0
    if resume_path:
        start_step = resume_from(resume_path, cfg=cfg, model=model, optimizer=optimizer,
                                 scaler=scaler, schedule=schedule, info=info, logger=logger)
        logger.info("resumed from %s at step %d (epoch %d, lr %.4g, tau %.6f)", resume_path,
                    start_step, start_step // ipe, lr_values[min(start_step, total - 1)],
                    momentum_values[min(start_step, total - 1)])
    ddp_model = wrap_ddp(model, info)
    save = make_saver(cfg=cfg, model=model, optimizer=optimizer, scaler=scaler,
                      schedule=schedule, info=info, logger=logger)
    settings = LoopSettings(device=info.device, amp=amp, channels_last=cfg.run.channels_last,
                            print_freq=cfg.run.print_freq, save_every_iters=cfg.run.save_every_iters,
                            max_bad_fraction=cfg.data.max_bad_fraction, stop_at_step=cfg.run.stop_at_step,
                            metrics_path=os.path.join(cfg.run.output_dir, "metrics.jsonl"))
    with watcher_from_args(cfg.run, info.device) as settings.preemption:
        train_epochs(cfg, loader=loader, sampler=sampler, ddp_model=ddp_model, model=model,
                     optimizer=optimizer, scaler=scaler, lr_values=lr_values,
                     momentum_values=momentum_values, start_step=start_step, save=save,
                     settings=settings, logger=logger)
    sdist.barrier()


def train_epochs(cfg: PretrainConfig, *, loader, sampler, ddp_model, model, optimizer, scaler, lr_values,
                 momentum_values, start_step: int, save, settings: LoopSettings, logger) -> int:
    """The epoch loop from global step ``start_step``; saves at the save points. Returns the
    number of completed iterations."""
    ipe = len(lr_values) // cfg.optim.epochs
    progress = ProgressMeter(len(lr_values), cfg.run.print_freq, logger)
    tb_writer = TensorboardWriter(cfg.run.output_dir, enabled=cfg.run.tensorboard)
    try:
        for epoch in range(start_step // ipe, cfg.optim.epochs):
            if cfg.run.stop_at_step and start_step >= cfg.run.stop_at_step:
                break
            sampler.set_epoch(epoch)
            first_step = max(start_step, epoch * ipe)
            sampler.set_start((first_step - epoch * ipe) * cfg.optim.batch_size)  # mid-epoch resume
            result = train_one_epoch(
                model=ddp_model, model_without_ddp=model, loader=loader, optimizer=optimizer,
                scaler=scaler, lr_values=lr_values, momentum_values=momentum_values, epoch=epoch,
                first_step=first_step, settings=settings, progress=progress,
                tb_writer=tb_writer, logger=logger, save_fn=save)
            start_step = result.next_step
            at_save_point = ((epoch + 1) % cfg.run.save_freq == 0 or epoch + 1 == cfg.optim.epochs or
                             (cfg.run.save_every_iters and start_step % cfg.run.save_every_iters == 0))
            if result.stopped or at_save_point:
                save(start_step, "signal" if result.preempted else "stop" if result.stopped else "epoch")
            if result.preempted:
                raise Preempted(settings.preemption.received, start_step)
            if result.stopped:
                logger.info("stopped at step %d (--stop-at-step)", start_step)
                break
    finally:
        tb_writer.close()
    return start_step


def _report_failure(cfg: PretrainConfig, info, logger, kind: str, err: Exception) -> None:
    logger.error("%s: %s", kind, err)
    if info.is_main:
        atomic_save_json({"error": kind, "message": str(err)}, os.path.join(cfg.run.output_dir, "failure.json"))


@exit_on_user_error
def main(argv=None) -> None:
    cfg = parse_config_or_exit(PretrainConfig, argv)
    check_inputs(cfg)
    info = sdist.init_distributed(cfg.run.device, cfg.run.dist_timeout)
    if info.is_main:
        check_writable_dir(cfg.run.output_dir)
    sdist.barrier()
    logger = setup_logging(cfg.run.output_dir, info.rank)
    logger.info("command: %s", " ".join(sys.argv if argv is None else ["pretrain/train.py", *argv]))
    logger.info("config: %s", json.dumps(config_to_dict(cfg), sort_keys=True))
    try:
        run(cfg, info, logger)
    except NonFiniteLossError as e:
        _report_failure(cfg, info, logger, "non-finite loss", e)
        raise SystemExit(f"error: {e}") from None
    except (TooManyBadImagesError, UnreadableImagesError) as e:
        _report_failure(cfg, info, logger, "too many bad images", e)
        raise SystemExit(f"error: {e}") from None
    except SocoError as e:
        logger.error("%s", e)
        raise
    except Preempted as e:
        logger.warning("%s", e)
        raise SystemExit(REQUEUE_EXIT_CODE) from None
    finally:
        sdist.cleanup_distributed()


if __name__ == "__main__":
    main()
