"""Mask / Faster R-CNN with FPN (4conv1fc box head, 4-conv mask head, norm everywhere) and C4.

Built from torchvision's detection classes and ``socokit.backbones`` parts, so every state-dict
name is torchvision's (``backbone.body.*``, ``backbone.fpn.*``, ``rpn.*``, ``roi_heads.*``).

Settings follow detectron2's ``mask_rcnn_R_50_FPN_1x`` / ``mask_rcnn_R_50_C4_1x`` where
torchvision allows: one RPN conv, RPN pre/post-NMS top-k 2000/1000 (FPN, per level) and
12000/2000 → 6000/1000 (C4), 512 RoIs per image with 25 % positives, RoIAlign 7 (box) and
14 (mask). torchvision's RoIAlign uses ``aligned=False`` (detectron2: ``ROIAlignV2``,
aligned=True); this is a documented deviation.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from socokit.backbones import (build_box_head, build_c4_backbone, build_fpn_backbone,
                               build_res5_head, fpn_init_)
from transfer.models.norms import ensure_norm, norm_layer


def build_fpn_neck(arch: str, norms: dict, out_channels: int, extra_block: bool = True):
    """ResNet body + FPN (P2–P6) with the body's and the FPN's own norms."""
    backbone = build_fpn_backbone(arch, norm_layer=norm_layer(norms["backbone"]),
                                  out_channels=out_channels, extra_block=extra_block,
                                  fpn_norm=norms["fpn"] != "none")
    ensure_norm(backbone.body, norms["backbone"])
    if norms["fpn"] not in ("none", norms["backbone"]):
        backbone.fpn = FeaturePyramidNetwork(backbone.in_channels, out_channels,
                                             extra_blocks=LastLevelMaxPool() if extra_block else None,
                                             norm_layer=norm_layer(norms["fpn"]))
        fpn_init_(backbone.fpn)
    return backbone


def _rcnn_kwargs(defaults: dict, box_score_thresh: float, detections_per_img: int,
                 overrides: dict) -> dict:
    """torchvision (Faster|Mask)RCNN keyword arguments: recipe values, then explicit overrides.

    ``overrides`` may hold any of ``rpn_pre_nms_top_n_{train,test}``,
    ``rpn_post_nms_top_n_{train,test}``, ``box_batch_size_per_image`` (None = recipe value);
    the tests shrink them to keep CPU runs short.
    """
    kwargs = dict(defaults, box_score_thresh=box_score_thresh, box_nms_thresh=0.5,
                  box_detections_per_img=detections_per_img, box_batch_size_per_image=512,
                  box_positive_fraction=0.25, rpn_batch_size_per_image=256,
                  rpn_positive_fraction=0.5, rpn_nms_thresh=0.7)
    for key, value in overrides.items():
        if key not in kwargs:
            raise ValueError(f"unknown R-CNN option {key!r}")
        if value is not None:
            kwargs[key] = int(value)
    return kwargs


def build_rcnn_fpn(*, arch: str, num_classes: int, norms: dict, with_masks: bool,
                   fpn_channels: int = 256, conv_dim: int = 256, fc_dim: int = 1024,
                   mask_dim: int = 256, box_score_thresh: float = 0.05,
                   detections_per_img: int = 100, **overrides) -> nn.Module:
    """Mask R-CNN (``with_masks``) or Faster R-CNN, R-FPN with the 4conv1fc head.

    Args:
        arch: backbone name (torchvision ResNet or ``timm:<name>``).
        num_classes: including the background (K + 1).
        norms: part → norm name (see :mod:`transfer.models.norms`).
        fpn_channels, conv_dim, fc_dim, mask_dim: widths (256, 256, 1024, 256 in the recipes;
            smaller in tests).
    """
    backbone = build_fpn_neck(arch, norms, fpn_channels)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    rpn_head = RPNHead(fpn_channels, 3, conv_depth=1)
    box_head = build_box_head(norm_layer=norm_layer(norms["box_head"]), in_channels=fpn_channels,
                              conv_dim=conv_dim, fc_dim=fc_dim)
    kwargs = dict(
        num_classes=None, rpn_anchor_generator=anchors, rpn_head=rpn_head,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0), box_head=box_head,
        box_predictor=FastRCNNPredictor(fc_dim, num_classes),
        **_rcnn_kwargs(dict(rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
                            rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000),
                       box_score_thresh, detections_per_img, overrides))
    if not with_masks:
        return FasterRCNN(backbone, **kwargs)
    mask_head = MaskRCNNHeads(fpn_channels, [mask_dim] * 4, 1, norm_layer=norm_layer(norms["mask_head"]))
    return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 0),
                    mask_head=mask_head, mask_predictor=MaskRCNNPredictor(mask_dim, mask_dim, num_classes),
                    **kwargs)


class Res5BoxHead(nn.Module):
    """C4 RoI head: res5 (stride 2: 14×14 → 7×7), optional extra norm, global average pool.

    Keys: ``res5.*`` (the ResNet layer4) and, with ``extra_norm``, ``norm.*`` (the MoCo /
    SoCo ``Res5ROIHeadsExtraNorm``: one more norm on the res5 output).
    """

    def __init__(self, res5: nn.Module, out_channels: int, extra_norm=None):
        super().__init__()
        self.res5 = res5
        self.out_channels = out_channels
        if extra_norm is not None:
            self.norm = extra_norm(out_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def features(self, roi_features):
        """Tensor[R, C4, 14, 14] → Tensor[R, 2048, 7, 7]."""
        x = self.res5(roi_features)
        return self.norm(x) if hasattr(self, "norm") else x

    def forward(self, roi_features):
        return self.pool(self.features(roi_features)).flatten(1)  # [R, 2048]


class Res5MaskFeatures(nn.Module):
    """Mask branch of the C4 detector: the *same* res5 (+ norm) as the box head.

    detectron2's ``Res5ROIHeads`` feeds the res5 output of the sampled foreground RoIs to a
    deconv mask predictor. torchvision's RoIHeads pools the foreground RoIs again for the mask
    branch, so here res5 runs a second time on them: same weights, same 14×14 RoIAlign, same
    output, at the price of extra compute and (in training) BN batch statistics over the
    foreground RoIs only. The box head is referenced, not registered, so its weights appear
    once in the state dict (under ``roi_heads.box_head``).
    """

    def __init__(self, box_head: Res5BoxHead):
        super().__init__()
        self._shared = [box_head]

    def forward(self, roi_features):
        return self._shared[0].features(roi_features)  # [R, 2048, 7, 7]


def build_rcnn_c4(*, arch: str, num_classes: int, norms: dict, with_masks: bool,
                  extra_norm: bool = True, box_score_thresh: float = 0.05,
                  detections_per_img: int = 100, mask_dim: int = 256, **overrides) -> nn.Module:
    """Mask / Faster R-CNN R-C4 (MoCo/SoCo ``Res5ROIHeadsExtraNorm`` with ``extra_norm``)."""
    backbone = build_c4_backbone(arch, norm_layer=norm_layer(norms["backbone"]))
    res5 = build_res5_head(arch, norm_layer=norm_layer(norms["backbone"]))
    ensure_norm(backbone.body, norms["backbone"])
    ensure_norm(res5, norms["backbone"])
    head_norm = norm_layer(norms["box_head"]) if extra_norm and norms["box_head"] != "none" else None
    box_head = Res5BoxHead(res5.res5, res5.out_channels, head_norm)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    kwargs = dict(
        num_classes=None, rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, 15, conv_depth=1),
        box_roi_pool=MultiScaleRoIAlign(["0"], 14, 0), box_head=box_head,
        box_predictor=FastRCNNPredictor(res5.out_channels, num_classes),
        **_rcnn_kwargs(dict(rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000,
                            rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000),
                       box_score_thresh, detections_per_img, overrides))
    if not with_masks:
        return FasterRCNN(backbone, **kwargs)
    return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 0),
                    mask_head=Res5MaskFeatures(box_head),
                    mask_predictor=MaskRCNNPredictor(res5.out_channels, mask_dim, num_classes), **kwargs)
