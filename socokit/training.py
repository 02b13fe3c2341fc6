"""Training-loop helpers shared by pretraining and fine-tuning."""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections import defaultdict, deque

import numpy as np
import torch

from socokit import distributed as sdist
from socokit.config import AMP_MODES
from socokit.errors import ConfigError, NonFiniteLossError  # noqa: F401  (NonFiniteLossError re-exported)
from socokit.log import get_logger


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, NumPy and torch with ``seed + rank`` (distinct streams per rank)."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed python and NumPy from torch's per-worker seed.

    torch gives each worker ``base_seed + worker_id``, and the base seed is drawn from the
    (rank-seeded) main-process generator, so streams differ across workers, ranks and epochs
    and are reproducible for a fixed seed. (The original release shared one NumPy stream across
    workers.)
    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def check_finite(loss: torch.Tensor, *, step: int, lr: float, scale: float | None = None,
                 dist: bool = True) -> None:
    """Stop every rank at the same step when any rank's loss is not finite.

    The flag is all-reduced (one tiny collective per step) so no rank runs ahead into a
    collective the others never join.

    Raises:
        NonFiniteLossError: with step, loss, learning rate and grad-scaler scale in the message.
    """
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if dist:
        bad = sdist.all_reduce_sum(bad)
    if bad.item() > 0:
        value = loss.detach().float().cpu().item() if loss.numel() == 1 else float("nan")
        msg = (f"non-finite loss at step {step} on {int(bad.item())} rank(s): local loss={value}, "
               f"lr={lr:.6g}" + (f", grad scale={scale:.6g}" if scale is not None else "")
               + ". Stopped before the optimizer step; the last checkpoint is intact. "
               "Try a lower learning rate, a longer warmup, or --amp bf16 instead of fp16.")
        raise NonFiniteLossError(msg)


class SmoothedValue:
    """Window median / global average of a scalar series."""

    def __init__(self, window: int = 20):
        self.window = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else float("nan")

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


class ProgressMeter:
    """Smoothed meters, images/s and ETA, logged every ``print_freq`` steps on rank 0."""

    def __init__(self, total_steps: int, print_freq: int = 20, logger=None, header: str = ""):
        self.total_steps = total_steps
        self.print_freq = max(1, print_freq)
        self.logger = logger or get_logger("progress")
        self.header = header
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.start = time.time()
        self.last = self.start
        self.steps_done = 0
        self.images = SmoothedValue()

    def update(self, step: int, batch_images: int = 0, **values) -> None:
        now = time.time()
        dt = max(now - self.last, 1e-9)
        self.last = now
        self.steps_done += 1
        self.meters["time"].update(dt)
        if batch_images:
            self.images.update(batch_images / dt)
        for k, v in values.items():
            self.meters[k].update(float(v.item() if torch.is_tensor(v) else v))
        if (step + 1) % self.print_freq == 0 or step + 1 == self.total_steps:
            self.log(step)

    def eta_seconds(self, step: int) -> float:
        return self.meters["time"].avg * max(self.total_steps - step - 1, 0)

    def log(self, step: int) -> None:
        if not sdist.is_main_process():
            return
        eta = int(self.eta_seconds(step))
        parts = [f"{self.header}[{step + 1}/{self.total_steps}]",
                 f"eta {eta // 3600:d}:{eta % 3600 // 60:02d}:{eta % 60:02d}"]
        for k, m in self.meters.items():
            if k != "time":
                parts.append(f"{k} {m.median:.4g} ({m.avg:.4g})")
        if self.images.count:
            parts.append(f"{self.images.median * sdist.get_world_size():.1f} img/s")
        parts.append(f"{self.meters['time'].median:.3f} s/it")
        self.logger.info("  ".join(parts))


class TensorboardWriter:
    """Rank-0 TensorBoard SummaryWriter; a no-op elsewhere or when disabled."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.writer = None
        if enabled and sdist.is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(output_dir, "tb"))

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            v = float(v.item() if torch.is_tensor(v) else v)
            if math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


#: the resolved modes; what ``--amp`` accepts (these and "auto") is ``socokit.config.AMP_MODES``.
AMP_CHOICES = tuple(m for m in AMP_MODES if m != "auto")


def resolve_amp(amp: str, device: torch.device) -> str:
    """The one precision policy of every entry point: ``--amp`` value -> resolved mode.

    ``auto`` is bf16 on a CUDA device that supports it (Ampere or newer), fp16 with a
    GradScaler on older CUDA devices, and none (float32) on CPU and other devices.

    Args:
        amp: one of :data:`AMP_MODES`.
        device: the device the model runs on.

    Returns:
        One of :data:`AMP_CHOICES`.

    Raises:
        ValueError: unknown mode, or fp16 on a device other than CUDA (autocast to fp16 is
            CUDA-only here; use bf16 or none).
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    device = torch.device(device)
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "none"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp fp16 needs a CUDA device, this run is on {device.type}; "
                         "use bf16 or none")
    return amp


def autocast_context(device: torch.device, amp: str = "none"):
    """``torch.autocast`` for ``amp`` in {none, bf16, fp16}; fp16 only on CUDA."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "none":
        return contextlib.nullcontext()
    device = torch.device(device)
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp: 'fp16' needs CUDA; use bf16 or none on CPU", "amp", amp)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, amp: str = "none") -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 on CUDA (disabled otherwise)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16" and device.type == "cuda"))
