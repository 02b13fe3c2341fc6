"""One-stage detectors: RetinaNet and FCOS on a ResNet + FPN P3–P7 backbone.

The FPN takes C3–C5 and adds P6/P7: from P5 for FCOS (AdelaiDet, torchvision) and for
RetinaNet with ``parity="torchvision"`` (torchvision's v2 layout), from C5 for RetinaNet with
``parity="detectron2"`` (detectron2's ``build_retinanet_resnet_fpn_backbone``). Keys: ``backbone.body.*`` (same names as the R-CNN bodies, so
backbone initialisations load unchanged), ``backbone.fpn.*`` (3 lateral/output convs, so a
P2–P5 FPN initialisation does not fit; load its ``backbone`` part only), ``head.*``.
Labels are the contiguous ``1..K`` of the datasets; class column 0 is never positive.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from socokit.backbones import build_fpn_backbone, fpn_init_
from transfer.models.norms import ensure_norm, norm_layer
from transfer.models.parity import Detectron2AnchorGenerator, c2_xavier_fill_, check_parity
from transfer.models.parity_dense import AdelaiFCOSHead, AdelaiFCOS, Detectron2RetinaNet


class DenseFPNBackbone(nn.Module):
    """Body (C2–C5) + FPN over C3–C5 with P6/P7: OrderedDict '0'..'2', 'p6', 'p7'.

    ``p6_from_c5``: P6 is a stride-2 conv on C5 (detectron2 RetinaNet) instead of on P5
    (torchvision v2, AdelaiDet FCOS). ``xavier``: detectron2's ``c2_xavier_fill`` for the FPN
    convs instead of Kaiming-normal fan-out.
    """

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int, fpn_norm,
                 p6_from_c5: bool = False, xavier: bool = False):
        super().__init__()
        self.body = body
        top = LastLevelP6P7(in_channels[-1] if p6_from_c5 else out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(in_channels[1:], out_channels, extra_blocks=top, norm_layer=fpn_norm)
        fpn_init_(self.fpn)
        if xavier:
            for m in self.fpn.modules():
                if isinstance(m, nn.Conv2d):
                    c2_xavier_fill_(m)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(images)
        values = list(feats.values()) if isinstance(feats, dict) else list(feats)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(values[1:])))


def _dense_backbone(arch: str, norms: dict, fpn_channels: int, **options) -> DenseFPNBackbone:
    shared = build_fpn_backbone(arch, norm_layer=norm_layer(norms["backbone"]),
                                out_channels=fpn_channels, fpn_norm=False)
    ensure_norm(shared.body, norms["backbone"])
    return DenseFPNBackbone(shared.body, shared.in_channels, fpn_channels, norm_layer(norms["fpn"]), **options)


def build_retinanet(*, arch: str, num_classes: int, norms: dict, fpn_channels: int = 256,
                    box_score_thresh: float = 0.05, detections_per_img: int = 100,
                    parity: str = "detectron2", **_) -> nn.Module:
    """RetinaNet (focal loss, 9 anchors per location, P3–P7) with a ``head`` norm choice.

    ``parity="detectron2"``: P6 from C5, anchor sizes exactly ``s·2^(k/3)`` (torchvision
    truncates them to integers), FPN ``c2_xavier_fill``, batch loss over a moving average of
    positives (:class:`transfer.models.parity_dense.Detectron2RetinaNet`).
    """
    d2 = check_parity(parity) == "detectron2"
    backbone = _dense_backbone(arch, norms, fpn_channels, p6_from_c5=d2, xavier=d2)
    if d2:
        sizes = tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in (32, 64, 128, 256, 512))
        anchors = Detectron2AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    else:
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512))
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=norm_layer(norms["head"]))
    cls = Detectron2RetinaNet if d2 else RetinaNet
    return cls(backbone, num_classes, anchor_generator=anchors, head=head,
               score_thresh=box_score_thresh, detections_per_img=detections_per_img)


def build_fcos(*, arch: str, num_classes: int, norms: dict, fpn_channels: int = 256,
               box_score_thresh: float = 0.05, detections_per_img: int = 100,
               parity: str = "detectron2", **_) -> nn.Module:
    """FCOS (centre sampling, GIoU, centerness; GroupNorm(32) towers).

    ``parity="detectron2"``: AdelaiDet's FCOS (:mod:`transfer.models.parity_dense`: cell-centre
    locations, per-level scales, centerness-weighted GIoU, candidate rule), FPN
    ``c2_xavier_fill``; ``torchvision``: torchvision's ``FCOS``.
    """
    if fpn_channels % 32:
        raise ValueError(f"FCOS needs fpn_channels divisible by 32 (its head uses GroupNorm(32)), got {fpn_channels}")
    d2 = check_parity(parity) == "detectron2"
    backbone = _dense_backbone(arch, norms, fpn_channels, xavier=d2)
    sizes, ratios = ((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5
    if d2:
        return AdelaiFCOS(backbone, num_classes, anchor_generator=Detectron2AnchorGenerator(sizes, ratios, offset=0.5),
                          head=AdelaiFCOSHead(fpn_channels, 1, num_classes, num_levels=len(sizes)),
                          score_thresh=box_score_thresh, detections_per_img=detections_per_img)
    return FCOS(backbone, num_classes, anchor_generator=AnchorGenerator(sizes, ratios),
                head=FCOSHead(fpn_channels, 1, num_classes),
                score_thresh=box_score_thresh, detections_per_img=detections_per_img)
