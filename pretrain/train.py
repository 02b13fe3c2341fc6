"""SoCo pretraining: ``torchrun pretrain/train.py --config pretrain/configs/<recipe>.yaml``.

Also runs as plain ``python pretrain/train.py ...`` on one device. The argparse parser below
is the single source of truth for option names, types and help; a YAML recipe (``--config``)
supplies defaults and the command line overrides it. The resolved configuration is written to
``OUTPUT_DIR/config.yaml`` and stored in every checkpoint. See ``docs/pretrain.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pretrain.data import AUGS, UnreadableImagesError, build_pretrain_dataset
from pretrain.engine import (CHECKPOINT_FORMAT, LoopSettings, TooManyBadImagesError, checkpoint_state,
                             train_one_epoch)
from pretrain.models import ARCHS, build_model
from pretrain.models.base import HEAD_MODES
from pretrain.models.soco_fpn import ROI_LEVEL_MODES
from pretrain.optim import build_optimizer
from pretrain.schedules import lr_schedule, momentum_schedule, scaled_lr
from socokit import distributed as sdist
from socokit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from socokit.config import add_config_argument, config_to_dict, parse_args_with_config, save_config
from socokit.fileio import CheckpointError, atomic_save_json, check_writable_dir
from socokit.log import setup_logging
from socokit.preemption import (REQUEUE_EXIT_CODE, Preempted, add_preemption_args,
                                watcher_from_args)
from socokit.proposal_store import StoreError
from socokit.retention import Retention, add_retention_args
from socokit.resume import (ResumableDistributedSampler, ResumeError, check_schedule, gather_rng_states,
                            restore_rank_rng)
from socokit.training import (AMP_MODES, NonFiniteLossError, ProgressMeter, TensorboardWriter,
                              make_grad_scaler, resolve_amp, seed_everything, seed_worker)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="image root the proposal store's relative paths refer to "
                   "(e.g. ImageNet train/)")
    g.add_argument("--proposals", default=None, help="proposal store folder NAME.proposals/ made by "
                   "selective_search/generate_proposals.py + filter_proposals.py --post")
    g.add_argument("--aug", default=None, choices=AUGS, help="view pipeline (original names); "
                   "default: the one the arch's released script used")
    g.add_argument("--image-size", type=int, default=224, help="V1/V2 size (V3 = half of it for FPN)")
    g.add_argument("--image3-size", type=int, default=None, help="V3 size of SoCo_FPN_Star (192)")
    g.add_argument("--image4-size", type=int, default=112, help="V4 size of SoCo_FPN_Star")
    g.add_argument("--crop", type=float, default=0.5, help="min area fraction of the random crops "
                   "(0.5 FPN, 0.6 C4)")
    g.add_argument("--select-k", type=int, default=4, help="proposals drawn per image (K)")
    g.add_argument("--padding-k", type=int, default=4, help="box rows per view after padding (L)")
    g.add_argument("--max-tries", type=int, default=5, help="crop re-draws when too few proposals overlap")
    g.add_argument("--jitter-prob", type=float, default=0.5, help="probability of jittering a V1 box")
    g.add_argument("--jitter-ratio", type=float, default=0.1, help="box jitter amplitude (fraction of w/h)")
    g.add_argument("--cutout-prob", type=float, default=0.5, help="per-box cutout probability (…Cutout augs)")
    g.add_argument("--cutout-ratio-min", type=float, default=0.1, help="min cutout area / box area")
    g.add_argument("--cutout-ratio-max", type=float, default=0.3, help="max cutout area / box area")
    g.add_argument("--aware-range", type=int, nargs="+", default=[48, 96, 192, 224, 0],
                   help="box-size thresholds (pixels) of the FPN levels P2..P5 (a list)")
    g.add_argument("--aware-start", type=int, default=0, help="first FPN level used")
    g.add_argument("--aware-end", type=int, default=4, help="one past the last FPN level used")
    g.add_argument("--max-replace-tries", type=int, default=10,
                   help="how many other images to try when an image cannot be read")
    g.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop when more than this fraction of an epoch's images was unreadable")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    g.add_argument("--colour-on-device", action="store_true",
                   help="loader workers only decode, crop, resize and flip; the colour "
                   "augmentations (drawn per sample on the CPU) run on the batch on the device")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="SoCo_FPN", choices=list(ARCHS), help="pretraining method")
    g.add_argument("--backbone", default="resnet50",
                   help="torchvision ResNet name or timm:<name> (e.g. timm:resnet18 for CPU demos)")
    g.add_argument("--head-mode", default="faithful", choices=HEAD_MODES,
                   help="faithful: one head/MLP call per (view, box set, level) as the original; "
                        "batched: one call with per-group BN statistics (same math, faster)")
    g.add_argument("--roi-levels", default="all", choices=ROI_LEVEL_MODES,
                   help="FPN only. all: pool every box at every level and mask (original); "
                        "assigned: pool only matched levels (about 4x less head work, changes BN stats)")
    g.add_argument("--output-size", type=int, default=7, choices=[7],
                   help="RoIAlign size of the FPN head; fixed at 7 (the box head's fc expects 7x7)")
    g.add_argument("--fpn-channels", type=int, default=256, help="FPN only: FPN width")
    g.add_argument("--conv-dim", type=int, default=256, help="FPN only: box-head conv width")
    g.add_argument("--fc-dim", type=int, default=1024, help="FPN only: box-head fc width")
    g.add_argument("--mlp-hidden-dim", type=int, default=4096, help="projector/predictor hidden width")
    g.add_argument("--out-dim", type=int, default=256, help="projector/predictor output width")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="SyncBatchNorm across processes on CUDA (the original); ignored on CPU")


def _add_optim_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="lars", choices=["lars", "sgd"], help="LARS (original) or SGD")
    g.add_argument("--base-lr", type=float, default=1.0, help="LR for a total batch of 256; the peak "
                   "LR is base_lr * batch_size * world_size / 256. Lower it if the loss diverges")
    g.add_argument("--batch-size", type=int, default=128, help="images per process per iteration")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--warmup-epoch", type=int, default=10, help="linear warmup epochs")
    g.add_argument("--warmup-multiplier", type=float, default=100.0,
                   help="warmup starts at peak_lr / warmup_multiplier")
    g.add_argument("--eta-min", type=float, default=1e-6, help="final LR of the cosine")
    g.add_argument("--weight-decay", type=float, default=1e-5, help="decay of conv/linear weights")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--trust-coef", type=float, default=1e-3, help="LARS trust coefficient eta")
    g.add_argument("--lars-eps", type=float, default=1e-8, help="LARS epsilon")
    g.add_argument("--contrast-momentum", type=float, default=0.99,
                   help="initial EMA momentum tau0 of the target (cosine to 1)")


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--output-dir", default="output/pretrain", help="checkpoints, logs, TensorBoard")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", default="auto", choices=AMP_MODES,
                   help="mixed precision; auto = bf16 on CUDA if supported (else fp16), none on CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels-last memory format (faster convs on recent GPUs)")
    g.add_argument("--seed", type=int, default=0, help="base seed (rank r uses seed + r)")
    g.add_argument("--auto-resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUTPUT_DIR/current.pth if present")
    g.add_argument("--resume", default=None, help="continue from this checkpoint instead")
    g.add_argument("--save-freq", type=int, default=1, help="checkpoint every N epochs (and at the end)")
    g.add_argument("--save-every-iters", type=int, default=0,
                   help="also checkpoint every N iterations inside an epoch (0: off)")
    add_retention_args(g, "epochs")
    sdist.add_launch_args(g)
    add_preemption_args(g)
    g.add_argument("--stop-at-step", type=int, default=0,
                   help="stop with a checkpoint after this many iterations; the schedule is "
                        "unchanged, so a later --auto-resume run continues (0: run to the end)")
    g.add_argument("--print-freq", type=int, default=100, help="log every N iterations")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="write TensorBoard scalars to OUTPUT_DIR/tb")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SoCo / BYOL pretraining (torchrun or plain python).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_argument(parser)
    _add_data_args(parser)
    _add_model_args(parser)
    _add_optim_args(parser)
    _add_runtime_args(parser)
    return parser


def check_inputs(args: argparse.Namespace) -> None:
    """Fail early, naming the missing path, instead of deep inside the data loader."""
    if not args.data or (not args.proposals and args.arch != "BYOL"):
        raise SystemExit(
            "error: --data (image root) and --proposals (proposal store) are required. Make the "
            "store with selective_search/generate_proposals.py and selective_search/"
            "filter_proposals.py --strategy ratio3size0308 --post (see docs/pretrain.md)")
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: --data {args.data!r} is not a folder")
    if args.proposals and not os.path.isdir(args.proposals):
        raise SystemExit(f"error: --proposals {args.proposals!r} is not a proposal store folder")
    if args.output_size != 7:
        raise SystemExit("error: --output-size is fixed at 7 (the box head's fc expects 7x7 RoIs)")


def _build_dataset(args: argparse.Namespace):
    return build_pretrain_dataset(
        args.data, args.proposals, arch=args.arch, aug=args.aug, image_size=args.image_size,
        image3_size=args.image3_size, image4_size=args.image4_size, crop_scale_min=args.crop,
        select_k=args.select_k, padding_k=args.padding_k, max_tries=args.max_tries,
        jitter_prob=args.jitter_prob, jitter_ratio=args.jitter_ratio, cutout_prob=args.cutout_prob,
        cutout_ratio=(args.cutout_ratio_min, args.cutout_ratio_max),
        aware_range=tuple(args.aware_range), aware_start=args.aware_start,
        aware_end=args.aware_end, max_replace_tries=args.max_replace_tries,
        colour_on_device=args.colour_on_device)


def build_loader(args: argparse.Namespace, info: sdist.DistInfo):
    """Dataset, resumable distributed sampler and DataLoader (drop_last).

    Every sample's randomness comes from ``(seed, epoch, index)`` (the sampler's ``SampleKey``),
    so neither the number of workers nor a resume changes what a sample looks like.
    """
    try:
        dataset = _build_dataset(args)
    except (ValueError, FileNotFoundError, StoreError) as e:
        raise SystemExit(f"error: cannot build the dataset from --data {args.data!r} and "
                         f"--proposals {args.proposals!r}: {e}") from None
    sampler = ResumableDistributedSampler(dataset, info.world_size, info.rank, seed=args.seed)
    # The loader's own generator draws the workers' base seed, so loading never consumes the
    # global torch RNG (restored on resume).
    generator = torch.Generator().manual_seed(args.seed + info.rank)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=info.device.type == "cuda",
                        drop_last=True, persistent_workers=args.num_workers > 0,
                        worker_init_fn=seed_worker, generator=generator)
    if len(loader) == 0:
        raise SystemExit(
            f"error: {len(dataset)} images are fewer than one iteration needs "
            f"(batch size {args.batch_size} x {info.world_size} processes)")
    return loader, sampler


def build_training_model(args: argparse.Namespace, info: sdist.DistInfo, logger) -> nn.Module:
    """The unwrapped model on its device; SyncBN on CUDA with more than one process."""
    seed_everything(args.seed)  # identical init on every rank, whatever DDP broadcasts
    kwargs = {"mlp_hidden_dim": args.mlp_hidden_dim, "out_dim": args.out_dim}
    if args.arch.startswith("SoCo_FPN"):
        kwargs.update(fpn_channels=args.fpn_channels, conv_dim=args.conv_dim, fc_dim=args.fc_dim)
    try:
        model = build_model(args.arch, backbone=args.backbone, head_mode=args.head_mode,
                            roi_levels=args.roi_levels, **kwargs)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    model.to(info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        logger.info("SyncBatchNorm over %d processes", info.world_size)
    elif info.world_size == 1:
        logger.warning("one process: BatchNorm statistics are per-process (batch %d), not global "
                       "over the original's 16 GPUs", args.batch_size)
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


def make_schedule(args: argparse.Namespace, world_size: int, iters_per_epoch: int):
    """Per-iteration LR and EMA-momentum arrays plus the numbers that define them."""
    total_iters = iters_per_epoch * args.epochs
    warmup_iters = iters_per_epoch * args.warmup_epoch
    peak_lr = scaled_lr(args.base_lr, args.batch_size * world_size)
    schedule = {"iters_per_epoch": iters_per_epoch, "total_iters": total_iters,
                "warmup_iters": warmup_iters, "peak_lr": peak_lr,
                "total_batch": args.batch_size * world_size, "world_size": world_size}
    lr_values = lr_schedule(peak_lr, total_iters, warmup_iters, args.warmup_multiplier, args.eta_min)
    momentum_values = momentum_schedule(args.contrast_momentum, total_iters)
    return schedule, lr_values, momentum_values


def resume_from(path: str, *, args, model, optimizer, scaler, schedule: dict, info, logger) -> int:
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
    if (ckpt["arch"], ckpt["backbone"]) != (args.arch, args.backbone):
        raise SystemExit(f"error: {path} holds {ckpt['arch']}/{ckpt['backbone']}, this run is "
                         f"{args.arch}/{args.backbone}")
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
    restore_rank_rng(ckpt.get("rng"), rank=info.rank, world_size=info.world_size, seed=args.seed,
                     step=int(ckpt["step"]), logger=logger)
    return int(ckpt["step"])


def make_saver(*, args, config: dict, model, optimizer, scaler, schedule: dict, info, logger):
    """``save(next_step, kind)``: every rank gathers RNG states, rank 0 writes atomically."""
    ipe = schedule["iters_per_epoch"]

    def save(next_step: int, kind: str) -> None:
        rng = gather_rng_states()
        if not info.is_main:
            return
        epoch = next_step // ipe
        name = f"ckpt_epoch_{epoch:04d}.pth" if next_step % ipe == 0 else "ckpt_iter.pth"
        state = checkpoint_state(model_without_ddp=model, optimizer=optimizer, scaler=scaler,
                                 epoch=epoch, step=next_step, config=config, arch=args.arch,
                                 backbone=args.backbone, schedule=schedule, rng=rng)
        save_checkpoint(state, args.output_dir, name, retention=Retention(
            "ckpt_epoch_", args.keep_last, args.keep_every, stale=("ckpt_iter.pth",)))
        logger.info("saved %s (%s, step %d) -> current.pth", name, kind, next_step)

    return save


def run(args: argparse.Namespace, info: sdist.DistInfo, logger: logging.Logger) -> None:
    """Build everything from ``args`` and train until the end (or ``--stop-at-step``)."""
    try:
        amp = resolve_amp(args.amp, info.device)
    except ValueError as e:
        raise SystemExit(f"error: --amp: {e}") from None
    config = config_to_dict(args)
    if info.is_main:
        save_config(args, os.path.join(args.output_dir, "config.yaml"))
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loader, sampler = build_loader(args, info)
    model = build_training_model(args, info, logger)
    optimizer = build_optimizer(model, lr=0.0, weight_decay=args.weight_decay, momentum=args.momentum,
                                trust_coef=args.trust_coef, eps=args.lars_eps, optimizer=args.optimizer)
    scaler = make_grad_scaler(info.device, amp)
    schedule, lr_values, momentum_values = make_schedule(args, info.world_size, len(loader))
    schedule["amp"] = amp
    ipe, total = schedule["iters_per_epoch"], schedule["total_iters"]
    logger.info("%s/%s: %d processes x %d = %d images/iteration, peak lr %.4g, %d iterations/epoch, "
                "%d iterations, amp %s", args.arch, args.backbone, info.world_size, args.batch_size,
                schedule["total_batch"], schedule["peak_lr"], ipe, total, amp)
    resume_path = args.resume or (latest_checkpoint(args.output_dir) if args.auto_resume else None)
    seed_everything(args.seed, info.rank)
    start_step = 0
    if resume_path:
        start_step = resume_from(resume_path, args=args, model=model, optimizer=optimizer,
                                 scaler=scaler, schedule=schedule, info=info, logger=logger)
        logger.info("resumed from %s at step %d (epoch %d, lr %.4g, tau %.6f)", resume_path,
                    start_step, start_step // ipe, lr_values[min(start_step, total - 1)],
                    momentum_values[min(start_step, total - 1)])
    ddp_model = wrap_ddp(model, info)
    save = make_saver(args=args, config=config, model=model, optimizer=optimizer, scaler=scaler,
                      schedule=schedule, info=info, logger=logger)
    settings = LoopSettings(device=info.device, amp=amp, channels_last=args.channels_last,
                            print_freq=args.print_freq, save_every_iters=args.save_every_iters,
                            max_bad_fraction=args.max_bad_fraction, stop_at_step=args.stop_at_step,
                            metrics_path=os.path.join(args.output_dir, "metrics.jsonl"))
    with watcher_from_args(args, info.device) as settings.preemption:
        train_epochs(args, loader=loader, sampler=sampler, ddp_model=ddp_model, model=model,
                     optimizer=optimizer, scaler=scaler, lr_values=lr_values,
                     momentum_values=momentum_values, start_step=start_step, save=save,
                     settings=settings, logger=logger)
    sdist.barrier()


def train_epochs(args, *, loader, sampler, ddp_model, model, optimizer, scaler, lr_values,
                 momentum_values, start_step: int, save, settings: LoopSettings, logger) -> int:
    """The epoch loop from global step ``start_step``; saves at the save points. Returns the
    number of completed iterations."""
    ipe = len(lr_values) // args.epochs
    progress = ProgressMeter(len(lr_values), args.print_freq, logger)
    tb_writer = TensorboardWriter(args.output_dir, enabled=args.tensorboard)
    try:
        for epoch in range(start_step // ipe, args.epochs):
            if args.stop_at_step and start_step >= args.stop_at_step:
                break
            sampler.set_epoch(epoch)
            first_step = max(start_step, epoch * ipe)
            sampler.set_start((first_step - epoch * ipe) * args.batch_size)  # mid-epoch resume
            result = train_one_epoch(
                model=ddp_model, model_without_ddp=model, loader=loader, optimizer=optimizer,
                scaler=scaler, lr_values=lr_values, momentum_values=momentum_values, epoch=epoch,
                first_step=first_step, settings=settings, progress=progress,
                tb_writer=tb_writer, logger=logger, save_fn=save)
            start_step = result.next_step
            at_save_point = ((epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs or
                             (args.save_every_iters and start_step % args.save_every_iters == 0))
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


def _report_failure(args, info, logger, kind: str, err: Exception) -> None:
    logger.error("%s: %s", kind, err)
    if info.is_main:
        atomic_save_json({"error": kind, "message": str(err)}, os.path.join(args.output_dir, "failure.json"))


def main(argv=None) -> None:
    args = parse_args_with_config(build_parser(), argv)
    check_inputs(args)
    try:
        info = sdist.init_distributed(args.device, args.dist_timeout)
    except sdist.LaunchError as e:
        raise SystemExit(f"error: {e}") from None
    if info.is_main:
        check_writable_dir(args.output_dir)
    sdist.barrier()
    logger = setup_logging(args.output_dir, info.rank)
    logger.info("command: %s", " ".join(sys.argv if argv is None else ["pretrain/train.py", *argv]))
    logger.info("config: %s", json.dumps(config_to_dict(args), sort_keys=True))
    try:
        run(args, info, logger)
    except NonFiniteLossError as e:
        _report_failure(args, info, logger, "non-finite loss", e)
        raise SystemExit(f"error: {e}") from None
    except (TooManyBadImagesError, UnreadableImagesError) as e:
        _report_failure(args, info, logger, "too many bad images", e)
        raise SystemExit(f"error: {e}") from None
    except Preempted as e:
        logger.warning("%s", e)
        raise SystemExit(REQUEUE_EXIT_CODE) from None
    finally:
        sdist.cleanup_distributed()


if __name__ == "__main__":
    main()
