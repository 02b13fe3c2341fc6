"""Per-iteration learning-rate and EMA-momentum schedules (docs/method.md §4.2, §3.6).

Both schedules are plain NumPy arrays indexed by the global iteration ``t``
(0-based), as in DINO/MAE: the training loop sets ``lr = lrs[t]`` and calls
``model.update_target(taus[t])`` at the start of iteration ``t``. Resuming at
iteration ``t`` therefore reproduces the schedule exactly (the original release
lost its EMA counter on resume, docs/method.md §8 item 4).
"""

from __future__ import annotations

import math

import numpy as np


def scaled_lr(base_lr: float, total_batch: int) -> float:
    """Linear scaling rule of the original: ``base_lr * total_batch / 256``.

    Args:
        base_lr: learning rate for a total batch of 256 (SoCo uses 1.0).
        total_batch: images per iteration over all processes
            (``batch_per_gpu * world_size``).
    """
    if total_batch <= 0:
        raise ValueError(f"total_batch must be positive, got {total_batch}")
    return base_lr * total_batch / 256.0


def lr_schedule(
    peak_lr: float,
    total_iters: int,
    warmup_iters: int,
    warmup_multiplier: float = 100.0,
    eta_min: float = 1e-6,
) -> np.ndarray:
    """Linear warmup from ``peak_lr / warmup_multiplier`` then cosine to ``eta_min``.

    Reproduces the original ``GradualWarmupScheduler`` + ``CosineAnnealingLR``
    stepped every iteration (docs/method.md §4.2)::

        t <= T_w:  lr(t) = peak / m * ((m - 1) * t / T_w + 1)
        t >  T_w:  lr(t) = eta_min + (peak - eta_min) * (1 + cos(pi * (t - T_w) / T)) / 2

    with ``T = total_iters - warmup_iters``. ``lr(0) = peak / m`` and
    ``lr(T_w) = peak``.

    Args:
        peak_lr: learning rate reached at the end of warmup.
        total_iters: number of training iterations (length of the result).
        warmup_iters: warmup length in iterations (0 disables warmup).
        warmup_multiplier: the warmup starts at ``peak_lr / warmup_multiplier``
            (must be > 1 when warmup is used, as in the original).
        eta_min: final learning rate of the cosine.

    Returns:
        np.ndarray[total_iters] float64: the learning rate of every iteration.
    """
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"warmup_iters must be in [0, {total_iters}], got {warmup_iters}")
    if warmup_iters > 0 and warmup_multiplier <= 1.0:
        raise ValueError(f"warmup_multiplier must be > 1, got {warmup_multiplier}")
    t = np.arange(total_iters, dtype=np.float64)
    lrs = np.empty(total_iters, dtype=np.float64)
    cosine_len = total_iters - warmup_iters
    if warmup_iters > 0:
        m = float(warmup_multiplier)
        warm = t <= warmup_iters
        lrs[warm] = peak_lr / m * ((m - 1.0) * t[warm] / warmup_iters + 1.0)
    else:
        warm = np.zeros(total_iters, dtype=bool)
    t_cos = t[~warm] - warmup_iters
    denom = max(cosine_len, 1)
    lrs[~warm] = eta_min + (peak_lr - eta_min) * (1.0 + np.cos(math.pi * t_cos / denom)) / 2.0
    return lrs


def momentum_schedule(tau0: float, total_iters: int) -> np.ndarray:
    """Cosine EMA momentum from ``tau0`` to 1 (docs/method.md §3.6, BYOL).

    ``tau_k = 1 - (1 - tau0) * (cos(pi * k / K) + 1) / 2`` for ``k = 0 .. K-1``
    with ``K = total_iters``. The original used
    ``K = int(num_images / world_size / batch_size * epochs)`` (slightly more
    than the real iteration count because of ``drop_last``); we use the real
    number of iterations, so the last value is within ``(1 - tau0) * pi^2 / (4 K^2)``
    of 1.

    Args:
        tau0: initial momentum (SoCo: 0.99).
        total_iters: number of training iterations.

    Returns:
        np.ndarray[total_iters] float64, non-decreasing.
    """
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    if not 0.0 <= tau0 <= 1.0:
        raise ValueError(f"tau0 must be in [0, 1], got {tau0}")
    k = np.arange(total_iters, dtype=np.float64)
    return 1.0 - (1.0 - tau0) * (np.cos(math.pi * k / total_iters) + 1.0) / 2.0
