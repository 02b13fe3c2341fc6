"""SoCo with a ResNet-C4 backbone and a res5 RoI head (SoCo_C4, docs/method.md §3.8).

Wei et al., NeurIPS 2021 (https://arxiv.org/abs/2106.02637), released code
``hologerry/SoCo`` ``contrast/models/SoCo_C4.py``. Mirrors detectron2's
``Res5ROIHeads``: RoIs are pooled 14×14 from C4 (stride 16) and run through
res5 (ResNet layer4, first block stride 2 → 7×7×2048)::

    for each view v with box set b_v (V1: b1, V2: b2; both 224²):
        c4  = ResNet[conv1..layer3](V_v)                  # (N, 1024, 14, 14)
        roi = RoIAlign14(c4, b_v)                         # (N·L, 1024, 14, 14), aligned=True
        h   = avgpool(res5(roi))                          # (N·L, 2048)
        q_v = normalize(predictor(projector(h)))          # online, (N, L, 256)
        z_v = normalize(projector_t(avgpool(res5_t(roi_t))))  # target
    loss = l(1→2; C) + l(2→1; Cᵀ)      # C: (N, L, L) id equality, minimum −4

The original also registered a MoCo ``queue`` (128 × 65536) and ``queue_ptr``
that it never used; they are not created here (the checkpoint converter
ignores them when importing an original checkpoint).

``head_mode="batched"`` runs res5, projector and predictor once per network
over both views' RoIs with per-view BN statistics (same math as the default
``"faithful"`` per-view calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.base import HEAD_MODES, OnlineTargetModel, roi_align_norm, upcast
from pretrain.models.grouped_bn import batch_norm_groups
from pretrain.models.loss import soco_pair_loss
from pretrain.models.mlp import MLP
from pretrain.topology import topology_of
from socokit.backbones import build_c4_backbone, build_res5_head

__all__ = ["SoCo_C4"]


class SoCo_C4(OnlineTargetModel):
    """SoCo_C4: object-level BYOL on C4 RoIs with a res5 head (two views, two loss terms).

    Args:
        backbone: ``"resnet50"`` or ``"timm:<name>"``.
        head_mode: ``"faithful"`` (one res5/MLP call per view) or ``"batched"``.
        pooler_resolution: RoIAlign size on C4 (14, hard-coded in the original).
        mlp_hidden_dim: projector/predictor hidden width (4096).
        out_dim: projection size (256).
        sampling_ratio: RoIAlign sampling ratio (-1).
        aligned: RoIAlign ``aligned`` (True).

    Forward:
        views (list of Tensor[N, 3, 224, 224]): ``[V1, V2]``.
        boxes (list of Tensor[N, L, 5]): ``[b1, b2]`` normalised x1, y1, x2, y2, id.
        corres (list of Tensor[N, L, L]): ``[C]``.

    Returns:
        dict with ``"loss"`` and detached ``"loss_12"``, ``"loss_21"``, ``"matches"``.
    """

    ARCH = "SoCo_C4"
    TOPOLOGY = topology_of(ARCH)  # shared with the data pipeline: sets [b1:V1, b2:V2], pair (b1, b2)
    EMA_PARTS = ("backbone", "box_head", "projector")

    def __init__(self, backbone: str = "resnet50", head_mode: str = "batched", pooler_resolution: int = 14,
                 mlp_hidden_dim: int = 4096, out_dim: int = 256, sampling_ratio: int = -1,
                 aligned: bool = True):
        super().__init__()
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
        self.backbone_name = backbone
        self.head_mode = head_mode
        self.pooler_resolution = pooler_resolution
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.online_backbone = build_c4_backbone(backbone, norm_layer=nn.BatchNorm2d)
        self.online_box_head = build_res5_head(backbone, norm_layer=nn.BatchNorm2d)
        self.online_projector = MLP(self.online_box_head.out_channels, mlp_hidden_dim, out_dim)
        self.online_predictor = MLP(out_dim, mlp_hidden_dim, out_dim)
        self._init_target()

    def forward(self, views: list[torch.Tensor], boxes: list[torch.Tensor],
                corres: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        topo = self.TOPOLOGY
        if len(views) != topo.num_views or len(boxes) != topo.num_sets or len(corres) != len(topo.pairs):
            raise ValueError(f"SoCo_C4 expects {topo.num_views} views, {topo.num_sets} box sets and "
                             f"{len(topo.pairs)} correspondence, got {len(views)}, {len(boxes)}, {len(corres)}")
        (a, b), = topo.pairs
        n, l = boxes[a].shape[:2]
        if tuple(boxes[b].shape[:2]) != (n, l) or tuple(corres[0].shape) != (n, l, l):
            raise ValueError(f"expected boxes [N, L, 5] and corres [N, L, L] with N={n}, L={l}, got "
                             f"{tuple(boxes[b].shape)} and {tuple(corres[0].shape)}")
        view_of_set = [views[v] for v in topo.set_views]
        q = self._embed(view_of_set, boxes, online=True)  # per box set: N, L, D
        with torch.no_grad():
            z = self._embed(view_of_set, boxes, online=False)
        c = upcast(corres[0])
        l12 = soco_pair_loss(q[a], z[b], c)
        l21 = soco_pair_loss(q[b], z[a], c.transpose(1, 2))
        return {"loss": l12 + l21, "loss_12": l12.detach(), "loss_21": l21.detach(),
                "matches": c.sum(dim=(1, 2)).mean().detach()}

    def _embed(self, views, boxes, online: bool) -> list[torch.Tensor]:
        pre = "online" if online else "target"
        backbone = getattr(self, f"{pre}_backbone")
        heads = [getattr(self, f"{pre}_box_head"), getattr(self, f"{pre}_projector")]
        if online:
            heads.append(self.online_predictor)
        rois = [roi_align_norm(backbone(v)["0"], [b], self.pooler_resolution, self.sampling_ratio, self.aligned)
                for v, b in zip(views, boxes)]  # per view: N·L, 1024, 14, 14
        n, l = boxes[0].shape[:2]
        if self.head_mode == "faithful":
            return [self._project(r, heads).view(n, l, -1) for r in rois]
        with batch_norm_groups(heads, len(rois)):
            emb = self._project(torch.cat(rois), heads)  # 2·N·L, D
        return list(emb.view(len(rois), n, l, -1).unbind(0))

    @staticmethod
    def _project(roi: torch.Tensor, heads: list[nn.Module]) -> torch.Tensor:
        x = heads[0](roi)  # res5: N·L, 2048, 7, 7
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # N·L, 2048 (AvgPool(7) in the original)
        for module in heads[1:]:
            x = module(x)
        return F.normalize(upcast(x), dim=1)
