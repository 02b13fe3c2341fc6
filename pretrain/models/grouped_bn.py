"""Batch normalisation with per-group batch statistics, for batched heads.

SoCo's original forward calls the RoI head, projector and predictor once per
(view, box set, FPN level): 16 calls per network for SoCo_FPN, each with BN
statistics over its own ``N * L`` RoIs. Stacking the groups into one call is
faster but a plain BN would then normalise over all groups together, which
changes the math. :func:`batch_norm_groups` keeps the math: inside the context,
every BN layer of a module normalises each of the ``G`` equal, contiguous
chunks of its batch with that chunk's own statistics.

How: ``x[G*n, C, ...]`` is folded to ``[n, G*C, ...]`` (the groups become
channels) and normalised by ``F.batch_norm`` with the layer's affine
parameters repeated ``G`` times; the outputs are those of ``G`` separate calls.
Running statistics are updated as ``G`` sequential calls would update them
(``r <- (1 - m) r + m * stat_g`` for g = 1..G), and ``num_batches_tracked``
grows by ``G``. The modules and their parameters are untouched (standard
``weight``/``bias`` of shape [C]), so state dicts, conversion and
``nn.SyncBatchNorm.convert_sync_batchnorm`` are unaffected; for a
``SyncBatchNorm`` in a process group of size > 1 the per-group statistics are
all-reduced (autograd-aware) across ranks, like G separate SyncBN calls.
Layers in eval mode use running statistics, which are group independent.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pretrain.models.base import upcast

__all__ = ["batch_norm_groups", "grouped_batch_norm"]


def _sync_world(bn: nn.Module) -> tuple[bool, object]:
    if not isinstance(bn, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return False, None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return dist.get_world_size(group) > 1, group


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[G*n, C, *S] -> [n, G*C, *S]."""
    n = x.shape[0] // groups
    return x.reshape(groups, n, *x.shape[1:]).transpose(0, 1).reshape(n, groups * x.shape[1], *x.shape[2:])


def _unfold(y: torch.Tensor, groups: int) -> torch.Tensor:
    """[n, G*C, *S] -> [G*n, C, *S]."""
    n, gc = y.shape[:2]
    c = gc // groups
    return y.reshape(n, groups, c, *y.shape[2:]).transpose(0, 1).reshape(groups * n, c, *y.shape[2:])


@torch.no_grad()
def _update_running_stats(bn: _BatchNorm, batch_mean: torch.Tensor, batch_var: torch.Tensor,
                          groups: int) -> None:
    """Applies G sequential BN running-stat updates. batch_*: [G, C] (var unbiased)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    if bn.momentum is not None:  # closed form of G steps r <- (1 - m) r + m s_g, in 2 kernels each
        m = float(bn.momentum)
        coef = [m * (1.0 - m) ** (groups - 1 - g) for g in range(groups)]
        w = torch.tensor(coef, dtype=upcast(batch_mean).dtype).to(batch_mean.device, non_blocking=True)
        decay = (1.0 - m) ** groups
        bn.running_mean.mul_(decay).add_((w @ upcast(batch_mean)).to(bn.running_mean.dtype))
        bn.running_var.mul_(decay).add_((w @ upcast(batch_var)).to(bn.running_var.dtype))
        bn.num_batches_tracked.add_(groups)
        return
    for g in range(groups):  # cumulative average: the factor changes every step
        bn.num_batches_tracked.add_(1)
        m = 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(batch_mean[g].to(bn.running_mean.dtype), m)
        bn.running_var.lerp_(batch_var[g].to(bn.running_var.dtype), m)


def _local_grouped_bn(bn: _BatchNorm, xf: torch.Tensor, groups: int) -> torch.Tensor:
    c = bn.num_features
    tmp_mean = tmp_var = None
    if bn.track_running_stats and bn.running_mean is not None:
        # momentum 1: the temporary buffers receive exactly the batch statistics.
        tmp_mean = torch.zeros(groups * c, device=xf.device, dtype=bn.running_mean.dtype)
        tmp_var = torch.ones(groups * c, device=xf.device, dtype=bn.running_var.dtype)
    weight = bn.weight.repeat(groups) if bn.weight is not None else None
    bias = bn.bias.repeat(groups) if bn.bias is not None else None
    y = F.batch_norm(xf, tmp_mean, tmp_var, weight, bias, True, 1.0, bn.eps)
    if tmp_mean is not None:
        _update_running_stats(bn, tmp_mean.view(groups, c), tmp_var.view(groups, c), groups)
    return y


def _synced_grouped_bn(bn: _BatchNorm, xf: torch.Tensor, groups: int, pg) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    c = bn.num_features
    dims = [0] + list(range(2, xf.dim()))
    shape = [1, groups * c] + [1] * (xf.dim() - 2)
    x32 = upcast(xf)
    count = torch.tensor([xf.numel() // xf.shape[1]], device=xf.device, dtype=x32.dtype)
    packed = all_reduce(torch.cat([x32.sum(dims), count]), group=pg)  # autograd-aware SUM
    total = packed[-1].detach()
    mean = packed[:-1] / total
    centred = x32 - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims), group=pg) / total  # two-pass, biased
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        y = y * bn.weight.repeat(groups).view(shape) + bn.bias.repeat(groups).view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        unbiased = var.detach() * total / torch.clamp(total - 1, min=1)
        _update_running_stats(bn, mean.detach().view(groups, c), unbiased.view(groups, c), groups)
    return y.to(xf.dtype)


def grouped_batch_norm(bn: _BatchNorm, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Applies ``bn`` to ``x`` as if called separately on each of ``groups`` chunks.

    Args:
        bn: a BatchNorm1d/2d/3d or SyncBatchNorm layer.
        x (Tensor[G*n, C, ...]): input whose batch is G contiguous chunks of n.
        groups: G.

    Returns:
        Tensor[G*n, C, ...]: equal to ``torch.cat([bn(c) for c in x.chunk(G)])``
        (up to float rounding), with the same running-statistics update.
    """
    use_batch_stats = bn.training or not bn.track_running_stats or bn.running_mean is None
    if groups == 1 or not use_batch_stats:
        return type(bn).forward(bn, x)
    if x.shape[0] % groups:
        raise ValueError(f"batch {x.shape[0]} is not divisible into {groups} groups")
    xf = _fold(x, groups)
    sync, pg = _sync_world(bn)
    y = _synced_grouped_bn(bn, xf, groups, pg) if sync else _local_grouped_bn(bn, xf, groups)
    return _unfold(y, groups)


@contextlib.contextmanager
def batch_norm_groups(modules: nn.Module | list[nn.Module], groups: int) -> Iterator[None]:
    """Within the context, every BN layer inside ``modules`` uses per-group statistics.

    Works for any module structure (Sequential heads, ResNet blocks), including
    after ``nn.SyncBatchNorm.convert_sync_batchnorm``, because it temporarily
    routes each BN instance's ``forward`` through :func:`grouped_batch_norm`.

    Args:
        modules: a module or list of modules.
        groups: G; every BN input batch must be G equal contiguous chunks.
    """
    mods = modules if isinstance(modules, (list, tuple)) else [modules]
    bns = [m for mod in mods for m in mod.modules() if isinstance(m, _BatchNorm)]
    if groups == 1:
        yield
        return
    try:
        for bn in bns:
            bn.forward = (lambda x, _bn=bn: grouped_batch_norm(_bn, x, groups))
        yield
    finally:
        for bn in bns:
            if "forward" in bn.__dict__:
                del bn.forward
