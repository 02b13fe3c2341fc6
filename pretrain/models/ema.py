"""Exponential moving average of the online network into the target network."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["copy_to_target", "ema_update_"]


def _paired_params(pairs: Sequence[tuple[nn.Module, nn.Module]]):
    online, target = [], []
    for online_mod, target_mod in pairs:
        on = list(online_mod.named_parameters())
        tg = list(target_mod.named_parameters())
        if [n for n, _ in on] != [n for n, _ in tg]:
            raise ValueError(f"online/target parameter names differ: "
                             f"{type(online_mod).__name__} vs {type(target_mod).__name__}")
        online += [p for _, p in on]
        target += [p for _, p in tg]
    return online, target


@torch.no_grad()
def copy_to_target(pairs: Sequence[tuple[nn.Module, nn.Module]]) -> None:
    """Copies online parameters and buffers into the target and freezes it.

    Args:
        pairs: ``(online_module, target_module)`` pairs of identical structure.
    """
    for online_mod, target_mod in pairs:
        target_mod.load_state_dict(online_mod.state_dict())
        for p in target_mod.parameters():
            p.requires_grad_(False)


@torch.no_grad()
def ema_update_(pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """``theta_t <- tau * theta_t + (1 - tau) * theta_o`` over parameters only.

    BN running statistics are not averaged (the target always uses batch
    statistics, docs/method.md §3.6). One ``_foreach_lerp_`` kernel group instead of the
    original's Python loop that re-allocated every tensor.

    Args:
        pairs: ``(online_module, target_module)`` pairs.
        momentum: tau in [0, 1]; 1 leaves the target unchanged.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    online, target = _paired_params(pairs)
    if momentum == 1.0 or not target:
        return
    online = [p.detach() for p in online]
    # lerp_(start=target, end=online, weight=1 - tau) = tau * target + (1 - tau) * online
    torch._foreach_lerp_(target, online, 1.0 - momentum)
