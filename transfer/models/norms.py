"""Norm policy per model part, frozen stages and ``norm_eval``.

Norm names: ``syncbn`` (SyncBatchNorm; only meaningful with CUDA + DDP, otherwise plain BN
with a warning), ``bn``, ``frozenbn`` (torchvision ``FrozenBatchNorm2d``: fixed affine,
no statistics), ``gn`` (GroupNorm with 32 groups, fewer for narrow layers) and ``none``.

Parts: ``backbone`` (ResNet body, res5 of C4 heads included), ``fpn``, ``box_head``,
``mask_head``, ``head`` (RetinaNet/FCOS towers).
"""
from __future__ import annotations

import math
import warnings
from functools import partial

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from transfer.config import NORMS, PARTS  # noqa: F401  (the names live with the configuration)

#: The seed configs' choice (SoCo/MoCo detectron2 recipes): SyncBN everywhere.
DEFAULT_NORMS = {"backbone": "syncbn", "fpn": "syncbn", "box_head": "syncbn", "mask_head": "syncbn",
                 "head": "gn"}

#: Stage names in freezing order (detectron2 FREEZE_AT semantics: 1 = stem, 2 = + res2, ...).
STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def group_norm(num_channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups; narrow layers get fewer groups of at least 2 channels."""
    groups = math.gcd(max_groups, num_channels)
    while groups > 1 and num_channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, num_channels)


def resolve_norms(norm, sync_ok: bool) -> dict:
    """Expand a norm spec into one name per part and apply the SyncBN fallback.

    Args:
        norm: one name for every part, or a dict part → name (missing parts use
            :data:`DEFAULT_NORMS`).
        sync_ok: SyncBN can run (CUDA and more than one process).

    Returns:
        dict part → norm name.
    """
    if isinstance(norm, str):
        spec = {p: norm for p in PARTS}
        if norm in ("syncbn", "bn", "frozenbn", "none"):
            spec["head"] = DEFAULT_NORMS["head"] if norm != "none" else "none"
    else:
        spec = dict(DEFAULT_NORMS, **(norm or {}))
    for part, name in spec.items():
        if part not in PARTS:
            raise ValueError(f"unknown model part {part!r} in the norm policy (use {', '.join(PARTS)})")
        if name not in NORMS:
            raise ValueError(f"unknown norm {name!r} for part {part!r} (use {', '.join(NORMS)})")
    if not sync_ok and "syncbn" in spec.values():
        warnings.warn("SyncBN needs CUDA and several processes; using plain BatchNorm (per-process "
                      "statistics) instead", stacklevel=2)
        spec = {p: ("bn" if n == "syncbn" else n) for p, n in spec.items()}
    return spec


def norm_layer(name: str):
    """A ``norm_layer(num_channels)`` factory for a norm name (None for ``none``)."""
    return {"syncbn": nn.SyncBatchNorm, "bn": nn.BatchNorm2d,
            "frozenbn": partial(FrozenBatchNorm2d, eps=1e-5), "gn": group_norm, "none": None}[name]


def _to_frozen_bn(module: nn.Module) -> nn.Module:
    """BN layers → FrozenBatchNorm2d with the same statistics (detectron2's FREEZE_AT does this)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = _to_frozen_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def freeze_stages(body: nn.Module, frozen_stages: int, res5: nn.Module | None = None) -> None:
    """Freeze the first ``frozen_stages`` stages: no gradients, BN turned into FrozenBN.

    0 = nothing, 1 = stem (conv1, bn1), 2 = + layer1, ... 5 = + layer4 (``res5`` for C4).
    Call after the weights are loaded (FrozenBN copies the loaded statistics).
    """
    if not 0 <= frozen_stages <= 5:
        raise ValueError(f"frozen_stages must be 0..5, got {frozen_stages}")
    for stage in STAGES[:frozen_stages]:
        for name in stage:
            mod = res5 if (name == "layer4" and res5 is not None) else getattr(body, name, None)
            if mod is None:
                raise ValueError(f"cannot freeze stage {name!r}: the backbone has no such module")
            for p in mod.parameters():
                p.requires_grad_(False)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                setattr(body, name, _to_frozen_bn(mod))
            else:
                _to_frozen_bn(mod)


def set_norm_eval(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode (``norm_eval``: use running statistics while training)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def ensure_norm(module: nn.Module, name: str) -> nn.Module:
    """Replace plain BatchNorm2d layers in ``module`` by the ``name`` norm (in place).

    Some timm models ignore the ``norm_layer`` they are given; this makes the body's norm
    follow the policy anyway. BN statistics are kept for ``frozenbn``/``syncbn``.
    """
    if name == "bn":
        return module
    if name == "syncbn":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if name == "frozenbn":
        return _to_frozen_bn(module)
    for child_name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, child_name, group_norm(child.num_features) if name == "gn" else nn.Identity())
        else:
            ensure_norm(child, name)
    return module
