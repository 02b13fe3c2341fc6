"""``build_model``: configuration → pretraining model."""

from __future__ import annotations

from torch import nn

from pretrain.models.byol import BYOL
from pretrain.models.soco_c4 import SoCo_C4
from pretrain.models.soco_fpn import SoCo_FPN, SoCo_FPN_Star

__all__ = ["ARCHS", "build_model"]

ARCHS = {"SoCo_FPN": SoCo_FPN, "SoCo_FPN_Star": SoCo_FPN_Star, "SoCo_C4": SoCo_C4, "BYOL": BYOL}


def build_model(arch: str, backbone: str = "resnet50", head_mode: str = "batched",
                roi_levels: str = "all", **kwargs) -> nn.Module:
    """Builds a pretraining model.

    Args:
        arch: ``"SoCo_FPN"``, ``"SoCo_FPN_Star"``, ``"SoCo_C4"`` or ``"BYOL"``.
        backbone: ``"resnet50"`` (default) or ``"timm:<name>"``.
        head_mode: ``"batched"`` (default: one head call per network with per-group BN
            statistics) or ``"faithful"`` (the original's per-call execution); the same math.
        roi_levels: FPN models only: ``"all"`` (default, original) or
            ``"assigned"`` (pool only matched levels; changes BN statistics).
        **kwargs: further keyword arguments of the model class (e.g.
            ``mlp_hidden_dim``, ``out_dim``; FPN: ``fpn_channels``, ``fc_dim``).

    Returns:
        The model, in train mode, with ``model.ARCH`` set to ``arch``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    cls = ARCHS[arch]
    if arch.startswith("SoCo_FPN"):
        kwargs["roi_levels"] = roi_levels
    elif roi_levels != "all":
        raise ValueError(f"roi_levels={roi_levels!r} applies to SoCo_FPN / SoCo_FPN_Star only, not {arch}")
    return cls(backbone=backbone, head_mode=head_mode, **kwargs).train()
