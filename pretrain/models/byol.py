"""Image-level BYOL baseline in the SoCo framework (Grill et al. 2020, arXiv:2006.07733).

The same online/target machinery, optimiser and schedules as SoCo, with the
whole image as the only "object"::

    h_v = avgpool(ResNet(V_v))                         # (N, 2048), full ResNet conv1..layer4
    q_v = normalize(predictor(projector(h_v)))         # online
    z_v = normalize(projector_t(h_t_v))                # target
    loss = l(1→2) + l(2→1),   l(a→b) = −2 · mean_n cos(q_a, z_b)

BYOL's per-pair loss is ``2 − 2cos``; we drop the constant exactly as SoCo
does, so a BYOL and a SoCo_C4 loss are on the same scale (minimum −4).
``head_mode="batched"`` runs both views through the backbone and MLPs in one
call with per-view BN statistics (identical math to the default per-view calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.base import HEAD_MODES, OnlineTargetModel, upcast
from pretrain.models.grouped_bn import batch_norm_groups
from pretrain.models.loss import byol_pair_loss
from pretrain.models.mlp import MLP
from pretrain.topology import topology_of
from socokit.backbones import build_fpn_backbone

__all__ = ["BYOL"]


class BYOL(OnlineTargetModel):
    """BYOL with a ResNet backbone, global average pooling and the SoCo MLPs.

    Args:
        backbone: ``"resnet50"`` or ``"timm:<name>"``.
        head_mode: ``"faithful"`` (one call per view) or ``"batched"`` (both
            views in one call, per-view BN statistics).
        mlp_hidden_dim: projector/predictor hidden width (4096).
        out_dim: projection size (256).

    Forward:
        views (list of Tensor[N, 3, S, S]): ``[V1, V2]``.
        boxes, corres: empty lists (accepted for a uniform training loop).

    Returns:
        dict with ``"loss"`` and detached ``"loss_12"``, ``"loss_21"``.
    """

    ARCH = "BYOL"
    TOPOLOGY = topology_of(ARCH)  # shared with the data pipeline: two views, no boxes
    EMA_PARTS = ("backbone", "projector")

    def __init__(self, backbone: str = "resnet50", head_mode: str = "batched",
                 mlp_hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
        self.backbone_name = backbone
        self.head_mode = head_mode
        # The body of the FPN backbone is the full ResNet (conv1..layer4) with the
        # original init, and gives the contract's `online_backbone.body.*` names.
        fpn_backbone = build_fpn_backbone(backbone, norm_layer=nn.BatchNorm2d)
        self.online_backbone = nn.Module()
        self.online_backbone.body = fpn_backbone.body
        feat_dim = fpn_backbone.in_channels[-1]
        self.online_projector = MLP(feat_dim, mlp_hidden_dim, out_dim)
        self.online_predictor = MLP(out_dim, mlp_hidden_dim, out_dim)
        self._init_target()

    def forward(self, views: list[torch.Tensor], boxes: list | None = None,
                corres: list | None = None) -> dict[str, torch.Tensor]:
        if len(views) != self.TOPOLOGY.num_views or boxes or corres:
            raise ValueError(f"BYOL expects {self.TOPOLOGY.num_views} views and no boxes/correspondences, got "
                             f"{len(views)} views, {len(boxes or [])} box sets, {len(corres or [])} corres")
        q1, q2 = self._embed(views, online=True)  # N, D each
        with torch.no_grad():
            z1, z2 = self._embed(views, online=False)
        l12 = byol_pair_loss(q1, z2)
        l21 = byol_pair_loss(q2, z1)
        return {"loss": l12 + l21, "loss_12": l12.detach(), "loss_21": l21.detach()}

    def _embed(self, views, online: bool) -> list[torch.Tensor]:
        pre = "online" if online else "target"
        body = getattr(self, f"{pre}_backbone").body
        heads = [getattr(self, f"{pre}_projector")] + ([self.online_predictor] if online else [])
        if self.head_mode == "faithful" or views[0].shape != views[1].shape:
            return [self._project(body, v, heads) for v in views]
        with batch_norm_groups([body] + heads, len(views)):
            emb = self._project(body, torch.cat(views), heads)  # 2N, D
        return list(emb.chunk(len(views)))

    @staticmethod
    def _project(body: nn.Module, images: torch.Tensor, heads: list[nn.Module]) -> torch.Tensor:
        feats = body(images)
        c5 = list(feats.values())[-1] if isinstance(feats, dict) else feats[-1]  # N, 2048, h, w
        x = torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1)
        for module in heads:
            x = module(x)
        return F.normalize(upcast(x), dim=1)
