"""Linear evaluation of a pretraining checkpoint on an ImageNet-style labelled folder.

The original protocol (docs/method.md §5): the checkpoint's ONLINE backbone, frozen; global average
pooling; one linear layer trained with SGD (lr 30 per 256 images, momentum 0.9, weight decay 0),
100 epochs with a 5-epoch warmup from lr/100 and a per-iteration cosine to 1e-6, total batch 256;
RandomResizedCrop(224, scale 0.08-1) + flip for training, resize 256 + centre crop 224 for
validation; top-1 / top-5 all-reduced over processes after every epoch.

Fixes to the released ``main_linear.py`` (which could not run): validation works, and the frozen
backbone runs in eval mode, so its BatchNorm uses the pretrained running statistics and never
updates them (the original kept it in train mode; ``--bn-train`` reproduces that).

Run: ``torchrun --nproc_per_node 8 pretrain/linear_eval.py --pretrained CKPT --data IMAGENET``
with ``IMAGENET/train/<class>/*`` and ``IMAGENET/val/<class>/*``.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # check the configuration before importing torch: a bad value fails fast
    from pretrain.config import LinearEvalConfig
    from socokit.config import parse_config_or_exit
    parse_config_or_exit(LinearEvalConfig, sys.argv[1:])

import os

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets, transforms

from pretrain.config import LinearEvalConfig
from pretrain.schedules import lr_schedule, scaled_lr
from socokit import distributed as sdist
from socokit.backbones import (PIXEL_CONVENTION, build_c4_backbone, build_fpn_backbone,
                               build_res5_head)
from socokit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from socokit.config import build_parser as build_config_parser
from socokit.config import config_to_dict, parse_config_or_exit, save_config
from socokit.errors import CheckpointError, exit_on_user_error
from socokit.fileio import atomic_save_json, check_writable_dir
from socokit.images import ImageError, load_rgb
from socokit.log import setup_logging
from socokit.resume import (ResumableDistributedSampler, ResumeError, SampleKey, check_schedule,
                            gather_rng_states, restore_rank_rng)
from socokit.retention import Retention
from socokit.training import (ProgressMeter, autocast_context, resolve_amp, seed_everything,
                              seed_worker)

UNREADABLE = -1  # target of an unreadable image: ignored by the loss and the accuracy


#: The configuration class of this entry point (sections, options, validation).
CONFIG = LinearEvalConfig


def build_parser():
    """The argparse parser of every option (from :class:`pretrain.config.LinearEvalConfig`)."""
    return build_config_parser(LinearEvalConfig)


class FrozenBackbone(nn.Module):
    """The pretrained online backbone + global average pooling, frozen.

    Shape:
        images (Tensor[N, 3, H, W]) -> features (Tensor[N, C]) (C = 2048 for ResNet-50).
    """

    def __init__(self, body: nn.Module, res5: nn.Module | None = None, bn_train: bool = False):
        super().__init__()
        self.body = body
        self.res5 = res5
        self.bn_train = bn_train
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(mode and self.bn_train)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.body(images)
        last = list(feats.values())[-1] if isinstance(feats, dict) else feats[-1]
        if self.res5 is not None:
            last = self.res5(last)
        return torch.flatten(F.adaptive_avg_pool2d(last.float(), 1), 1)


def _sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_frozen_backbone(ckpt: dict, path: str, bn_train: bool = False) -> FrozenBackbone:
    """Build the online backbone of a soco-pretrain checkpoint and load it strictly.

    Raises:
        SystemExit: not a soco-pretrain checkpoint, or the backbone keys do not match.
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != "soco-pretrain":
        raise SystemExit(f"error: {path} is not a soco-pretrain checkpoint (format "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})")
    arch, backbone, state = ckpt["arch"], ckpt["backbone"], ckpt["model"]
    res5 = None
    if arch == "SoCo_C4":
        body = build_c4_backbone(backbone).body
        res5 = build_res5_head(backbone).res5
        parts = [(body, "online_backbone.body."), (res5, "online_box_head.res5.")]
    else:
        body = build_fpn_backbone(backbone).body
        parts = [(body, "online_backbone.body.")]
    for module, prefix in parts:
        sub = _sub_state(state, prefix)
        missing, unexpected = module.load_state_dict(sub, strict=False)
        if missing or unexpected or not sub:
            raise SystemExit(f"error: {path}: {prefix}* does not match a {backbone} backbone "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return FrozenBackbone(body, res5, bn_train)


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images become blank images with target ``UNREADABLE``.

    ``__getitem__`` takes an index or a :class:`socokit.resume.SampleKey`; with a key the
    (torch-RNG based) torchvision transforms draw from a generator seeded with
    ``(seed, epoch, index)``, so a training sample does not depend on the loader workers.
    """

    def __init__(self, root: str, transform, blank_size: int):
        super().__init__(root, transform=transform, loader=load_rgb)
        self.blank_size = blank_size

    def __getitem__(self, key):
        index = key.index if isinstance(key, SampleKey) else key
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except ImageError:
            img, target = Image.new("RGB", (self.blank_size, self.blank_size)), UNREADABLE
        if not isinstance(key, SampleKey):
            return self.transform(img), target
        with torch.random.fork_rng(devices=[]):  # leaves the caller's torch RNG untouched
            torch.manual_seed(key.seed_value())
            return self.transform(img), target


class ShardSampler(Sampler):
    """Every ``world``-th index starting at ``rank``: each image evaluated exactly once."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(cfg: LinearEvalConfig, info, pixel: dict):
    scale = 255.0 if pixel.get("range", 1.0) == 255 else 1.0
    norm = transforms.Normalize([m / scale for m in pixel["mean"]], [s / scale for s in pixel["std"]])
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(cfg.data.image_size, scale=(cfg.data.crop_scale_min, 1.0)),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(cfg.data.val_resize), transforms.CenterCrop(cfg.data.image_size),
                                 transforms.ToTensor(), norm])
    try:
        train_set = SafeImageFolder(os.path.join(cfg.data.data, "train"), train_tf, cfg.data.image_size)
        val_set = SafeImageFolder(os.path.join(cfg.data.data, "val"), val_tf, cfg.data.val_resize)
    except (FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: --data {cfg.data.data!r}: {e}") from None
    if train_set.class_to_idx != val_set.class_to_idx:
        raise SystemExit(f"error: {cfg.data.data}: train/ and val/ hold different class folders")
    sampler = ResumableDistributedSampler(train_set, info.world_size, info.rank, seed=cfg.run.seed)
    common = dict(num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda",
                  worker_init_fn=seed_worker, persistent_workers=cfg.data.num_workers > 0)
    train_loader = DataLoader(train_set, cfg.optim.batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.run.seed + info.rank), **common)
    val_sampler = ShardSampler(len(val_set), info.rank, info.world_size)
    val_loader = DataLoader(val_set, cfg.optim.batch_size, sampler=val_sampler, **common)
    if len(train_loader) == 0:
        raise SystemExit(f"error: {len(train_set)} training images are fewer than one iteration "
                         f"(batch {cfg.optim.batch_size} x {info.world_size} processes)")
    return train_loader, sampler, val_loader, len(train_set.classes)


@torch.no_grad()
def evaluate(backbone, fc, loader, device, amp: str) -> dict:
    """Top-1 / top-5 accuracy (%) over every process's shard, all-reduced."""
    backbone.eval()
    fc.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, valid, unreadable
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            feats = backbone(images)
        logits = fc(feats.float())
        valid = targets != UNREADABLE
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = topk == targets[:, None]
        counts += torch.stack([(hit[:, 0] & valid).sum(), (hit.any(1) & valid).sum(),
                               valid.sum(), (~valid).sum()]).double()
    counts = sdist.all_reduce_sum(counts)
    n = max(counts[2].item(), 1.0)
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n,
            "num_images": int(counts[2].item()), "unreadable": int(counts[3].item())}


def train_epoch(backbone, fc, loader, optimizer, lr_values, first_step: int, device, amp: str,
                progress) -> float:
    """One epoch of the linear layer; returns the mean loss of this process."""
    backbone.train()
    fc.train()
    total, n = 0.0, 0
    for i, (images, targets) in enumerate(loader):
        step = first_step + i
        for group in optimizer.param_groups:
            group["lr"] = float(lr_values[step])
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            feats = backbone(images)
        logits = fc(feats.float())
        valid = max(int((targets != UNREADABLE).sum()), 1)
        loss = F.cross_entropy(logits, targets, ignore_index=UNREADABLE, reduction="sum") / valid
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        total, n = total + value, n + 1
        progress.header = f"linear lr {lr_values[step]:.4g} "
        progress.update(step, batch_images=len(targets), loss=value)
    return total / max(n, 1)


def _resume(cfg: LinearEvalConfig, fc, optimizer, schedule: dict, info, logger) -> tuple[int, list]:
    """Continue from ``OUTPUT_DIR/current.pth`` under the policy of :mod:`socokit.resume`.

    Raises:
        SystemExit: unreadable file, not a linear-evaluation checkpoint, or another schedule.
    """
    path = latest_checkpoint(cfg.run.output_dir) if cfg.run.auto_resume else None
    if not path:
        return 0, []
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"error: cannot resume: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "soco-linear":
        raise SystemExit(f"error: {path} is not a linear-evaluation checkpoint")
    try:
        check_schedule(ckpt.get("schedule"), schedule, path,
                       "resume with the same total batch (batch size x world size), epochs and "
                       "learning rate, or start a new --output-dir")
    except ResumeError as e:
        raise SystemExit(f"error: {e}") from None
    fc.load_state_dict(ckpt["fc"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rank_rng(ckpt.get("rng"), rank=info.rank, world_size=info.world_size, seed=cfg.run.seed,
                     step=int(ckpt["epoch"]) * schedule["iters_per_epoch"], logger=logger)
    logger.info("resumed from %s after epoch %d", path, ckpt["epoch"])
    return int(ckpt["epoch"]), list(ckpt.get("history", []))


def run(cfg: LinearEvalConfig, info, logger) -> dict:
    try:
        ckpt = load_checkpoint(cfg.run.pretrained)
    except CheckpointError as e:
        raise SystemExit(f"error: --pretrained: {e}") from None
    backbone = load_frozen_backbone(ckpt, cfg.run.pretrained, cfg.run.bn_train).to(info.device)
    try:
        amp = resolve_amp(cfg.run.amp, info.device)
    except ValueError as e:
        raise SystemExit(f"error: --amp: {e}") from None
    train_loader, sampler, val_loader, num_classes = build_loaders(cfg, info, ckpt.get("pixel") or PIXEL_CONVENTION)
    with torch.no_grad():
        feat_dim = backbone(torch.zeros(1, 3, 64, 64, device=info.device)).shape[1]
    seed_everything(cfg.run.seed)  # the same fc init on every rank
    fc = nn.Linear(feat_dim, num_classes).to(info.device)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    seed_everything(cfg.run.seed, info.rank)
    optimizer = torch.optim.SGD(fc.parameters(), lr=0.0, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    ipe = len(train_loader)
    schedule = {"iters_per_epoch": ipe, "total_iters": ipe * cfg.optim.epochs,
                "warmup_iters": ipe * cfg.optim.warmup_epoch,
                "peak_lr": scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size * info.world_size)}
    lr_values = lr_schedule(schedule["peak_lr"], schedule["total_iters"], schedule["warmup_iters"],
                            cfg.optim.warmup_multiplier, cfg.optim.eta_min)
    start_epoch, history = _resume(cfg, fc, optimizer, schedule, info, logger)
    fc_ddp = DistributedDataParallel(fc, device_ids=[info.device] if info.device.type == "cuda" else None) \
        if info.distributed else fc
    logger.info("linear eval of %s (%s/%s): %d classes, %d-d features, %d it/epoch, BN %s",
                cfg.run.pretrained, ckpt["arch"], ckpt["backbone"], num_classes, feat_dim, ipe,
                "train mode" if cfg.run.bn_train else "eval mode")
    progress = ProgressMeter(ipe * cfg.optim.epochs, cfg.run.print_freq, logger)
    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        loss = train_epoch(backbone, fc_ddp, train_loader, optimizer, lr_values, epoch * ipe,
                           info.device, amp, progress)
        metrics = evaluate(backbone, fc, val_loader, info.device, amp)
        metrics.update(epoch=epoch + 1, train_loss=float(sdist.all_reduce_mean(
            torch.tensor(loss, device=info.device)).item()))
        history.append(metrics)
        logger.info("epoch %d: top1 %.2f top5 %.2f (%d val images, %d unreadable)", epoch + 1,
                    metrics["top1"], metrics["top5"], metrics["num_images"], metrics["unreadable"])
        save_now = (epoch + 1) % cfg.run.save_freq == 0 or epoch + 1 == cfg.optim.epochs
        rng = gather_rng_states() if save_now else None  # every rank takes part
        if info.is_main:
            summary = {"pretrained": os.path.abspath(cfg.run.pretrained), "final": metrics,
                       "best_top1": max(h["top1"] for h in history), "history": history}
            atomic_save_json(summary, os.path.join(cfg.run.output_dir, "metrics.json"))
            if save_now:
                save_checkpoint({"format": "soco-linear", "version": 1, "fc": fc.state_dict(),
                                 "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                 "config": config_to_dict(cfg), "history": history,
                                 "schedule": schedule, "rng": rng},
                                cfg.run.output_dir, f"linear_epoch_{epoch + 1:04d}.pth",
                                retention=Retention("linear_epoch_", cfg.run.keep_last, cfg.run.keep_every))
    sdist.barrier()
    return history[-1] if history else {}


@exit_on_user_error
def main(argv=None) -> dict:
    cfg = parse_config_or_exit(LinearEvalConfig, argv)
    if not cfg.run.pretrained or not cfg.data.data:
        raise SystemExit("error: --pretrained (a soco-pretrain checkpoint) and --data (a folder with "
                         "train/<class>/ and val/<class>/) are required")
    info = sdist.init_distributed(cfg.run.device, cfg.run.dist_timeout)
    if info.is_main:
        check_writable_dir(cfg.run.output_dir)
        save_config(cfg, os.path.join(cfg.run.output_dir, "config.yaml"))
    sdist.barrier()
    logger = setup_logging(cfg.run.output_dir, info.rank, name="soco")
    try:
        return run(cfg, info, logger)
    finally:
        sdist.cleanup_distributed()


if __name__ == "__main__":
    main()
