"""Schedules, optimizer and precise BN for iteration-based detector fine-tuning.

Schedules are stated at a reference total batch of 16 images (detectron2's convention):

==========  =========  =====================  ==========================================
name        max_iter   LR steps (x0.1 each)   source
==========  =========  =====================  ==========================================
1x          90 000     60 000, 80 000         detectron2 ``*_1x`` (≈12 COCO epochs)
2x          180 000    120 000, 160 000       detectron2 ``*_2x``
3x          270 000    210 000, 250 000       detectron2 ``*_3x``
6x          540 000    480 000, 520 000       He et al. 2019 "Rethinking ImageNet
                                              Pre-training": drop in the last 60k and 20k
==========  =========  =====================  ==========================================

With another total batch B (per-process batch x processes x accumulation steps) the learning
rate scales linearly (lr = base_lr x B / 16) and every iteration count (max_iter, steps,
warmup) scales by 16 / B, as detectron2's ``REFERENCE_WORLD_SIZE`` auto-scaling does.
Warmup is linear from ``warmup_factor`` x lr over ``warmup_iters`` (1000, 0.001).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from socokit.errors import ConfigError
from transfer.config import SCHEDULES, SolverConfig  # noqa: F401  (SCHEDULES re-exported)


@dataclass(frozen=True)
class Schedule:
    """The schedule of one run, at its actual total batch.

    Attributes:
        max_iter: optimizer steps of the run.
        steps: iterations at which the LR drops by ``gamma`` (x0.1).
        warmup_iters, warmup_factor: linear warmup from ``warmup_factor x lr``.
        lr: the LR after warmup and before the first drop.
        factor: reference batch / total batch (1.0 without linear scaling).
    """

    max_iter: int
    steps: tuple
    warmup_iters: int
    lr: float
    factor: float = 1.0
    warmup_factor: float = 0.001

    def lr_at(self, iteration: int) -> float:
        """Learning rate of optimizer step ``iteration`` (0-based)."""
        return lr_at(iteration, self.lr, self.steps, self.warmup_iters, self.warmup_factor)


def resolve_schedule(solver: SolverConfig, total_batch: int) -> Schedule:
    """Iteration counts and LR of ``solver`` for the actual total batch.

    The explicit ``max_iter`` / ``steps`` override the ``schedule`` preset; with ``scale_lr``
    the LR scales by ``total_batch / reference_batch`` and every iteration count by the inverse.

    Args:
        solver: the solver options (values at the reference batch).
        total_batch: images per optimizer step over all processes and accumulation steps.

    Raises:
        ConfigError: neither a schedule preset nor ``max_iter``.
    """
    max_iter, steps = solver.max_iter_and_steps()
    if not max_iter:
        raise ConfigError("schedule: none given; set schedule (1x, 2x, 3x, 6x) or max_iter", "schedule", None)
    factor = solver.reference_batch / total_batch if solver.scale_lr else 1.0
    lr = solver.base_lr / factor

    def s(v):
        return max(1, int(round(v * factor)))
    return Schedule(max_iter=s(max_iter), steps=tuple(s(v) for v in steps),
                    warmup_iters=int(round(solver.warmup_iters * factor)), lr=lr, factor=factor,
                    warmup_factor=solver.warmup_factor)


def lr_at(iteration: int, lr: float, steps, warmup_iters: int, warmup_factor: float = 0.001,
          gamma: float = 0.1) -> float:
    """Learning rate of optimizer step ``iteration`` (0-based): linear warmup, then steps."""
    value = lr * gamma ** sum(iteration >= s for s in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        value *= warmup_factor * (1 - alpha) + alpha
    return value


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                    weight_decay_norm: float = 0.0, fused: bool | None = None,
                    weight_decay_bias: float | None = None) -> torch.optim.SGD:
    """SGD with detectron2's parameter groups (``solver/build.py``, ``get_default_optimizer_params``).

    * parameters of norm layers (BN, SyncBN, GN, LN; weights and biases): ``weight_decay_norm``;
    * biases of the other layers (convs, linears): ``weight_decay_bias`` (None = ``weight_decay``);
    * everything else: ``weight_decay``.

    detectron2 v0.1–v0.5 (the releases the published rows were trained with) bound
    ``SOLVER.WEIGHT_DECAY_BIAS`` to the *default* ``WEIGHT_DECAY`` (1e-4) when its defaults were
    defined, so a recipe that lowers ``WEIGHT_DECAY`` (SoCo: 2.5e-5) kept 1e-4 on biases; v0.6
    (Sept 2021, commit 2df9c7d) made it follow ``WEIGHT_DECAY``. The SoCo recipes therefore set
    ``weight_decay_bias: 1.0e-4``.

    Frozen parameters (``requires_grad=False``) are left out. ``fused`` picks the fused CUDA
    kernel (default: on CUDA parameters); otherwise the multi-tensor ``foreach`` path.
    """
    wd_bias = weight_decay if weight_decay_bias is None else weight_decay_bias
    decay, bias, no_decay = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                if isinstance(module, _NORMS):
                    no_decay.append(p)
                else:
                    (bias if name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": bias, "weight_decay": wd_bias},
              {"params": no_decay, "weight_decay": weight_decay_norm}]
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, **kwargs)


@torch.no_grad()
def precise_bn(model: nn.Module, batches, forward) -> int:
    """Recompute BN running statistics as the true average over ``batches`` (detectron2 PreciseBN).

    Args:
        model: the (possibly DDP-wrapped) model; BN layers in train mode are updated (SyncBN
            averages over ranks by itself).
        batches: an iterable of inputs for ``forward``.
        forward: callable(batch) running the model in train mode (losses are ignored).

    Returns:
        Number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    n = 0
    for batch in batches:
        for bn in bns:
            bn.momentum = 1.0  # running stats = this batch's stats
        forward(batch)
        n += 1
        for i, bn in enumerate(bns):
            means[i] += (bn.running_mean - means[i]) / n
            variances[i] += (bn.running_var - variances[i]) / n
    for i, bn in enumerate(bns):
        bn.running_mean.copy_(means[i])
        bn.running_var.copy_(variances[i])
        bn.momentum = momenta[i]
    return n
