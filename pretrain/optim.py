"""LARS optimiser and parameter groups as in the SoCo release (docs/method.md §4.1).

The original wraps ``torch.optim.SGD`` in a LARS class that rewrites the
gradients before the SGD step. We implement the same arithmetic as one
``torch.optim.Optimizer`` (foreach kernels, no host syncs) so that
``GradScaler.unscale_`` / ``GradScaler.step`` and ``state_dict`` work as for
any optimiser. For a parameter ``w`` with gradient ``g`` of an *adapted* group::

    g <- g + wd * w                                   # decay before the trust ratio
    g <- eta * ||w|| / (||g|| + eps) * g   if ||w|| > 0 and ||g|| > 0
    v <- momentum * v + g;  w <- w - lr * v          # plain SGD momentum, dampening 0

Non-adapted groups (every 1-D parameter: biases, BN gamma/beta) use plain
momentum SGD with ``wd = 0``. There is no trust-ratio clipping.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["LARS", "param_groups_lars", "build_optimizer"]


def param_groups_lars(model: nn.Module, weight_decay: float = 1e-5) -> list[dict]:
    """Split trainable parameters into the two groups of the original.

    Args:
        model: the (unwrapped or DDP-wrapped) model; parameters with
            ``requires_grad=False`` (the target network) are skipped.
        weight_decay: decay of the adapted group.

    Returns:
        ``[{"params": 1-D params, "weight_decay": 0, "lars": False, "name": "no_decay"},
           {"params": others, "weight_decay": weight_decay, "lars": True, "name": "decay"}]``
    """
    no_decay, decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0, "lars": False, "name": "no_decay"},
        {"params": decay, "weight_decay": weight_decay, "lars": True, "name": "decay"},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of momentum SGD (You et al. 2017).

    Args:
        params: parameters or parameter groups; a group's ``"lars"`` key
            (default True) turns the trust ratio on or off for it.
        lr: learning rate (the schedule overwrites ``group["lr"]`` every step).
        momentum: SGD momentum (0.9).
        weight_decay: default L2 decay, added to the gradient before the trust
            ratio of adapted groups.
        trust_coef: eta, the trust coefficient (0.001).
        eps: added to ``||g||`` in the trust ratio (1e-8).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coef: float = 1e-3,
        eps: float = 1e-8,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coef < 0 or eps < 0:
            raise ValueError("lr, momentum, weight_decay, trust_coef and eps must be >= 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coef=trust_coef, eps=eps, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimisation step (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars"]:
                grads = self._apply_trust_ratio(params, grads, group["trust_coef"], group["eps"])
            self._momentum_sgd(params, grads, group["lr"], group["momentum"])
        return loss

    @staticmethod
    def _apply_trust_ratio(params, grads, trust_coef: float, eps: float) -> list:
        # Norms of all tensors of the group in two foreach kernels, no .item().
        w_norm = torch.stack(torch._foreach_norm(params)).float()
        g_norm = torch.stack(torch._foreach_norm(grads)).float()
        ratio = torch.where((w_norm > 0) & (g_norm > 0),
                            trust_coef * w_norm / (g_norm + eps), torch.ones_like(w_norm))
        ratios = [r.to(g.dtype) for r, g in zip(ratio.unbind(0), grads)]
        # Out of place: p.grad keeps the raw gradient (useful for logging).
        return torch._foreach_mul(grads, ratios)

    def _momentum_sgd(self, params, grads, lr: float, momentum: float) -> None:
        if momentum == 0:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                # Same as torch SGD: the first buffer is the gradient itself.
                state["momentum_buffer"] = g.detach().clone()
                bufs.append(None)
            else:
                bufs.append(state["momentum_buffer"])
        old = [(b, g) for b, g in zip(bufs, grads) if b is not None]
        if old:
            old_bufs, old_grads = zip(*old)
            torch._foreach_mul_(list(old_bufs), momentum)
            torch._foreach_add_(list(old_bufs), list(old_grads))
        torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-lr)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 1e-5,
    momentum: float = 0.9,
    trust_coef: float = 1e-3,
    eps: float = 1e-8,
    optimizer: str = "lars",
) -> torch.optim.Optimizer:
    """Builds the pretraining optimiser over the trainable parameters.

    Args:
        model: the model (target-network parameters have ``requires_grad=False``
            and are left out).
        lr: initial learning rate (normally overwritten every iteration by
            :func:`pretrain.schedules.lr_schedule`).
        weight_decay: decay of >= 2-D parameters; 1-D parameters get none.
        momentum: SGD momentum.
        trust_coef: LARS eta (``optimizer="lars"`` only).
        eps: LARS epsilon (``optimizer="lars"`` only).
        optimizer: ``"lars"`` (SoCo) or ``"sgd"`` (same groups, no trust ratio).

    Returns:
        The optimiser; its groups carry a ``"name"`` key (``no_decay`` / ``decay``).
    """
    groups = param_groups_lars(model, weight_decay)
    if optimizer == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    trust_coef=trust_coef, eps=eps)
    if optimizer == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r} (choose 'lars' or 'sgd')")
